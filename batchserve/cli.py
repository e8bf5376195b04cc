"""Command line: `batchserve serve MODEL.onnx` and `batchserve example-model NAME`.

Every `serve` flag can also be set by an environment variable `BATCHSERVE_<FLAG>` (for example
`BATCHSERVE_MAX_BATCH_SIZE=32`); a flag on the command line wins.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from batchserve.config import BatchConfig, CacheConfig, Device, RuntimeConfig, ServerConfig
from batchserve.cost.command import add_cost_parser, run_cost
from batchserve.errors import DeviceUnavailable, ModelLoadError

EXIT_USAGE = 2
GC_GEN0_THRESHOLD = 20_000


def _env(flag: str, default: Any, kind: Callable[[str], Any] = str) -> Any:
    name = "BATCHSERVE_" + flag.upper().replace("-", "_")
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return kind(value)
    except ValueError:
        print(f"batchserve: error: {name}={value!r} is invalid", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


def _max_active_requests(args: argparse.Namespace) -> int:
    """Room for two full batches, so the cap never starves the batcher."""
    if args.max_active_requests >= 0:
        return int(args.max_active_requests)
    return max(128, 2 * int(args.max_batch_size))


def _flag(text: str) -> bool:
    value = text.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(text)


def _device(text: str) -> Device:
    try:
        return Device.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _add_serve(commands: Any) -> None:
    serve = commands.add_parser(
        "serve", help="serve an ONNX model over HTTP (Open Inference Protocol)"
    )
    serve.add_argument(
        "model", nargs="?", help="path to the .onnx model file (or use --model-repository)"
    )
    serve.add_argument(
        "--model-repository",
        default=_env("model-repository", None),
        help="serve every model in DIR/<model>/<version>/model.onnx (docs/models.md)",
    )
    serve.add_argument(
        "--repository-poll-s", type=float, default=_env("repository-poll-s", 0.0, float),
        help="rescan the model repository this often and apply changes (0 = never)",
    )  # fmt: skip
    serve.add_argument(
        "--name", default=_env("name", None), help="model name in URLs (default: file stem)"
    )
    serve.add_argument("--host", default=_env("host", "0.0.0.0"))
    serve.add_argument("--port", type=int, default=_env("port", 8000, int))
    serve.add_argument(
        "--max-batch-size",
        type=int,
        default=_env("max-batch-size", 64, int),
        help="most rows in one ONNX Runtime run (default 64)",
    )
    serve.add_argument(
        "--max-latency-ms",
        type=float,
        default=_env("max-latency-ms", 2.0, float),
        help="longest a request is held for company while a session is free",
    )
    serve.add_argument(
        "--max-queue-rows",
        type=int,
        default=_env("max-queue-rows", 8192, int),
        help="rows allowed to wait; more are rejected with 429",
    )
    serve.add_argument(
        "--max-shape-groups",
        type=int,
        default=_env("max-shape-groups", 1024, int),
        help="distinct input shapes allowed to wait at once; a new one past it gets 429",
    )
    serve.add_argument(
        "--instances",
        type=int,
        default=_env("instances", 1, int),
        help="ONNX Runtime sessions in the pool (one thread / CUDA stream each)",
    )
    serve.add_argument(
        "--intra-op-threads",
        type=int,
        default=_env("intra-op-threads", 0, int),
        help="threads per session (0: cores / instances on CPU, 1 on CUDA)",
    )
    serve.add_argument(
        "--spin",
        choices=["auto", "on", "off"],
        default=_env("spin", "auto"),
        help="ORT threads spin between operators: faster for large models, costs idle CPU "
        "(auto: on for model files over 8 MB)",
    )
    serve.add_argument(
        "--device", type=_device, default=_env("device", "cpu"), help="cpu or cuda[:N]"
    )
    serve.add_argument(
        "--io-binding",
        choices=["auto", "on", "off"],
        default=_env("io-binding", "auto"),
        help="run through ONNX Runtime I/O binding with reused buffers (auto: on for CUDA; "
        "on CPU a plain run measured faster)",
    )
    serve.add_argument(
        "--trt",
        action="store_true",
        default=_env("trt", False, _flag),
        help="TensorRT execution provider before CUDA (falls back to CUDA when absent)",
    )
    serve.add_argument(
        "--fp16",
        action="store_true",
        default=_env("fp16", False, _flag),
        help="half precision: TensorRT's FP16 with --trt, else the model is converted once "
        "(needs batchserve[gpu]) and the result cached",
    )
    serve.add_argument(
        "--trt-cache-dir", default=_env("trt-cache-dir", None),
        help="TensorRT engine cache, so restarts do not rebuild (default: BUILD_CACHE_DIR/trt)",
    )  # fmt: skip
    serve.add_argument(
        "--build-cache-dir", default=_env("build-cache-dir", None),
        help="FP16 conversions and TensorRT engines (default: ~/.cache/batchserve)",
    )  # fmt: skip
    serve.add_argument(
        "--cuda-graphs",
        action="store_true",
        default=_env("cuda-graphs", False, _flag),
        help="capture and replay one CUDA graph per power-of-two batch bucket (inputs padded)",
    )
    serve.add_argument(
        "--gpu-mem-limit-mb", type=int, default=_env("gpu-mem-limit-mb", 0, int),
        help="cap on each session's CUDA memory arena (0 = none)",
    )  # fmt: skip
    serve.add_argument(
        "--max-body-mb",
        type=float,
        default=_env("max-body-mb", 64.0, float),
        help="largest accepted request body (413 above it)",
    )
    serve.add_argument(
        "--max-json-body-mb",
        type=float,
        default=_env("max-json-body-mb", 16.0, float),
        help="largest JSON part of a request (413 above it; big tensors go faster as binary)",
    )
    serve.add_argument(
        "--shutdown-grace-s",
        type=float,
        default=_env("shutdown-grace-s", 30.0, float),
        help="how long SIGTERM waits for in-flight requests",
    )
    serve.add_argument(
        "--cache-size-mb",
        type=float,
        default=_env("cache-size-mb", 0.0, float),
        help="in-process response cache size (0 = off; see docs/caching.md)",
    )
    serve.add_argument(
        "--redis-url",
        default=_env("redis-url", None),
        help="shared response cache tier, e.g. redis://host:6379/0",
    )
    serve.add_argument(
        "--cache-ttl-s", type=float, default=_env("cache-ttl-s", 300.0, float),
        help="lifetime of Redis cache entries",
    )  # fmt: skip
    serve.add_argument(
        "--redis-timeout-ms", type=float, default=_env("redis-timeout-ms", 50.0, float),
        help="a slower Redis call counts as a miss",
    )  # fmt: skip
    serve.add_argument(
        "--redis-retry-s", type=float, default=_env("redis-retry-s", 5.0, float),
        help="how long Redis is skipped after repeated failures",
    )  # fmt: skip
    serve.add_argument(
        "--no-cache",
        action="store_true",
        default=_env("no-cache", False, _flag),
        help="the model's outputs are not a pure function of its inputs: never cache them",
    )
    serve.add_argument(
        "--access-log",
        action="store_true",
        default=_env("access-log", False, _flag),
        help="one JSON line per request (request id, trace id, status, latency, batch, cache)",
    )
    serve.add_argument(
        "--api-key",
        default=_env("api-key", None),
        help="require 'Authorization: Bearer KEY' (health probes stay public); "
        "prefer BATCHSERVE_API_KEY, since flags show in process lists",
    )
    serve.add_argument(
        "--protect-metrics",
        action="store_true",
        default=_env("protect-metrics", False, _flag),
        help="require the API key on /metrics too",
    )
    serve.add_argument(
        "--request-timeout-ms",
        type=float,
        default=_env("request-timeout-ms", 0.0, float),
        help="default per-request deadline (504 past it; 0 = none); a request's own "
        "parameters.timeout (microseconds) can only shorten it",
    )
    serve.add_argument(
        "--body-timeout-s",
        type=float,
        default=_env("body-timeout-s", 30.0, float),
        help="a client that takes longer to send its request body gets 408 (slow clients)",
    )
    serve.add_argument(
        "--header-timeout-s", type=float, default=_env("header-timeout-s", 30.0, float),
        help="a connection that started a request and has not finished its headers within "
        "this gets 408 and is closed",
    )  # fmt: skip
    serve.add_argument(
        "--keepalive-timeout-s", type=float, default=_env("keepalive-timeout-s", 75.0, float),
        help="an idle keep-alive connection is closed after this",
    )  # fmt: skip
    serve.add_argument(
        "--max-connections", type=int, default=_env("max-connections", 0, int),
        help="open connections past this get 503 + Retry-After and are closed "
        "(0: soft RLIMIT_NOFILE - max(256, RLIMIT_NOFILE / 4))",
    )  # fmt: skip
    serve.add_argument(
        "--max-active-requests", type=int, default=_env("max-active-requests", -1, int),
        help="requests handled at once; a new one past it waits unread in its connection, "
        "oldest first, until one finishes (0: no cap; default: 2 x the largest "
        "--max-batch-size, at least 128)",
    )  # fmt: skip
    serve.add_argument(
        "--max-inputs", type=int, default=_env("max-inputs", 64, int),
        help="input tensors one request may carry (400 above it)",
    )  # fmt: skip
    serve.add_argument(
        "--max-tensor-elements", type=int, default=_env("max-tensor-elements", 1 << 24, int),
        help="elements one input tensor may declare (413 above it)",
    )  # fmt: skip
    serve.add_argument(
        "--max-response-mb", type=float, default=_env("max-response-mb", 64.0, float),
        help="largest response body (413 above it, refused before the model runs when the "
        "outputs' shapes tell their size)",
    )  # fmt: skip
    serve.add_argument(
        "--max-loop-lag-ms", type=float, default=_env("max-loop-lag-ms", 50.0, float),
        help="shed new requests (429) while the event loop runs this late (0 = never)",
    )  # fmt: skip
    serve.add_argument(
        "--replace-after-failures", type=int, default=_env("replace-after-failures", 5, int),
        help="rebuild a session after this many failed runs in a row (0 = never)",
    )  # fmt: skip
    serve.add_argument(
        "--stall-timeout-s", type=float, default=_env("stall-timeout-s", 120.0, float),
        help="one run longer than this fails the liveness probe (wedged engine; 0 = never)",
    )  # fmt: skip
    serve.add_argument(
        "--handler", default=_env("handler", None),
        help="pre/post-processing: package.module:Class or image-classification "
        "(docs/handlers.md)",
    )  # fmt: skip
    serve.add_argument(
        "--handler-option", action="append", metavar="KEY=VALUE",
        default=[o for o in _env("handler-options", "").split(",") if o.strip()],
        help="an option for the handler's setup (repeatable), e.g. top_k=3",
    )  # fmt: skip
    serve.add_argument(
        "--handler-max-pending", type=int, default=_env("handler-max-pending", 0, int),
        help="requests waiting for or in the handler executor before 429 (0 = 16 per worker)",
    )  # fmt: skip
    serve.add_argument(
        "--handler-executor", choices=["thread", "process"],
        default=_env("handler-executor", "thread"),
        help="where handler code runs: threads (work that releases the GIL) or processes",
    )  # fmt: skip
    serve.add_argument(
        "--handler-workers", type=int, default=_env("handler-workers", 0, int),
        help="handler threads or processes (0 = the CPUs this process may use)",
    )  # fmt: skip
    serve.add_argument(
        "--workers", type=int, default=_env("workers", 1, int),
        help="server processes sharing the port, each with its own engines and batching "
        "(docs/gpu.md: instances vs workers)",
    )  # fmt: skip
    serve.add_argument(
        "--metrics-port", type=int, default=_env("metrics-port", None, int),
        help="with --workers N, worker i also listens on this port + i, so each worker's "
        "/metrics can be scraped on its own",
    )  # fmt: skip
    serve.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)  # --workers
    serve.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)  # set by --workers
    serve.add_argument(
        "--log-level",
        default=_env("log-level", "info"),
        choices=["debug", "info", "warning", "error"],
    )


def _add_bench(commands: Any) -> None:
    bench = commands.add_parser(
        "bench",
        help="load-test any Open Inference Protocol server (open or closed loop)",
        description="Open loop (--rate) measures latency from each request's scheduled send "
        "time; closed loop (--concurrency) runs N callers back to back.",
    )
    bench.add_argument("url", nargs="?", help="server base URL, e.g. http://127.0.0.1:8000")
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
    bench.add_argument("--binary", action="store_true", help="binary tensor extension")
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
        "--api-key", default=_env("api-key", None),
        help="send Authorization: Bearer KEY (default: $BATCHSERVE_API_KEY)",
    )  # fmt: skip
    bench.add_argument("--json", dest="json_out", help="write the report(s) to this file")
    bench.add_argument(
        "--sweep",
        action="store_true",
        help="find the highest rate whose p99 stays under --slo-p99-ms",
    )
    bench.add_argument("--slo-p99-ms", type=float, default=100.0)
    bench.add_argument("--start-rate", type=float, default=500.0)
    bench.add_argument("--max-rate", type=float, default=200_000.0)
    bench.add_argument("--bisect-steps", type=int, default=4)
    bench.add_argument(
        "--noop",
        action="store_true",
        help="measure the load generator's own ceiling on a built-in no-op server",
    )


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
    from batchserve.app import Server, serve_until_signalled
    from batchserve.engine import Engine
    from batchserve.handlers.config import HandlerConfig
    from batchserve.repository import HandlerLimits, ModelRepository, engine_factory

    try:
        batch = BatchConfig(
            args.max_batch_size, args.max_latency_ms, args.max_queue_rows, args.max_shape_groups
        )
        runtime = RuntimeConfig(
            args.instances,
            args.intra_op_threads,
            args.device,
            spin={"on": True, "off": False}.get(args.spin),
            replace_after_failures=args.replace_after_failures,
            stall_timeout_s=args.stall_timeout_s,
            io_binding={"on": True, "off": False}.get(args.io_binding),
            trt=args.trt,
            fp16=args.fp16,
            trt_cache_dir=args.trt_cache_dir,
            build_cache_dir=args.build_cache_dir,
            cuda_graphs=args.cuda_graphs,
            gpu_mem_limit_mb=args.gpu_mem_limit_mb,
        )
        cache = CacheConfig(
            size_mb=args.cache_size_mb,
            redis_url=args.redis_url,
            ttl_s=args.cache_ttl_s,
            redis_timeout_ms=args.redis_timeout_ms,
            redis_retry_after_s=args.redis_retry_s,
            cacheable=not args.no_cache,
        )
        server_config = ServerConfig(
            args.host,
            args.port,
            int(args.max_body_mb * 1024 * 1024),
            args.shutdown_grace_s,
            max_json_bytes=int(args.max_json_body_mb * 1024 * 1024),
            access_log=args.access_log,
            api_key=args.api_key,
            metrics_public=not args.protect_metrics,
            request_timeout_ms=args.request_timeout_ms,
            body_timeout_s=args.body_timeout_s,
            header_timeout_s=args.header_timeout_s,
            keepalive_timeout_s=args.keepalive_timeout_s,
            max_connections=args.max_connections,
            max_active_requests=_max_active_requests(args),
            max_inputs=args.max_inputs,
            max_tensor_elements=args.max_tensor_elements,
            max_response_bytes=int(args.max_response_mb * 1024 * 1024),
            max_loop_lag_ms=args.max_loop_lag_ms,
            reuse_port=args.reuse_port,
            extra_port=args.metrics_port if args.reuse_port else None,
        )
    except ValueError as err:
        return _fail(str(err))
    if (args.model is None) == (args.model_repository is None):
        return _fail("give a model file or --model-repository DIR (one of them)")
    if args.workers < 1:
        return _fail(f"--workers must be >= 1, got {args.workers}")
    if args.workers > 1:
        from batchserve.workers import Supervisor, WorkerPlan, worker_argv

        plan = WorkerPlan(args.workers, worker_argv(serve_argv), args.host, args.port,
                          args.shutdown_grace_s, args.metrics_port)  # fmt: skip
        try:
            return Supervisor(plan).run()
        except OSError as err:
            return _fail(f"cannot listen on {args.host}:{args.port}: {err.strerror or err}")
    try:
        # Handler calls get the same grace as requests when the server stops or a model goes,
        # and what a handler makes the limits a client's own tensors and answers get.
        handler = (
            replace(
                HandlerConfig.from_flags(
                    args.handler,
                    args.handler_option,
                    args.handler_executor,
                    args.handler_workers,
                    args.handler_max_pending,
                ),
                drain_timeout_s=args.shutdown_grace_s,
                max_elements=args.max_tensor_elements,
                max_answer_bytes=server_config.max_response_bytes,
            )
            if args.handler
            else None
        )
        handler_limits = HandlerLimits(
            args.handler_executor,
            args.handler_workers,
            args.handler_max_pending,
            args.shutdown_grace_s,
            args.max_tensor_elements,
            server_config.max_response_bytes,
        )
    except ValueError as err:
        return _fail(str(err))
    # A worker's repository is one of several: its load/unload API cannot reach the others.
    shared = args.ready_fd is not None
    if args.model_repository is not None:
        repository = ModelRepository.from_directory(
            Path(args.model_repository),
            engine_factory(batch, runtime, cache, handler, handler_limits=handler_limits),
            poll_s=args.repository_poll_s,
            drain_timeout_s=args.shutdown_grace_s,
            shared=shared,
        )
    else:
        engine = Engine(args.model, batch, runtime, name=args.name, cache=cache, handler=handler)
        repository = ModelRepository([engine], drain_timeout_s=args.shutdown_grace_s, shared=shared)
    server = Server(repository, server_config)
    try:
        ready = serve_until_signalled(
            server, on_ready=lambda: _on_ready(args.ready_fd), worker=args.ready_fd is not None
        )
        _run(ready)
    except (ModelLoadError, DeviceUnavailable) as err:
        return _fail(err.message)
    except OSError as err:  # e.g. the port is taken
        return _fail(f"cannot listen on {args.host}:{args.port}: {err.strerror or err}")
    return 0


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
    from batchserve.bench.command import BenchError, noop_server
    from batchserve.bench.runner import bench

    if args.noop:
        with noop_server() as url:
            try:
                return bench(args, url, args.model or "noop")
            except (BenchError, ValueError) as err:
                return _fail(str(err))
    if not args.url:
        return _fail("bench needs a server URL (or --noop)")
    try:
        return bench(args, args.url, args.model)
    except (BenchError, ValueError) as err:
        return _fail(str(err))


def _tune(args: argparse.Namespace) -> int:
    import json

    from batchserve.bench.command import BenchError
    from batchserve.bench.loadgen import LoadConfig
    from batchserve.bench.tune import table, tune

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
    print("\n" + table(trials))
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
