-- wrk script for bench/serving.py: POST single PNGs (the files named after `--`, in turn) as raw
-- image/png bodies, count 2xx, non-2xx and 503 responses per thread, and print one JSON line
-- (prefixed "WRK_JSON ") with the counts and wrk's latency percentiles in microseconds.
--   wrk -c 64 -d 5s --latency -s bench/post_png.lua http://127.0.0.1:8000/v1/predict -- a.png b.png

local threads = {}
local requests = {}
local next_request = 0
-- Globals, not locals: done() reads them from each thread's Lua state with thread:get().
ok, non_2xx, refused_503 = 0, 0, 0

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  for _, path in ipairs(args) do
    local file = assert(io.open(path, "rb"))
    local body = file:read("*a")
    file:close()
    table.insert(requests, wrk.format("POST", nil, { ["Content-Type"] = "image/png" }, body))
  end
  assert(#requests > 0, "post_png.lua: pass PNG files after --")
end

function request()
  next_request = next_request % #requests + 1
  return requests[next_request]
end

function response(status, headers, body)
  if status >= 200 and status < 300 then
    ok = ok + 1
  else
    non_2xx = non_2xx + 1
    if status == 503 then
      refused_503 = refused_503 + 1
    end
  end
end

function done(summary, latency, requests)
  local counts = { ok = 0, non_2xx = 0, refused_503 = 0 }
  for _, thread in ipairs(threads) do
    for name, _ in pairs(counts) do
      counts[name] = counts[name] + thread:get(name)
    end
  end
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "ok": %d, "non_2xx": %d, "refused_503": %d, '
      .. '"socket_errors": %d, "timeouts": %d, "p50_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, counts.ok, counts.non_2xx, counts.refused_503,
    e.connect + e.read + e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max
  ))
end
