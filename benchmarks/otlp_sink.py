"""An OTLP/HTTP trace sink for benchmarks: takes `POST /v1/traces` as a collector does and
answers at once with an empty `ExportTraceServiceResponse`, without decoding, so a traced
server is measured against a receiver that costs as little as one can (on a shared machine it
still takes some CPU). On SIGTERM or SIGINT it prints how many exports and bytes it took.

    python benchmarks/otlp_sink.py --port 4318
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from aiohttp import web


async def serve(host: str, port: int) -> None:
    counts = {"exports": 0, "bytes": 0}

    async def export(request: web.Request) -> web.Response:
        body = await request.read()
        counts["exports"] += 1
        counts["bytes"] += len(body)
        # An empty message serializes to no bytes: the protocol's success answer.
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", export)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"OTLP sink on http://{host}:{port}", flush=True)
    await stop.wait()
    await runner.cleanup()
    print(f"OTLP sink took {counts['exports']} exports, {counts['bytes']} bytes", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4318)
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
