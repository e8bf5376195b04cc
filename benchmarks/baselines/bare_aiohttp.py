"""HTTP ceiling: aiohttp + uvloop answering V2 infer requests without a model.

Every ``POST /v2/models/{name}/infer`` body is parsed with ``orjson.loads`` (so
the JSON decode cost stays in the measurement) and answered with one constant,
pre-encoded V2 response shaped like a real answer from the benchmark mlp
(``probabilities``, FP32, shape [1, 10]). No inference, no batching: whatever
a real server reaches is bounded by what this one reaches on the same machine.

Usage::

    python benchmarks/baselines/bare_aiohttp.py --host 127.0.0.1 --port 8000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

import orjson
import uvloop
from aiohttp import web

RESPONSE = orjson.dumps(
    {
        "model_name": "mlp",
        "outputs": [
            {
                "name": "probabilities",
                "shape": [1, 10],
                "datatype": "FP32",
                "data": [0.1] * 10,
            }
        ],
    }
)


async def infer(request: web.Request) -> web.Response:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return web.Response(status=400, text="invalid JSON")
    if not isinstance(body, dict) or "inputs" not in body:
        return web.Response(status=400, text="missing 'inputs'")
    return web.Response(body=RESPONSE, content_type="application/json")


async def ready(_request: web.Request) -> web.Response:
    return web.Response(body=b'{"ready":true}', content_type="application/json")


METADATA = orjson.dumps(
    {
        "name": "mlp",
        "versions": ["1"],
        "platform": "constant",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}],
    }
)


async def metadata(_request: web.Request) -> web.Response:
    # Load generators read the model's metadata first; it describes the mlp it imitates.
    return web.Response(body=METADATA, content_type="application/json")


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/v2/models/{name}/infer", infer)
    app.router.add_get("/v2/models/{name}", metadata)
    app.router.add_get("/v2/health/ready", ready)
    return app


async def serve(host: str, port: int, reuse_port: bool = False) -> None:
    runner = web.AppRunner(create_app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_port=reuse_port).start()
    try:
        await asyncio.Event().wait()  # serve until the process is signalled
    finally:
        await runner.cleanup()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--reuse-port", action="store_true",
        help="share the port with other copies (SO_REUSEPORT): the ceiling of N processes",
    )  # fmt: skip
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(args.host, args.port, args.reuse_port))


if __name__ == "__main__":
    main()
