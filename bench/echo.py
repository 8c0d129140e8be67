"""The echo floor of bench/serving.py: a bare ASGI app under uvicorn that reads the whole request
body (the same PNG the service gets) and answers a fixed JSON, with no framework, decoding or
inference. Its throughput is what HTTP alone costs on this machine.

uvicorn runs as `rcegate serve` runs it (service/cli.py): one process, uvicorn's defaults, root
logging configured by `logging.basicConfig` at INFO with `log_config=None`, so the access log is
written the same way. Keep the two in step when `serve` changes.

    python bench/echo.py --port 8001
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

import uvicorn

RESPONSE = b'{"model": "echo", "version": 1, "mode": "annotate", "predictions": []}'
HEADERS = [(b"content-type", b"application/json")]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    more_body = True
    while more_body:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        more_body = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": RESPONSE})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    log_level = os.environ.get("RCEGATE_LOG_LEVEL", "info")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger().setLevel(log_level.upper())
    uvicorn.run(app, host=args.host, port=args.port, log_level=log_level, log_config=None)


if __name__ == "__main__":
    main()
