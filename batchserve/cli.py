"""Command line: `batchserve serve MODEL.onnx` and `batchserve example-model NAME`.

Every `serve` flag can also be set by an environment variable `BATCHSERVE_<FLAG>` (for example
`BATCHSERVE_MAX_BATCH_SIZE=32`); a flag on the command line wins. The flags are declared in
`batchserve.flags`, and `batchserve.app.build_server` builds what they describe.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import sys
from collections.abc import Sequence
from typing import Any

from batchserve.cost.command import add_cost_parser, run_cost
from batchserve.errors import DeviceUnavailable, ModelLoadError
from batchserve.flags import EXIT_USAGE, add_serve_flags, env, settings_from_args
from batchserve.settings import ServeSettings

GC_GEN0_THRESHOLD = 20_000


def _add_serve(commands: Any) -> None:
    serve = commands.add_parser(
        "serve", help="serve an ONNX model over HTTP (Open Inference Protocol)"
    )
    add_serve_flags(serve)


def _add_bench(commands: Any) -> None:
    bench = commands.add_parser(
        "bench",
        help="load-test any Open Inference Protocol server (open or closed loop)",
        description="Open loop (--rate) measures latency from each request's scheduled send "
        "time; closed loop (--concurrency) runs N callers back to back.",
    )
    bench.add_argument(
        "url", nargs="?",
        help="server base URL, e.g. http://127.0.0.1:8000, or grpc://127.0.0.1:8001 for gRPC",
    )  # fmt: skip
    bench.add_argument("--model", "-m", help="model name (required unless --noop)")
    bench.add_argument("--version", help="model version")
    load = bench.add_mutually_exclusive_group()
    load.add_argument("--rate", type=float, help="open loop: requests per second")
    load.add_argument("--concurrency", type=int, help="closed loop: concurrent callers")
    bench.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    bench.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    bench.add_argument("--arrivals", choices=["constant", "poisson"], default="constant")
    bench.add_argument(
        "--max-outstanding",
        type=int,
        default=1024,
        help="open loop: most requests in flight (later ones wait, and it counts)",
    )
    bench.add_argument("--processes", type=int, default=1, help="load generator processes")
    _add_protocol(bench)
    bench.add_argument("--rows", type=int, default=1, help="rows per request (batch dim)")
    bench.add_argument("--input", help=".npy, .npz or JSON file with the inputs to send")
    bench.add_argument(
        "--distinct", type=int, default=16, help="distinct request bodies to cycle through"
    )
    bench.add_argument(
        "--unique-fraction", type=float, default=0.0,
        help="share of requests with never-repeated inputs; the rest repeat one of --distinct",
    )  # fmt: skip
    bench.add_argument(
        "--timeout", type=float, default=30.0,
        help="per-request timeout, s (open loop: from the scheduled send time)",
    )  # fmt: skip
    bench.add_argument(
        "--header", action="append", metavar="'NAME: VALUE'",
        help="extra header on every request, metadata and statistics GETs included (repeatable)",
    )  # fmt: skip
    bench.add_argument(
        "--parameter", action="append", metavar="KEY=VALUE",
        help="a V2 request parameter on every request, VALUE read as JSON, else as text: "
        "priority=1, timeout=50000 (repeatable)",
    )  # fmt: skip
    bench.add_argument(
        "--api-key", default=env("api-key", None),
        help="send Authorization: Bearer KEY (default: $BATCHSERVE_API_KEY)",
    )  # fmt: skip
    bench.add_argument("--json", dest="json_out", help="write the report(s) to this file")
    _add_sweep(bench)
    bench.add_argument(
        "--noop",
        action="store_true",
        help="measure the load generator's own ceiling on a built-in no-op server",
    )


def _add_protocol(bench: argparse.ArgumentParser) -> None:
    bench.add_argument("--binary", action="store_true", help="binary tensor extension")
    bench.add_argument(
        "--protocol", choices=["http", "grpc"],
        help="http, or grpc (ModelInfer, raw tensors); default: from the URL's scheme",
    )  # fmt: skip
    bench.add_argument(
        "--streaming", action="store_true",
        help="gRPC: requests on ModelStreamInfer streams, one at a time on each",
    )  # fmt: skip


def _add_sweep(bench: argparse.ArgumentParser) -> None:
    bench.add_argument(
        "--sweep",
        action="store_true",
        help="find the highest rate whose p99 stays under --slo-p99-ms",
    )
    bench.add_argument("--slo-p99-ms", type=float, default=100.0)
    bench.add_argument("--start-rate", type=float, default=500.0)
    bench.add_argument("--max-rate", type=float, default=200_000.0)
    bench.add_argument("--bisect-steps", type=int, default=4)


def _add_tune(commands: Any) -> None:
    tune = commands.add_parser(
        "tune", help="find the server settings with the most throughput under a p99 SLO"
    )
    tune.add_argument("model", help="path to the .onnx model file")
    tune.add_argument("--slo-p99-ms", type=float, default=100.0)
    tune.add_argument("--budget-s", type=float, default=300.0, help="time for all trials")
    tune.add_argument("--trial-duration", type=float, default=3.0, help="seconds per sweep step")
    tune.add_argument("--binary", action="store_true", help="binary tensor extension")
    tune.add_argument("--rows", type=int, default=1, help="rows per request")
    tune.add_argument("--start-rate", type=float, default=250.0)
    tune.add_argument("--processes", type=int, default=1, help="load generator processes")
    tune.add_argument("--json", dest="json_out", help="write every trial to this file")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batchserve", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    _add_serve(commands)
    _add_bench(commands)
    _add_tune(commands)
    add_cost_parser(commands)
    example = commands.add_parser("example-model", help="write a generated example ONNX model")
    example.add_argument("name", help="mlp, wide-mlp, resnet50 or bert-base")
    example.add_argument("-o", "--output", required=True, help="where to write the .onnx file")
    example.add_argument("--seed", type=int, default=0)
    return parser


def _serve(args: argparse.Namespace, serve_argv: Sequence[str] = ()) -> int:
    try:
        settings = settings_from_args(args)
    except ValueError as err:
        return _fail(str(err))
    if settings.workers > 1:
        return _supervise(settings, serve_argv)
    from batchserve.app import build_server, serve_until_signalled

    ready_fd = args.ready_fd  # a worker of --workers tells its supervisor it listens
    try:
        server = build_server(settings)
        ready = serve_until_signalled(
            server, on_ready=lambda: _on_ready(ready_fd), worker=ready_fd is not None
        )
        _run(ready)
    except (ModelLoadError, DeviceUnavailable) as err:
        return _fail(err.message)
    except OSError as err:  # e.g. the port is taken
        return _cannot_listen(settings, err)
    return 0


def _supervise(settings: ServeSettings, serve_argv: Sequence[str]) -> int:
    from batchserve.workers import Supervisor, WorkerPlan, worker_argv

    config = settings.server
    plan = WorkerPlan(settings.workers, worker_argv(serve_argv), config.host, config.port,
                      config.shutdown_grace_s, settings.metrics_port)  # fmt: skip
    try:
        return Supervisor(plan).run()
    except OSError as err:
        return _cannot_listen(settings, err)


def _cannot_listen(settings: ServeSettings, err: OSError) -> int:
    where = f"{settings.server.host}:{settings.server.port}"
    return _fail(f"cannot listen on {where}: {err.strerror or err}")


def _on_ready(ready_fd: int | None) -> None:
    _tune_gc()
    if ready_fd is not None:  # a worker tells its supervisor it listens
        from batchserve.workers import notify_ready

        notify_ready(ready_fd)


def _tune_gc() -> None:
    """Models and sessions live for the whole process: move them out of the collector's sight,
    and collect young objects less often (each request allocates hundreds of short-lived ones)."""
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, 20, 20)


def _run(main: Any) -> None:
    try:
        import uvloop
    except ImportError:  # uvloop is not built for every platform
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


def _example(args: argparse.Namespace) -> int:
    from batchserve.examples import write_example

    try:
        path = write_example(args.name, args.output, seed=args.seed)
    except (ValueError, RuntimeError, OSError) as err:
        return _fail(str(err))
    print(f"wrote {args.name} to {path}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from batchserve.bench import BenchError, noop_server, run_bench

    if args.noop:
        with noop_server(protocol="grpc" if args.protocol == "grpc" else "http") as url:
            try:
                return run_bench(args, url, args.model or "noop")
            except (BenchError, ValueError) as err:
                return _fail(str(err))
    if not args.url:
        return _fail("bench needs a server URL (or --noop)")
    try:
        return run_bench(args, args.url, args.model)
    except (BenchError, ValueError) as err:
        return _fail(str(err))


def _tune(args: argparse.Namespace) -> int:
    import json

    from batchserve.bench import BenchError, LoadConfig, trials_table, tune

    load = LoadConfig(
        rate=args.start_rate,
        duration_s=args.trial_duration,
        warmup_s=0.5,
        processes=args.processes,
    )
    print(f"tuning {args.model} for p99 < {args.slo_p99_ms:g} ms within {args.budget_s:g} s")
    try:
        trials = tune(
            args.model,
            slo_p99_ms=args.slo_p99_ms,
            budget_s=args.budget_s,
            load=load,
            binary=args.binary,
            rows=args.rows,
            start_rate=args.start_rate,
        )
    except (BenchError, ValueError) as err:
        return _fail(str(err))
    if not trials or trials[0].best is None:
        print("no setting held the SLO at the starting rate")
    else:
        best = trials[0]
        print(f"\nbest: {best.candidate.label()}: {best.rate:,.0f} req/s under the SLO")
        print("  batchserve serve " + args.model + " " + " ".join(best.candidate.flags()))
    print("\n" + trials_table(trials))
    if args.json_out:
        with open(args.json_out, "w") as out:
            json.dump([t.as_dict() for t in trials], out, indent=1)
    return 0


def _fail(message: str) -> int:
    print(f"batchserve: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(args, "log_level", "info").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "serve":
        raw = list(sys.argv[1:] if argv is None else argv)
        return _serve(args, raw[raw.index("serve") + 1 :])
    if args.command == "bench":
        return _bench(args)
    if args.command == "tune":
        return _tune(args)
    if args.command == "cost":
        return run_cost(args)
    return _example(args)
