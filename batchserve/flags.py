"""The `serve` flags: one table row each, naming the settings field it sets.

A flag's default is its field's default (in the flag's own units), so each is written once,
in the frozen config dataclasses; a new setting is one field and one row. Every flag can also
be set by an environment variable `BATCHSERVE_<FLAG>`; a flag on the command line wins.
"""

from __future__ import annotations

import argparse
import operator
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from batchserve.config import BatchConfig, CacheConfig, Device, RuntimeConfig, ServerConfig
from batchserve.settings import ServeSettings, field_default
from batchserve.tracing import TracingConfig

EXIT_USAGE = 2
MiB = 1024 * 1024
AUTO = -1  # --max-active-requests: derived from --max-batch-size


def env(flag: str, default: Any, kind: Callable[[str], Any] = str) -> Any:
    """`BATCHSERVE_<FLAG>` read as `kind`, else `default`; a bad value exits with usage."""
    name = "BATCHSERVE_" + flag.upper().replace("-", "_")
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return kind(value)
    except ValueError:
        print(f"batchserve: error: {name}={value!r} is invalid", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


def switch(text: str) -> bool:
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


def _port_or_off(text: str) -> int | None:
    value = text.strip().lower()
    if value in {"off", "none"}:
        return None
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port (0..65535) or 'off', got {text!r}")
    return port


def _comma_list(text: str) -> list[str]:
    return [item for item in text.split(",") if item.strip()]


@dataclass(frozen=True, slots=True)
class Units:
    """How a flag's value becomes its field's (`to_field`) and a field's default the flag's."""

    to_field: Callable[[Any], Any]
    to_flag: Callable[[Any], Any]


SAME = Units(lambda value: value, lambda value: value)
MEBIBYTES = Units(lambda mb: int(mb * MiB), lambda size: size / MiB)
# A field that is None until set (automatic) is the flag's `auto`.
AUTO_ON_OFF = Units({"on": True, "off": False}.get, {None: "auto", True: "on", False: "off"}.get)
NEGATED = Units(operator.not_, operator.not_)  # --no-cache sets cacheable=False
LISTED = Units(tuple, list)
DEVICE = Units(lambda device: device, str)


def _input_formats(texts: list[str] | None) -> tuple[Any, ...]:
    # Imported here: the runtime package loads ONNX Runtime, which other commands must not.
    from batchserve.runtime.input_prefix import parse_input_format

    return tuple(parse_input_format(text) for text in texts or ())


# None when there are none: argparse's "append" would otherwise add to the default list.
INPUT_FORMATS = Units(_input_formats, lambda formats: [s.describe() for s in formats] or None)

_FROM_FIELD: Any = object()


@dataclass(frozen=True, slots=True)
class Flag:
    """name: `--some-flag`, or a bare name for the positional argument.
    owner / field: the settings dataclass and field it sets (field: by default the flag's
        name); owner None: the CLI's own, with an explicit `default`.
    kind: argparse type (by default a number default's type; a bool default is a switch).
    default: only where the CLI's default is not the field's, with the reason beside it.
    env: the variable's name after BATCHSERVE_ ("": the flag's; None: not read).
    repeatable: the flag may be given many times; its variable is comma-separated."""

    name: str
    owner: type | None
    help: str | None = None
    field: str = ""
    units: Units = SAME
    kind: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    default: Any = _FROM_FIELD
    env: str | None = ""
    repeatable: bool = False
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")

    @property
    def field_name(self) -> str:
        return self.field or self.dest

    def cli_default(self) -> Any:
        if self.default is not _FROM_FIELD or self.owner is None:
            return self.default
        return self.units.to_flag(field_default(self.owner, self.field_name))

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        default = self.cli_default()
        options: dict[str, Any] = {"help": self.help}
        kind = self.kind
        if kind is None and type(default) in (int, float):
            kind = type(default)
        if isinstance(default, bool):
            options["action"], kind = "store_true", switch
        elif self.repeatable:
            options["action"], options["metavar"], kind = "append", self.metavar, _comma_list
        elif kind is not None:
            options["type"] = kind
        if self.env is not None:
            # Numbers and switches are read here, so that a bad value names its variable;
            # text (a device name) is left to argparse, as a command-line value is.
            stem = self.env or self.dest.replace("_", "-")
            default = env(stem, default, kind if kind in (int, float, switch, _comma_list) else str)
        if self.choices is not None:
            options["choices"] = list(self.choices)
        if self.name.startswith("-"):
            parser.add_argument(self.name, default=default, **options)
        else:
            parser.add_argument(self.name, nargs="?", default=default, **options)


SERVE_FLAGS: tuple[Flag, ...] = (
    Flag("model", ServeSettings, "path to the .onnx model file (or use --model-repository)",
         env=None),
    Flag("--model-repository", ServeSettings,
         "serve every model in DIR/<model>/<version>/model.onnx (docs/models.md)"),
    Flag("--repository-poll-s", ServeSettings,
         "rescan the model repository this often and apply changes (0 = never)"),
    Flag("--name", ServeSettings, "model name in URLs (default: file stem)"),
    # Reachable from outside a container; the library's ServerConfig stays on loopback.
    Flag("--host", ServerConfig, default="0.0.0.0"),
    Flag("--port", ServerConfig),
    Flag("--grpc-port", ServerConfig,
         "gRPC port (0: any free port, logged at start; off: no gRPC)", kind=_port_or_off),
    Flag("--max-batch-size", BatchConfig,
         "most rows in one ONNX Runtime run (default %(default)s)"),
    Flag("--max-latency-ms", BatchConfig,
         "longest a request is held for company while a session is free"),
    Flag("--max-queue-rows", BatchConfig, "rows allowed to wait; more are rejected with 429"),
    Flag("--max-shape-groups", BatchConfig,
         "distinct input shapes allowed to wait at once; a new one past it gets 429"),
    Flag("--instances", RuntimeConfig,
         "ONNX Runtime sessions in the pool (one thread / CUDA stream each)"),
    Flag("--intra-op-threads", RuntimeConfig,
         "threads per session (0: cores / instances on CPU, 1 on CUDA)"),
    Flag("--spin", RuntimeConfig,
         ("ORT threads spin between operators: faster for large models, costs idle CPU "
          "(auto: on for model files over 8 MB)"),
         units=AUTO_ON_OFF, choices=("auto", "on", "off")),
    Flag("--device", RuntimeConfig, "cpu or cuda[:N]", units=DEVICE, kind=_device),
    Flag("--io-binding", RuntimeConfig,
         ("run through ONNX Runtime I/O binding with reused buffers (auto: on for CUDA; "
          "on CPU a plain run measured faster)"),
         units=AUTO_ON_OFF, choices=("auto", "on", "off")),
    Flag("--trt", RuntimeConfig,
         "TensorRT execution provider before CUDA (falls back to CUDA when absent)"),
    Flag("--fp16", RuntimeConfig,
         ("half precision: TensorRT's FP16 with --trt, else the model is converted once "
          "(needs batchserve[gpu]) and the result cached")),
    Flag("--input-format", RuntimeConfig,
         ("clients send this FP32 input as UINT8 or FP16, cast and normalised by the graph "
          "as (x * scale - mean) / std (repeatable), e.g. "
          "input=UINT8:mean=123.675/116.28/103.53:std=58.395/57.12/57.375"),
         field="input_formats", units=INPUT_FORMATS, env="input-formats", repeatable=True,
         metavar="NAME=TYPE[:scale=S][:mean=M/...][:std=S/...][:channel_axis=A]"),
    Flag("--trt-cache-dir", RuntimeConfig,
         "TensorRT engine cache, so restarts do not rebuild (default: BUILD_CACHE_DIR/trt)"),
    Flag("--build-cache-dir", RuntimeConfig,
         "FP16 conversions and TensorRT engines (default: ~/.cache/batchserve)"),
    Flag("--cuda-graphs", RuntimeConfig,
         "capture and replay one CUDA graph per power-of-two batch bucket (inputs padded)"),
    Flag("--gpu-mem-limit-mb", RuntimeConfig,
         "cap on each session's CUDA memory arena (0 = none)"),
    Flag("--max-body-mb", ServerConfig, "largest accepted request body (413 above it)",
         field="max_body_bytes", units=MEBIBYTES),
    Flag("--max-json-body-mb", ServerConfig,
         "largest JSON part of a request (413 above it; big tensors go faster as binary)",
         field="max_json_bytes", units=MEBIBYTES),
    Flag("--shutdown-grace-s", ServerConfig, "how long SIGTERM waits for in-flight requests"),
    Flag("--cache-size-mb", CacheConfig,
         "in-process response cache size (0 = off; see docs/caching.md)", field="size_mb"),
    Flag("--redis-url", CacheConfig,
         ("shared response cache tier, e.g. redis://host:6379/0, or rediss://:KEY@host:10000/0 "
          "(TLS; ?ssl_ca_certs=FILE for a private CA); prefer BATCHSERVE_REDIS_URL for a key")),
    Flag("--cache-ttl-s", CacheConfig, "lifetime of Redis cache entries", field="ttl_s"),
    Flag("--redis-timeout-ms", CacheConfig, "a slower Redis call counts as a miss"),
    Flag("--redis-retry-s", CacheConfig, "how long Redis is skipped after repeated failures",
         field="redis_retry_after_s"),
    Flag("--no-cache", CacheConfig,
         "the model's outputs are not a pure function of its inputs: never cache them",
         field="cacheable", units=NEGATED),
    Flag("--access-log", ServerConfig,
         "one JSON line per request (request id, trace id, status, latency, batch, cache)"),
    Flag("--api-key", ServerConfig,
         ("require 'Authorization: Bearer KEY' (health probes stay public); "
          "prefer BATCHSERVE_API_KEY, since flags show in process lists")),
    Flag("--protect-metrics", ServerConfig, "require the API key on /metrics too",
         field="metrics_public", units=NEGATED),
    Flag("--request-timeout-ms", ServerConfig,
         ("default per-request deadline (504 past it; 0 = none); a request's own "
          "parameters.timeout (microseconds) can only shorten it")),
    Flag("--body-timeout-s", ServerConfig,
         "a client that takes longer to send its request body gets 408 (slow clients)"),
    Flag("--header-timeout-s", ServerConfig,
         ("a connection that started a request and has not finished its headers within "
          "this gets 408 and is closed")),
    Flag("--keepalive-timeout-s", ServerConfig,
         "an idle keep-alive connection is closed after this"),
    Flag("--max-connections", ServerConfig,
         ("open connections past this get 503 + Retry-After and are closed "
          "(0: soft RLIMIT_NOFILE - max(256, RLIMIT_NOFILE / 4))")),
    Flag("--max-active-requests", ServerConfig,
         ("requests handled at once; a new one past it waits unread in its connection, "
          "oldest first, until one finishes (0: no cap; default: 2 x the largest "
          "--max-batch-size, at least 128)"),
         default=AUTO),
    Flag("--max-inputs", ServerConfig, "input tensors one request may carry (400 above it)"),
    Flag("--max-tensor-elements", ServerConfig,
         "elements one input tensor may declare (413 above it)"),
    Flag("--max-response-mb", ServerConfig,
         ("largest response body (413 above it, refused before the model runs when the "
          "outputs' shapes tell their size)"),
         field="max_response_bytes", units=MEBIBYTES),
    Flag("--max-loop-lag-ms", ServerConfig,
         "shed new requests (429) while the event loop runs this late (0 = never)"),
    Flag("--replace-after-failures", RuntimeConfig,
         "rebuild a session after this many failed runs in a row (0 = never)"),
    Flag("--stall-timeout-s", RuntimeConfig,
         "one run longer than this fails the liveness probe (wedged engine; 0 = never)"),
    Flag("--handler", ServeSettings,
         ("pre/post-processing: package.module:Class or image-classification "
          "(docs/handlers.md)")),
    Flag("--handler-option", ServeSettings,
         "an option for the handler's setup (repeatable), e.g. top_k=3",
         field="handler_options", units=LISTED, env="handler-options", repeatable=True,
         metavar="KEY=VALUE"),
    Flag("--handler-max-pending", ServeSettings,
         "requests waiting for or in the handler executor before 429 (0 = 16 per worker)"),
    Flag("--handler-executor", ServeSettings,
         "where handler code runs: threads (work that releases the GIL) or processes",
         choices=("thread", "process")),
    Flag("--handler-workers", ServeSettings,
         "handler threads or processes (0 = the CPUs this process may use)"),
    Flag("--workers", ServeSettings,
         ("server processes sharing the port, each with its own engines and batching "
          "(docs/gpu.md: instances vs workers)")),
    Flag("--metrics-port", ServeSettings,
         ("with --workers N, worker i also listens on this port + i, so each worker's "
          "/metrics can be scraped on its own"),
         kind=int),
    # Set by the --workers supervisor on each worker it starts, never by hand.
    Flag("--reuse-port", ServerConfig, argparse.SUPPRESS, env=None),
    Flag("--ready-fd", None, argparse.SUPPRESS, kind=int, default=None, env=None),
    Flag("--log-level", ServeSettings, choices=("debug", "info", "warning", "error")),
    Flag("--otel-endpoint", TracingConfig,
         ("send OpenTelemetry traces over OTLP/HTTP to this collector, e.g. "
          "http://collector:4318 (or set OTEL_EXPORTER_OTLP_ENDPOINT); off without either"),
         field="endpoint"),
    Flag("--otel-sample-ratio", TracingConfig,
         ("share of requests traced when the caller's traceparent does not decide "
          "(parent-based)"),
         field="sample_ratio"),
)  # fmt: skip


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    for flag in SERVE_FLAGS:
        flag.add_to(parser)


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    """The settings the parsed flags give; ValueError names the first invalid one."""
    sections = (BatchConfig, RuntimeConfig, CacheConfig, ServerConfig, TracingConfig, ServeSettings)
    values: dict[type, dict[str, Any]] = {owner: {} for owner in sections}
    for flag in SERVE_FLAGS:
        if flag.owner is not None:
            values[flag.owner][flag.field_name] = flag.units.to_field(getattr(args, flag.dest))
    batch = BatchConfig(**values[BatchConfig])
    runtime = RuntimeConfig(**values[RuntimeConfig])
    cache = CacheConfig(**values[CacheConfig])
    server = ServerConfig(**_server_values(values[ServerConfig], values[ServeSettings], batch))
    tracing = TracingConfig(**values[TracingConfig], from_environment=_otlp_endpoint_set())
    tracing.check_installed()
    return ServeSettings(
        batch=batch, runtime=runtime, cache=cache, server=server, tracing=tracing,
        **values[ServeSettings],
    )  # fmt: skip


def _otlp_endpoint_set() -> bool:
    """Whether the OpenTelemetry SDK's own variables name a collector for traces (and the SDK
    is not switched off): tracing is on then, without --otel-endpoint."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    names = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
    return any(os.environ.get(name, "").strip() for name in names)


def _server_values(
    server: Mapping[str, Any], own: Mapping[str, Any], batch: BatchConfig
) -> dict[str, Any]:
    derived = dict(server)
    if derived["max_active_requests"] < 0:
        # Room for two full batches, so the cap never starves the batcher; never below the
        # library's own default.
        floor = field_default(ServerConfig, "max_active_requests")
        derived["max_active_requests"] = max(floor, 2 * batch.max_batch_size)
    # A worker also listens on its own metrics port.
    derived["extra_port"] = own["metrics_port"] if derived["reuse_port"] else None
    return derived
