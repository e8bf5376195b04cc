"""Per-model configuration in a model repository: `<model>/config.toml`, all keys optional.

max_batch_size = 32          # batching knobs; the server's flags are the defaults
max_latency_ms = 2.0
max_queue_rows = 4096
instances = 2                # session pool
intra_op_threads = 0
device = "cuda:0"
cache = false                # never cache this model's outputs
handler = "pkg.module:Class" # optional pre/post-processing handler (docs/handlers.md)
handler_options = { top_k = "3" }  # its options, as --handler-option KEY=VALUE

[version_policy]             # which versions on disk are served (default: latest 1)
latest = 2                   # or: specific = ["1", "3"]   or: all = true

[traffic]                    # split requests that name no version (A/B tests, canaries)
weights = { "1" = 90, "2" = 10 }
sticky_header = "X-User-Id"  # requests with this header always reach the same version

[priority]                   # request priorities (parameters.priority; docs/batching.md)
levels = 2                   # 1 is the highest
default = 2                  # the level of a request that names none (default: the lowest)
share = 8                    # one run in 8 goes to the oldest request, whatever its level
[priority.level.1]           # a level's queue policy (every key optional)
max_queue_rows = 256         # 429 past it
timeout_ms = 50              # its requests' default deadline
on_timeout = "reject"        # or "delay": served after the requests still within theirs

[inputs.input]               # clients send this FP32 input as UINT8 (or FP16); the graph
datatype = "UINT8"           # computes (x * scale - mean) / std per channel (docs/gpu.md)
mean = [123.675, 116.28, 103.53]
std = [58.395, 57.12, 57.375]
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchserve.config import BatchConfig, Device, RuntimeConfig
from batchserve.errors import ModelLoadError
from batchserve.queue.priority import LevelPolicy, PriorityConfig

if TYPE_CHECKING:
    from batchserve.runtime.input_prefix import InputFormat

CONFIG_FILE = "config.toml"
DEFAULT_STICKY_HEADER = "X-User-Id"


@dataclass(frozen=True, slots=True)
class VersionPolicy:
    """Which of the versions on disk to serve: the `latest` N (by number), `specific` ones, or
    all of them. As in Triton, `latest` and `all` consider numbered versions only: a directory
    such as `1.bak` or `canary` is served only when `specific` names it."""

    latest: int | None = 1
    specific: tuple[str, ...] = ()
    all: bool = False

    def select(self, versions: list[str]) -> list[str]:
        ordered = sorted(versions, key=version_order)
        if self.specific:
            return [v for v in ordered if v in self.specific]
        numbered = [v for v in ordered if is_numbered(v)]
        if self.all:
            return numbered
        return numbered[-(self.latest or 1) :]


@dataclass(frozen=True, slots=True)
class TrafficSplit:
    """Weights per version for requests that name no version; a header can pin a user."""

    weights: tuple[tuple[str, float], ...] = ()
    sticky_header: str = DEFAULT_STICKY_HEADER


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The keys a model's config.toml may set; None means the server's default."""

    max_batch_size: int | None = None
    max_latency_ms: float | None = None
    max_queue_rows: int | None = None
    instances: int | None = None
    intra_op_threads: int | None = None
    device: Device | None = None
    cache: bool | None = None
    handler: str | None = None
    handler_options: tuple[tuple[str, str], ...] = ()
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    traffic: TrafficSplit | None = None
    priority: PriorityConfig | None = None
    inputs: tuple[InputFormat, ...] | None = None

    def batch(self, default: BatchConfig) -> BatchConfig:
        # replace(): settings config.toml cannot set (e.g. max_shape_groups) keep the server's.
        return replace(
            default,
            max_batch_size=_pick(self.max_batch_size, default.max_batch_size),
            max_latency_ms=_pick(self.max_latency_ms, default.max_latency_ms),
            max_queue_rows=_pick(self.max_queue_rows, default.max_queue_rows),
            priority=_pick(self.priority, default.priority),
        )

    def runtime(self, default: RuntimeConfig) -> RuntimeConfig:
        from dataclasses import replace

        return replace(
            default,
            instances=_pick(self.instances, default.instances),
            intra_op_threads=_pick(self.intra_op_threads, default.intra_op_threads),
            device=_pick(self.device, default.device),
            input_formats=_pick(self.inputs, default.input_formats),
        )


def _pick(value: Any, default: Any) -> Any:
    return default if value is None else value


def is_numbered(version: str) -> bool:
    # ASCII only: str.isdigit() also accepts "²" or "①", which int() refuses.
    return version.isascii() and version.isdigit()


def version_order(version: str) -> tuple[int, int | str]:
    """Named versions by name, then numbers in numeric order: the last is the highest number,
    so a named version (`canary`) is never the default while a numbered one is served."""
    return (1, int(version)) if is_numbered(version) else (0, version)


_TOP = {"max_batch_size": int, "max_latency_ms": float, "max_queue_rows": int, "instances": int,
        "intra_op_threads": int, "device": str, "cache": bool, "handler": str,
        "handler_options": dict, "version_policy": dict, "traffic": dict,
        "inputs": dict, "priority": dict}  # fmt: skip


def load_model_config(model_dir: Path) -> ModelConfig:
    """The model's config.toml, or defaults when there is none; ModelLoadError when invalid."""
    path = model_dir / CONFIG_FILE
    if not path.exists():
        return ModelConfig()
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ModelLoadError(f"{path}: {err}") from None
    return parse_model_config(raw, str(path))


def parse_model_config(raw: dict[str, Any], where: str = "config") -> ModelConfig:
    values = _checked(raw, _TOP, where)
    try:
        if "device" in values:
            values["device"] = Device.parse(values["device"])
        if "handler_options" in values:
            values["handler_options"] = tuple(
                sorted((str(k), str(v)) for k, v in values["handler_options"].items())
            )
        if "version_policy" in values:
            values["version_policy"] = _policy(values["version_policy"], where)
        if "traffic" in values:
            values["traffic"] = _traffic(values["traffic"], where)
        if "inputs" in values:
            values["inputs"] = _inputs(values["inputs"], where)
        if "priority" in values:
            values["priority"] = _priority(values["priority"], where)
        config = ModelConfig(**values)
        # Validate the numbers the same way the server's own configs do.
        config.batch(BatchConfig())
        config.runtime(RuntimeConfig())
    except ValueError as err:
        raise ModelLoadError(f"{where}: {err}") from None
    return config


def _policy(raw: dict[str, Any], where: str) -> VersionPolicy:
    if len(raw) != 1 or next(iter(raw)) not in ("latest", "specific", "all"):
        raise ModelLoadError(f"{where}: version_policy needs exactly one of latest, specific, all")
    (key, value), = raw.items()  # fmt: skip
    if key == "latest":
        if type(value) is not int or value < 1:
            raise ModelLoadError(f"{where}: version_policy.latest must be an integer >= 1")
        return VersionPolicy(latest=value)
    if key == "specific":
        if type(value) is not list or not value or not all(type(v) is str for v in value):
            raise ModelLoadError(f"{where}: version_policy.specific must be a list of strings")
        return VersionPolicy(latest=None, specific=tuple(value))
    if value is not True:
        raise ModelLoadError(f"{where}: version_policy.all must be true")
    return VersionPolicy(latest=None, all=True)


def _traffic(raw: dict[str, Any], where: str) -> TrafficSplit:
    unknown = sorted(set(raw) - {"weights", "sticky_header"})
    if unknown:
        raise ModelLoadError(f"{where}: unknown traffic key(s) {unknown}")
    weights = raw.get("weights")
    if type(weights) is not dict or not weights:
        raise ModelLoadError(f"{where}: traffic.weights must be a table of version = weight")
    pairs: list[tuple[str, float]] = []
    for version, weight in weights.items():
        if type(weight) not in (int, float) or weight < 0:
            raise ModelLoadError(f"{where}: traffic weight of version {version} must be >= 0")
        pairs.append((str(version), float(weight)))
    if not sum(w for _, w in pairs) > 0:
        raise ModelLoadError(f"{where}: traffic weights must not all be 0")
    header = raw.get("sticky_header", DEFAULT_STICKY_HEADER)
    if type(header) is not str or not header:
        raise ModelLoadError(f"{where}: traffic.sticky_header must be a header name")
    return TrafficSplit(tuple(sorted(pairs, key=lambda p: version_order(p[0]))), header)


def _inputs(raw: dict[str, Any], where: str) -> tuple[InputFormat, ...]:
    # Imported here: the runtime package loads ONNX Runtime.
    from batchserve.runtime.input_prefix import input_format

    formats = []
    for name, table in raw.items():
        if type(table) is not dict:
            raise ModelLoadError(f"{where}: inputs.{name} must be a table (datatype = ...)")
        formats.append(input_format(name, table))
    return tuple(formats)


_PRIORITY = {"levels": int, "default": int, "share": int, "level": dict}
_LEVEL = {"max_queue_rows": int, "timeout_ms": float, "on_timeout": str}


def _priority(raw: dict[str, Any], where: str) -> PriorityConfig:
    """`[priority]` and its `[priority.level.N]` tables; ValueError (reported with `where`)
    for what PriorityConfig and LevelPolicy refuse."""
    options = _checked(raw, _PRIORITY, f"{where}: priority")
    levels = options.get("levels", 2)
    tables = options.pop("level", {})
    bad = sorted(k for k in tables if not (k.isascii() and k.isdigit() and 1 <= int(k) <= levels))
    if bad:
        raise ModelLoadError(
            f"{where}: priority.level: {bad} are not levels from 1 to {levels} (priority.levels)"
        )
    policies: list[LevelPolicy] = []
    for level in range(1, max(map(int, tables), default=0) + 1):
        table = tables.get(str(level), {})
        if type(table) is not dict:
            raise ModelLoadError(f"{where}: priority.level.{level} must be a table")
        try:
            policies.append(
                LevelPolicy(**_checked(table, _LEVEL, f"{where}: priority.level.{level}"))
            )
        except ValueError as err:
            raise ModelLoadError(f"{where}: priority.level.{level}: {err}") from None
    try:
        return PriorityConfig(**options, policies=tuple(policies))
    except ValueError as err:
        raise ModelLoadError(f"{where}: priority: {err}") from None


def _checked(raw: dict[str, Any], kinds: dict[str, type], where: str) -> dict[str, Any]:
    """The keys of one TOML table, each of its kind (an integer where a float is wanted is
    read as one); ModelLoadError for a key not in `kinds` or a value of another type."""
    unknown = sorted(set(raw) - set(kinds))
    if unknown:
        raise ModelLoadError(f"{where}: unknown key(s) {unknown}; known: {sorted(kinds)}")
    values: dict[str, Any] = {}
    for key, kind in kinds.items():
        if key not in raw:
            continue
        value = raw[key]
        if kind is float and type(value) is int:
            value = float(value)
        if type(value) is not kind:
            raise ModelLoadError(f"{where}: {key} must be a {kind.__name__}, got {value!r}")
        values[key] = value
    return values
