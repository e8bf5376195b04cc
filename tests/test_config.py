"""Frozen configuration objects validate themselves and resolve their automatic settings."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from batchserve import BatchConfig, CacheConfig, Device, RuntimeConfig, ServerConfig
from batchserve.cli import build_parser
from batchserve.config import SPIN_MODEL_BYTES
from batchserve.flags import settings_from_args
from batchserve.handlers.config import HandlerConfig
from batchserve.settings import ServeSettings


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
    from batchserve.config import available_cpus

    affinity = len(os.sched_getaffinity(0))
    assert available_cpus(str(tmp_path / "none")) == affinity  # no cgroup file: the mask
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cpus(str(tmp_path)) == affinity  # no limit
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # a 1.5-CPU limit
    assert available_cpus(str(tmp_path)) == min(affinity, 2)
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU still gets one thread
    assert available_cpus(str(tmp_path)) == 1


@pytest.fixture
def parse_serve(monkeypatch: pytest.MonkeyPatch) -> Callable[..., ServeSettings]:
    """`batchserve serve ARGS` as settings, with no BATCHSERVE_* variable in the way."""
    for name in [name for name in os.environ if name.startswith("BATCHSERVE_")]:
        monkeypatch.delenv(name)

    def parse(*args: str) -> ServeSettings:
        return settings_from_args(build_parser().parse_args(["serve", *args]))

    return parse


def test_serve_flag_defaults_are_the_config_defaults(
    parse_serve: Callable[..., ServeSettings],
) -> None:
    settings = parse_serve("m.onnx")
    assert (settings.batch, settings.runtime, settings.cache) == (
        BatchConfig(),
        RuntimeConfig(),
        CacheConfig(),
    )
    # The command listens on every interface (a container's port); the library on loopback.
    assert settings.server == dataclasses.replace(ServerConfig(), host="0.0.0.0")
    assert settings == ServeSettings(model="m.onnx", server=settings.server)


def test_serve_flags_set_fields_in_their_own_units(
    parse_serve: Callable[..., ServeSettings],
) -> None:
    settings = parse_serve(
        "--model-repository", "models", "--max-body-mb", "1.5", "--no-cache", "--spin", "off",
        "--protect-metrics", "--max-batch-size", "100", "--handler-option", "top_k=3",
    )  # fmt: skip
    assert settings.server.max_body_bytes == 3 * 512 * 1024
    assert not settings.cache.cacheable
    assert settings.runtime.spin is False
    assert not settings.server.metrics_public
    assert settings.server.max_active_requests == 200  # two full batches
    assert settings.handler_options == ("top_k=3",)
    assert parse_serve("m.onnx", "--max-active-requests", "0").server.max_active_requests == 0


@pytest.mark.parametrize(
    ("settings", "error"),
    [
        ({}, "give a model file or --model-repository DIR"),
        ({"model": "m.onnx", "model_repository": "models"}, "give a model file"),
        ({"model": "m.onnx", "workers": 0}, "--workers must be >= 1, got 0"),
        ({"model": "m.onnx", "handler": "a:B", "handler_options": ("k",)}, "KEY=VALUE"),
        ({"model": "m.onnx", "handler_workers": -1}, "handler workers must be >= 0"),
    ],
)
def test_serve_settings_are_refused_when_incomplete_or_invalid(
    settings: dict[str, Any], error: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(error)):
        ServeSettings(**settings)


def test_handlers_get_the_servers_grace_and_limits() -> None:
    server = ServerConfig(shutdown_grace_s=3, max_tensor_elements=9, max_response_bytes=7)
    settings = ServeSettings(model="m.onnx", handler="a:B", handler_workers=2, server=server)
    assert settings.handler_config() == HandlerConfig(
        "a:B", (), "thread", 2, 0, 3, max_elements=9, max_answer_bytes=7
    )
    assert ServeSettings(model="m.onnx").handler_config() is None


def test_serve_settings_run_handlers_with_the_handlers_defaults() -> None:
    run, default = ServeSettings(model="m.onnx").handler_run(), HandlerConfig("-")
    assert (run.executor, run.workers, run.max_pending) == (
        default.executor,
        default.workers,
        default.max_pending,
    )
