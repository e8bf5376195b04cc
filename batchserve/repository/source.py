"""What a model repository directory holds: `DIR/<model>/<version>/model.onnx` (Triton's
layout) plus an optional `DIR/<model>/config.toml`."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from batchserve.errors import ModelLoadError
from batchserve.repository.config import CONFIG_FILE, ModelConfig, load_model_config

log = logging.getLogger("batchserve.repository")

MODEL_FILE = "model.onnx"
# (size, mtime) of each file: a changed fingerprint means the version must be reloaded.
Fingerprint = tuple[int, int]


@dataclass(frozen=True, slots=True)
class ModelDirectory:
    """One model's directory as scanned: its config (or why it is invalid) and versions."""

    name: str
    config: ModelConfig = field(default_factory=ModelConfig)
    versions: dict[str, Path] = field(default_factory=dict)
    fingerprints: dict[str, Fingerprint] = field(default_factory=dict)
    config_fingerprint: Fingerprint | None = None
    error: str | None = None

    @property
    def state(self) -> tuple[object, ...]:
        """Changes whenever anything that matters to loading changes."""
        return (self.config_fingerprint, tuple(sorted(self.fingerprints.items())), self.error)


def _fingerprint(path: Path) -> Fingerprint:
    stat = path.stat()
    return (stat.st_size, stat.st_mtime_ns)


def scan_directory(root: Path) -> dict[str, ModelDirectory]:
    """Every model directory under `root` (blocking: call it off the event loop)."""
    if not root.is_dir():
        raise ModelLoadError(f"model repository {root} is not a directory")
    models: dict[str, ModelDirectory] = {}
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        models[model_dir.name] = scan_model(model_dir)
    return models


def scan_model(model_dir: Path) -> ModelDirectory:
    name = model_dir.name
    config_path = model_dir / CONFIG_FILE
    config_fp = _fingerprint(config_path) if config_path.is_file() else None
    versions: dict[str, Path] = {}
    fingerprints: dict[str, Fingerprint] = {}
    for version_dir in model_dir.iterdir():
        model_file = version_dir / MODEL_FILE
        if version_dir.is_dir() and model_file.is_file() and _valid_version(version_dir.name):
            versions[version_dir.name] = model_file
            fingerprints[version_dir.name] = _fingerprint(model_file)
    try:
        config = load_model_config(model_dir)
    except ModelLoadError as err:
        return ModelDirectory(name, versions=versions, fingerprints=fingerprints,
                              config_fingerprint=config_fp, error=str(err))  # fmt: skip
    if not versions:
        return ModelDirectory(name, config, config_fingerprint=config_fp,
                              error=f"no <version>/{MODEL_FILE} under {model_dir}")  # fmt: skip
    return ModelDirectory(name, config, versions, fingerprints, config_fp)


# Versions appear in URLs and metric labels: plain ASCII names, never a hidden directory.
_VERSION = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def _valid_version(name: str) -> bool:
    return _VERSION.fullmatch(name) is not None
