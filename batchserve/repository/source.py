"""What a model repository directory holds: `DIR/<model>/<version>/model.onnx` (Triton's
layout) plus an optional `DIR/<model>/config.toml`."""

from __future__ import annotations

import hashlib
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from batchserve.errors import ModelLoadError
from batchserve.repository.config import CONFIG_FILE, ModelConfig, load_model_config

log = logging.getLogger("batchserve.repository")

MODEL_FILE = "model.onnx"
# (device, inode, size, mtime_ns, ctime_ns) of a model file: a change means it may have been
# replaced. Size and mtime alone miss `cp -p`, `rsync -a` and reproducible builds (same size,
# mtime set back); a replacement by rename changes the inode, and a rewrite in place the
# ctime, which no system call sets back. The file's content has the last word (see `racy`).
Fingerprint = tuple[int, int, int, int, int]
# The coarsest timestamp granularity expected (FAT: 2 s; ext3, HFS+, some NFS: 1 s): a file
# whose ctime is this close to a scan may change again without its fingerprint changing.
RACY_NS = 2_000_000_000
_CHUNK = 1 << 20  # bytes hashed at a time: memory stays bounded whatever the model's size


@dataclass(frozen=True, slots=True)
class ModelDirectory:
    """One model's directory as scanned: its config (or why it is invalid) and versions."""

    name: str
    config: ModelConfig = field(default_factory=ModelConfig)
    versions: dict[str, Path] = field(default_factory=dict)
    fingerprints: dict[str, Fingerprint] = field(default_factory=dict)
    config_fingerprint: str | None = None  # the digest of config.toml (small: read each scan)
    error: str | None = None
    # Versions whose file changed within RACY_NS of the scan: an engine loaded from one is
    # checked by content on later scans until its file is older than that.
    racy: frozenset[str] = frozenset()

    @property
    def state(self) -> tuple[object, ...]:
        """Changes whenever anything that matters to loading changes."""
        return (self.config_fingerprint, tuple(sorted(self.fingerprints.items())), self.error)


def fingerprint(path: Path) -> tuple[Fingerprint, int]:
    """The file's fingerprint and its ctime (ns)."""
    stat = path.stat()
    return (
        stat.st_dev,
        stat.st_ino,
        stat.st_size,
        stat.st_mtime_ns,
        stat.st_ctime_ns,
    ), stat.st_ctime_ns


def file_digest(path: Path) -> str:
    """The digest of a file's content, read in chunks (blocking: call it off the event loop).
    Equal to `runtime.session.model_digest` of its bytes, the digest an engine loads with."""
    digest = hashlib.blake2b()
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()[:32]


def _config_digest(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        return hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()
    except OSError:  # reported by `load_model_config`, as the model's error
        return "unreadable"


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
    # Wall-clock time, not a duration: it is compared with the files' ctimes, taken before
    # any file is looked at.
    recent = time.time_ns() - RACY_NS
    config_fp = _config_digest(model_dir / CONFIG_FILE)
    versions: dict[str, Path] = {}
    fingerprints: dict[str, Fingerprint] = {}
    racy: set[str] = set()
    for version_dir in model_dir.iterdir():
        model_file = version_dir / MODEL_FILE
        if version_dir.is_dir() and model_file.is_file() and _valid_version(version_dir.name):
            versions[version_dir.name] = model_file
            fingerprints[version_dir.name], ctime_ns = fingerprint(model_file)
            if ctime_ns >= recent:
                racy.add(version_dir.name)
    try:
        config = load_model_config(model_dir)
    except ModelLoadError as err:
        return ModelDirectory(name, versions=versions, fingerprints=fingerprints,
                              config_fingerprint=config_fp, error=str(err))  # fmt: skip
    if not versions:
        return ModelDirectory(name, config, config_fingerprint=config_fp,
                              error=f"no <version>/{MODEL_FILE} under {model_dir}")  # fmt: skip
    return ModelDirectory(name, config, versions, fingerprints, config_fp, racy=frozenset(racy))


# Versions appear in URLs and metric labels: plain ASCII names, never a hidden directory.
_VERSION = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def _valid_version(name: str) -> bool:
    return _VERSION.fullmatch(name) is not None
