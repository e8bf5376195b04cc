"""How a model's handler is loaded and run: a frozen, validated config."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from batchserve.config import available_cpus

ExecutorKind = Literal["thread", "process"]
EXECUTOR_KINDS: tuple[ExecutorKind, ...] = ("thread", "process")

# Requests allowed to wait for (or run in) the handler executor, per worker, when not set:
# enough to keep every worker busy through bursts, few enough that a queued request still
# meets a deadline of a few hundred milliseconds at a few milliseconds of work each.
PENDING_PER_WORKER = 16


@dataclass(frozen=True, slots=True)
class HandlerConfig:
    """spec: `package.module:Class` or a built-in name (`image-classification`).
    options: `KEY=VALUE` pairs passed to the handler's `setup`.
    executor: `thread` (work that releases the GIL, as image decoding does) or `process`.
    workers: threads or processes; 0 = the CPUs this process may use.
    max_pending: requests in the executor (waiting or running) before new ones get 429;
        0 = 16 per worker.
    drain_timeout_s: when the model is unloaded or the server stops, how long handler calls
        already submitted may still run; past it they are abandoned (threads) or killed
        (processes) and their requests answered 503. The CLI sets it to --shutdown-grace-s.
    max_elements: elements in any one tensor `preprocess` makes (413 above it), counted as
        the V2 decoder counts a client's tensors (zero dimensions as one): a handler can make
        a huge tensor from a small body. The CLI sets it to --max-tensor-elements.
    max_answer_bytes: a `postprocess` answer's JSON encoding, measured where it is made (on
        the worker, before it crosses to the server's process or its event loop); 413 above
        it. The CLI sets it to --max-response-mb.
    """

    spec: str
    options: tuple[tuple[str, str], ...] = ()
    executor: ExecutorKind = "thread"
    workers: int = 0
    max_pending: int = 0
    drain_timeout_s: float = 30.0
    max_elements: int = 1 << 24
    max_answer_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        if not self.spec.strip():
            raise ValueError("handler must be 'package.module:Class' or a built-in name")
        if self.executor not in EXECUTOR_KINDS:
            raise ValueError(f"handler executor must be one of {EXECUTOR_KINDS}")
        if self.workers < 0:
            raise ValueError(f"handler workers must be >= 0, got {self.workers}")
        if self.max_pending < 0:
            raise ValueError(f"handler max_pending must be >= 0, got {self.max_pending}")
        if self.max_elements < 1 or self.max_answer_bytes < 1:
            raise ValueError("handler max_elements and max_answer_bytes must be >= 1")
        if not self.drain_timeout_s >= 0:
            raise ValueError(f"handler drain_timeout_s must be >= 0, got {self.drain_timeout_s}")
        keys = [k for k, _ in self.options]
        if len(set(keys)) != len(keys):
            raise ValueError(f"handler option given twice: {sorted(keys)}")

    @classmethod
    def from_flags(
        cls,
        spec: str,
        options: Iterable[str] = (),
        executor: ExecutorKind = "thread",
        workers: int = 0,
        max_pending: int = 0,
    ) -> HandlerConfig:
        """From the CLI's `--handler-option KEY=VALUE` strings."""
        return cls(spec, tuple(parse_option(o) for o in options), executor, workers, max_pending)

    @property
    def option_map(self) -> Mapping[str, str]:
        return dict(self.options)

    def resolved_workers(self) -> int:
        return self.workers or available_cpus()

    def resolved_max_pending(self) -> int:
        return self.max_pending or PENDING_PER_WORKER * self.resolved_workers()


def parse_option(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"handler option must be KEY=VALUE, got {text!r}")
    return key, value.strip()
