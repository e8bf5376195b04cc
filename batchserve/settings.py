"""What one `batchserve serve` is told: the part configs plus what to serve and how handlers run.

`ServeSettings` is what `batchserve.app.build_server` builds a server from. The CLI makes one
from flags and environment (`batchserve.flags`); tests and library users make one directly.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from batchserve.config import BatchConfig, CacheConfig, RuntimeConfig, ServerConfig
from batchserve.tracing import TracingConfig

if TYPE_CHECKING:
    from batchserve.handlers.config import ExecutorKind, HandlerConfig


def field_default(owner: type, name: str) -> Any:
    """The default of dataclass `owner`'s field `name`, so that it is written in one place."""
    for item in fields(owner):
        if item.name == name:
            if item.default is not MISSING:
                return item.default
            if item.default_factory is not MISSING:
                return item.default_factory()
            raise ValueError(f"{owner.__name__}.{name} has no default")
    raise ValueError(f"{owner.__name__} has no field {name!r}")


@dataclass(frozen=True, slots=True)
class ServeSettings:
    """Everything a server process is built from.

    model / model_repository: one .onnx file, or a directory of models (exactly one of them).
    repository_poll_s: rescan the repository this often (0 = never).
    name: the single model's name in URLs (None: the file stem).
    handler / handler_options: the server's handler spec and its `KEY=VALUE` options.
    handler_executor / handler_workers / handler_max_pending: how every handler runs, the
        server's handler and those a model's config.toml names alike.
    workers: server processes sharing the port; more than one is the CLI's supervisor's work
        (each of its processes builds one server from these settings).
    metrics_port: with several workers, worker i also listens on this port + i.
    tracing: OpenTelemetry traces (off unless it names where to send them).
    log_level: the CLI's logging level.
    """

    model: str | None = None
    model_repository: str | None = None
    repository_poll_s: float = 0.0
    name: str | None = None
    batch: BatchConfig = field(default_factory=BatchConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    handler: str | None = None
    handler_options: tuple[str, ...] = ()
    # HandlerConfig's defaults, restated: the handlers package loads ONNX Runtime, which the
    # CLI's other commands must not pay for.
    handler_executor: ExecutorKind = "thread"
    handler_workers: int = 0
    handler_max_pending: int = 0
    workers: int = 1
    metrics_port: int | None = None
    log_level: str = "info"

    def __post_init__(self) -> None:
        if (self.model is None) == (self.model_repository is None):
            raise ValueError("give a model file or --model-repository DIR (one of them)")
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.model_repository is not None and self.runtime.input_formats:
            # Input names belong to one model: each model's config.toml says its own.
            raise ValueError(
                "--input-format is for one model file; in a model repository, give each "
                "model its [inputs.NAME] table in config.toml"
            )
        self.handler_config()  # validates the handler settings, with a handler or without
        self.handler_run()

    def handler_run(self) -> HandlerConfig:
        """How every handler runs, the server's and those a model's config.toml names (under a
        placeholder spec)."""
        return self._handler("-", ())

    def handler_config(self) -> HandlerConfig | None:
        """The server's own handler (None without one)."""
        if not self.handler:
            return None
        from batchserve.handlers.config import parse_option

        options = tuple(parse_option(option) for option in self.handler_options)
        return self._handler(self.handler, options)

    def _handler(self, spec: str, options: tuple[tuple[str, str], ...]) -> HandlerConfig:
        # Imported here: the handlers package loads ONNX Runtime.
        from batchserve.handlers.config import HandlerConfig

        # Handler calls get the same grace as requests when the server stops or a model goes,
        # and what a handler makes the limits a client's own tensors and answers get.
        server = self.server
        return HandlerConfig(
            spec,
            options,
            self.handler_executor,
            self.handler_workers,
            self.handler_max_pending,
            server.shutdown_grace_s,
            max_elements=server.max_tensor_elements,
            max_answer_bytes=server.max_response_bytes,
        )
