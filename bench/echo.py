"""The echo floor of bench/serving.py: a bare ASGI app under uvicorn that reads the whole request
body (the same PNG the service gets) and answers a fixed JSON, with no framework, decoding or
inference. Its throughput is what HTTP alone costs on this machine.

uvicorn runs exactly as `rcegate serve` runs it: the same `uvicorn.Config` from
`service.server.uvicorn_config` (h11 with the head timeout, connection limit, keep-alive, no
access log), built from the same RCEGATE_* settings.

    python bench/echo.py --port 8001
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.server import uvicorn_config  # noqa: E402
from service.settings import Settings  # noqa: E402

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
    settings = Settings(host=args.host, port=args.port)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger().setLevel(settings.log_level.upper())
    uvicorn.Server(uvicorn_config(app, settings)).run()


if __name__ == "__main__":
    main()
