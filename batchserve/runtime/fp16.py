"""Converting a model to FP16 on request, cached on disk by the source file's digest."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from batchserve.errors import ModelLoadError

log = logging.getLogger("batchserve.runtime")


def default_build_cache_dir() -> Path:
    """$XDG_CACHE_HOME/batchserve, else ~/.cache/batchserve."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(root) / "batchserve"


def fp16_model(model: bytes, digest: str, cache_dir: Path, source: str) -> bytes:
    """The FP16 version of `model` (inputs and outputs stay FP32): from the cache when this
    digest was converted before, else converted now and cached."""
    return built_once(
        cache_dir / "fp16" / f"{digest}.onnx",
        lambda: convert_fp16(model, source),
        reused=f"using the FP16 conversion of {source}",
        built=f"converted {source} to FP16 (inputs and outputs stay FP32)",
        what="the FP16 model",
    )


def built_once(
    cached: Path, build: Callable[[], bytes], *, reused: str, built: str, what: str
) -> bytes:
    """The bytes a build left at `cached` before (logged as `reused`), else `build()`, written
    there atomically for the next start (logged as `built`, with whether it was cached; `what`
    names it when it cannot be): the build cache of FP16 conversions and input prefixes, keyed
    by the caller's file name."""
    try:
        data = cached.read_bytes()
    except OSError:
        pass  # not built yet (or unreadable: build again)
    else:
        log.info("%s cached at %s", reused, cached)
        return data
    data = build()
    where = f"cached at {cached}" if _write_atomically(cached, data, what) else "not cached"
    log.info("%s, %s", built, where)
    return data


def convert_fp16(model: bytes, source: str) -> bytes:
    try:
        import onnx
        from onnxconverter_common import float16  # type: ignore[import-untyped]
    except ImportError as err:
        raise ModelLoadError(
            "--fp16 without --trt converts the model with onnxconverter-common, which is not "
            "installed: pip install 'batchserve[gpu]'"
        ) from err
    try:
        proto = onnx.load_from_string(model)
        # keep_io_types: clients keep sending and receiving FP32; Casts are added at the edges.
        converted = float16.convert_float_to_float16(proto, keep_io_types=True)
        data: bytes = converted.SerializeToString()
    except Exception as err:  # the converter raises assorted errors; translate at the boundary
        raise ModelLoadError(f"cannot convert {source} to FP16: {err}") from err
    return data


def _write_atomically(path: Path, data: bytes, what: str) -> bool:
    """Whether `data` is now at `path`; a failure is logged, not raised (the cache is optional)."""
    # Another replica may convert the same model into a shared cache at the same time: a
    # rename never leaves a half-written file behind.
    temp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(temp, path)
    except OSError as err:
        log.warning("cannot cache %s at %s (it will be built again): %s", what, path, err)
        if temp is not None:
            Path(temp).unlink(missing_ok=True)
        return False
    return True
