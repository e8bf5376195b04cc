"""Frozen configuration objects validate themselves and resolve their automatic settings."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from batchserve import BatchConfig, CacheConfig, Device, RuntimeConfig, ServerConfig
from batchserve.config import SPIN_MODEL_BYTES


@pytest.mark.parametrize(
    ("text", "device"),
    [("cpu", Device("cpu")), ("cuda", Device("cuda", 0)), ("CUDA:3", Device("cuda", 3))],
)
def test_device_parsing(text: str, device: Device) -> None:
    assert Device.parse(text) == device


@pytest.mark.parametrize("text", ["gpu", "cuda:x", "cpu:1", ""])
def test_bad_devices_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="device must be"):
        Device.parse(text)


@pytest.mark.parametrize(
    "make",
    [
        lambda: BatchConfig(max_batch_size=0),
        lambda: BatchConfig(max_latency_ms=-1),
        lambda: BatchConfig(max_queue_rows=0),
        lambda: RuntimeConfig(instances=0),
        lambda: ServerConfig(port=70000),
        lambda: CacheConfig(ttl_s=0),
        lambda: CacheConfig(size_mb=-1),
    ],
)
def test_invalid_settings_are_refused(make: object) -> None:
    with pytest.raises(ValueError, match="must be"):
        make()  # type: ignore[operator]


def test_configs_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        BatchConfig().max_batch_size = 3  # type: ignore[misc]


def test_spinning_is_automatic_by_model_size_unless_set() -> None:
    auto = RuntimeConfig()
    assert not auto.resolved_spin(SPIN_MODEL_BYTES)
    assert auto.resolved_spin(SPIN_MODEL_BYTES + 1)
    assert RuntimeConfig(spin=True).resolved_spin(0)
    assert not RuntimeConfig(spin=False).resolved_spin(10**9)


def test_cuda_sessions_default_to_one_thread() -> None:
    assert RuntimeConfig(device=Device("cuda", 0)).resolved_intra_op_threads() == 1
    assert RuntimeConfig(intra_op_threads=3).resolved_intra_op_threads() == 3


def test_cache_is_enabled_only_with_a_tier_and_a_cacheable_model() -> None:
    assert not CacheConfig().enabled
    assert CacheConfig(size_mb=1).enabled
    assert CacheConfig(redis_url="redis://x").enabled
    assert not CacheConfig(size_mb=1, cacheable=False).enabled


def test_available_cpus_honours_a_cgroup_cpu_limit(tmp_path: Path) -> None:
    import os

    from batchserve.config import available_cpus

    affinity = len(os.sched_getaffinity(0))
    assert available_cpus(str(tmp_path / "none")) == affinity  # no cgroup file: the mask
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cpus(str(tmp_path)) == affinity  # no limit
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # a 1.5-CPU limit
    assert available_cpus(str(tmp_path)) == min(affinity, 2)
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU still gets one thread
    assert available_cpus(str(tmp_path)) == 1
