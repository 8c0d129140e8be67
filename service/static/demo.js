"use strict";
// The demo page's only script (CSP: script-src 'self'). It sends the image to POST /v1/predict of
// this service, with the API key of the Options if one is given, and draws the answer.
const $ = (id) => document.getElementById(id);
const classNames = {};

function api(path, init = {}) {
  const headers = new Headers(init.headers || {});
  const key = $("key").value.trim();
  if (key) headers.set("Authorization", "Bearer " + key);
  return fetch(path, { ...init, headers });
}

async function namesOf(model) {
  if (!(model in classNames)) {
    const response = await api("/v1/models/" + encodeURIComponent(model));
    classNames[model] = response.ok ? (await response.json()).class_names : null;
  }
  return classNames[model];
}

function fmt(x) {
  return x === null || x === undefined ? "withheld" : Number(x).toPrecision(4);
}

async function send(blob, name) {
  $("status").textContent = "Asking the service ...";
  document.body.dataset.state = "busy";
  const form = new FormData();
  form.append("files", blob, name);
  const mode = $("mode").value;
  const url = "/v1/predict" + (mode ? "?mode=" + encodeURIComponent(mode) : "");
  let response;
  try {
    response = await api(url, { method: "POST", body: form });
  } catch (error) {
    fail("The service did not answer: " + error);
    return;
  }
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const error = (body && body.error) || { status: response.status, code: "", message: response.statusText };
    const hint = response.status === 401 ? " (enter the API key under Options)" : "";
    fail(`${error.status} ${error.code}: ${error.message}${hint}`);
    return;
  }
  await show(body, blob, name);
}

function fail(message) {
  $("status").textContent = message;
  document.body.dataset.state = "error";
}

async function show(body, blob, name) {
  const p = body.predictions[0];
  const names = await namesOf(body.model);
  $("preview").src = URL.createObjectURL(blob);
  $("filename").textContent = name;
  const verdict = $("verdict");
  verdict.className = p.accepted ? "accepted" : "rejected";
  verdict.textContent = p.accepted
    ? "Accepted: the answer can be trusted"
    : "Rejected: do not trust this answer";
  $("label").textContent = p.label === null
    ? "Label withheld (enforce mode)"
    : `Label ${p.class_name ?? p.label}  (model ${body.model} v${body.version})`;
  const d = p.decision;
  $("score").textContent =
    `${d.metric} score ${fmt(d.score)} vs threshold ${fmt(d.threshold)} ` +
    `(accepted iff score >= threshold; target FPR ${d.target_fpr})`;
  drawGauge(d.score, d.threshold, p.accepted);
  drawBars(p.probabilities, names, p.label);
  $("result").hidden = false;
  $("status").textContent = "";
  document.body.dataset.state = p.accepted ? "accepted" : "rejected";
}

function drawGauge(score, threshold, accepted) {
  const gauge = $("gauge");
  if (score === null || threshold === null) {
    gauge.hidden = true;
    return;
  }
  gauge.hidden = false;
  const span = Math.max(Math.abs(score - threshold), 1);
  const lo = Math.min(score, threshold) - span * 0.25;
  const hi = Math.max(score, threshold) + span * 0.25;
  const at = (x) => (100 * (x - lo)) / (hi - lo) + "%";
  $("gauge-score").style.width = at(score);
  $("gauge-score").style.background = accepted ? "#1a7f37" : "#cf222e";
  $("gauge-threshold").style.left = at(threshold);
}

function drawBars(probabilities, names, label) {
  const list = $("bars");
  list.replaceChildren();
  if (!probabilities) {
    const item = document.createElement("li");
    item.textContent = "withheld (enforce mode)";
    list.append(item);
    return;
  }
  probabilities.forEach((value, i) => {
    const item = document.createElement("li");
    if (i === label) item.className = "top";
    const name = document.createElement("span");
    name.textContent = names ? names[i] : String(i);
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("div");
    fill.className = "fill";
    fill.style.width = (100 * value).toFixed(1) + "%";
    bar.append(fill);
    const number = document.createElement("span");
    number.textContent = (100 * value).toFixed(1) + "%";
    item.append(name, bar, number);
    list.append(item);
  });
}

async function sendSample(file) {
  const response = await fetch("/demo/samples/" + encodeURIComponent(file));
  if (!response.ok) {
    fail(`sample ${file}: ${response.status}`);
    return;
  }
  await send(await response.blob(), file);
}

async function loadSamples() {
  const response = await fetch("/demo/samples.json");
  const samples = response.ok ? await response.json() : [];
  for (const sample of samples) {
    const button = document.createElement("button");
    button.type = "button";
    const image = document.createElement("img");
    image.src = "/demo/samples/" + encodeURIComponent(sample.file);
    image.alt = sample.file;
    button.append(image, `${sample.kind} ${sample.true_label}`);
    button.addEventListener("click", () => sendSample(sample.file));
    $("samples").append(button);
  }
  return samples;
}

function init() {
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) send(file, file.name);
  });
  $("file").addEventListener("change", () => {
    const file = $("file").files[0];
    if (file) send(file, file.name);
  });
  // ?sample=NAME sends that sample at once (a link to a worked example; the browser test).
  const wanted = new URLSearchParams(location.search).get("sample");
  loadSamples().then((samples) => {
    if (wanted && samples.some((s) => s.file === wanted)) sendSample(wanted);
  });
}

init();
