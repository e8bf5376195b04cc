"""A no-op Open Inference Protocol server: the load generator's own ceiling is measured on it.

It parses each request body with orjson (as any V2 server must) and answers a constant, so what
limits a run against it is the client, the HTTP stack and the machine, not a model.

    python -m batchserve.bench.noop --port 0     # prints "listening on http://..."
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import orjson
from aiohttp import web

METADATA = orjson.dumps(
    {
        "name": "noop",
        "versions": ["1"],
        "platform": "noop",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 1]}],
    }
)
ANSWER = orjson.dumps(
    {
        "model_name": "noop",
        "outputs": [{"name": "output", "datatype": "FP32", "shape": [1, 1], "data": [0.0]}],
    }
)


async def infer(request: web.Request) -> web.Response:
    body = await request.read()
    length = request.headers.get("Inference-Header-Content-Length")
    orjson.loads(body if length is None else body[: int(length)])
    return web.Response(body=ANSWER, content_type="application/json")


async def metadata(request: web.Request) -> web.Response:
    return web.Response(body=METADATA, content_type="application/json")


async def ready(request: web.Request) -> web.Response:
    return web.Response(body=b'{"ready":true}', content_type="application/json")


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/v2/health/ready", ready)
    app.router.add_get("/v2/models/{name}", metadata)
    app.router.add_post("/v2/models/{name}/infer", infer)
    return app


async def serve(host: str, port: int) -> None:
    runner = web.AppRunner(create_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    print(f"listening on http://{host}:{runner.addresses[0][1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.run(serve(args.host, args.port))
    except ImportError:
        asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
