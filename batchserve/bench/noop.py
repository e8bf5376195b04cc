"""A no-op Open Inference Protocol server: the load generator's own ceiling is measured on it.

It parses each request body with orjson (as any V2 server must) and answers a constant, so what
limits a run against it is the client, the HTTP stack and the machine, not a model. With
`--grpc` it serves `inference.GRPCInferenceService` instead (grpc.aio): ModelMetadata,
ModelInfer and ModelStreamInfer, each request parsed and answered with a constant.

    python -m batchserve.bench.noop --port 0          # prints "listening on http://..."
    python -m batchserve.bench.noop --grpc --port 0   # prints "listening on grpc://..."
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


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def serve(host: str, port: int) -> None:
    runner = web.AppRunner(create_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    print(f"listening on http://{host}:{runner.addresses[0][1]}", flush=True)
    await _until_signalled()
    await runner.cleanup()


async def serve_grpc(host: str, port: int) -> None:
    import grpc.aio

    from batchserve.bench.noop_grpc import service

    server = grpc.aio.server(options=[("grpc.max_receive_message_length", -1)])
    server.add_generic_rpc_handlers((service(),))
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"listening on grpc://{host}:{bound}", flush=True)
    await _until_signalled()
    await server.stop(grace=1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--grpc", action="store_true", help="serve gRPC instead of HTTP")
    args = parser.parse_args()
    run = serve_grpc if args.grpc else serve
    try:
        import uvloop

        uvloop.run(run(args.host, args.port))
    except ImportError:
        asyncio.run(run(args.host, args.port))


if __name__ == "__main__":
    main()
