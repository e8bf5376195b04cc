"""The NVIDIA driver check: the version read from the kernel module's file (or nvidia-smi), the
line it gives for a driver too old for the CUDA onnxruntime-gpu needs, and that line at startup."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import pytest

from batchserve.config import Device, RuntimeConfig
from batchserve.errors import DeviceUnavailable
from batchserve.runtime.driver import (
    driver_message,
    installed_driver_version,
    parse_proc_version,
)
from batchserve.runtime.session import SessionBuilder, close_session

# /proc/driver/nvidia/version as the open and the proprietary kernel modules write it.
OPEN_MODULE = (
    "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.95.05  Release Build  "
    "(dvs-builder@U22-I3-B17-02-5)  Tue Sep 23 09:55:41 UTC 2025\n"
    "GCC version:  gcc version 11.4.0 (Ubuntu 11.4.0-1ubuntu1~22.04.2)\n"
)
PROPRIETARY_MODULE = (
    "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.135  Fri Jan 10 20:00:00 UTC 2025\n"
    "GCC version:  gcc version 12.3.0 (Ubuntu 12.3.0-1ubuntu1~22.04)\n"
)
ARM_MODULE = "NVRM version: NVIDIA UNIX Open Kernel Module for aarch64  570.172.08  Release Build\n"
# Too old for every CUDA release onnxruntime-gpu has been built for since 1.17 (12 and 13).
OLD_MODULE = (
    "NVRM version: NVIDIA UNIX x86_64 Kernel Module  470.256.02  Thu May  2 14:37:44 UTC 2024\n"
)


@pytest.mark.parametrize(
    ("text", "version"),
    [
        (OPEN_MODULE, "580.95.05"),
        (PROPRIETARY_MODULE, "550.135"),
        (ARM_MODULE, "570.172.08"),
        ("GCC version:  gcc version 11.4.0\n", None),  # no NVRM line: the GCC version is not it
        ("", None),
    ],
)
def test_the_version_comes_from_the_nvrm_line(text: str, version: str | None) -> None:
    assert parse_proc_version(text) == version


@pytest.mark.parametrize(
    ("version", "cuda_major", "needed"),
    [
        ("570.172.08", 13, 580),
        ("579.99", 13, 580),
        ("550.135", None, 580),  # the build does not say: PyPI's onnxruntime-gpu is CUDA 13
        ("470.256.02", 12, 525),
        ("418.40.04", 11, 450),
    ],
)
def test_a_driver_older_than_the_branch_gets_one_line_naming_both(
    version: str, cuda_major: int | None, needed: int
) -> None:
    message = driver_message(version, cuda_major)
    assert message is not None
    assert "\n" not in message
    assert f"NVIDIA driver {version}" in message
    assert f"R{needed} or newer" in message
    assert f"CUDA {cuda_major or 13}" in message


@pytest.mark.parametrize(
    ("version", "cuda_major"),
    [
        ("580.65.06", 13),  # the first R580 release
        ("580.159.04", 13),  # the driver the GPU figures were measured on
        ("610.43.03", 13),
        ("525.60.13", 12),
        ("575.57.08", 12),  # newer branches keep running older CUDA (backward compatibility)
        ("550.135", 14),  # a CUDA release the table does not know: nothing certain to say
        ("unknown", 13),
    ],
)
def test_a_new_enough_or_unknown_driver_says_nothing(version: str, cuda_major: int) -> None:
    assert driver_message(version, cuda_major) is None


def test_the_file_is_read_first(tmp_path: Path) -> None:
    version_file = tmp_path / "version"
    version_file.write_text(OPEN_MODULE)
    # nvidia-smi is not asked when the file answers (this one does not exist anyway).
    assert installed_driver_version(version_file, str(tmp_path / "nvidia-smi")) == "580.95.05"


def fake_nvidia_smi(directory: Path, output: str, status: int = 0) -> str:
    """An executable that answers as nvidia-smi does (a real process, not a mock)."""
    script = directory / "nvidia-smi"
    script.write_text(f"#!/bin/sh\nprintf '{output}'\nexit {status}\n")
    script.chmod(0o755)
    return str(script)


def test_without_the_file_nvidia_smi_is_asked(tmp_path: Path) -> None:
    missing = tmp_path / "no-driver"
    # One line per GPU, the same driver on each (what WSL's nvidia-smi prints, for example).
    smi = fake_nvidia_smi(tmp_path, "575.57.08\\n575.57.08\\n")
    assert installed_driver_version(missing, smi) == "575.57.08"
    assert installed_driver_version(missing, fake_nvidia_smi(tmp_path, "", status=9)) is None
    assert installed_driver_version(missing, fake_nvidia_smi(tmp_path, "No devices\\n")) is None
    assert installed_driver_version(missing, str(tmp_path / "absent-smi")) is None


def load_on_cuda(mlp_path: Path, version_file: Path) -> None:
    """Starts loading a model on cuda:0 with the driver version read from `version_file`. On a
    machine without onnxruntime-gpu and a GPU the load then fails, after the driver line."""
    reader = functools.partial(installed_driver_version, version_file, "absent-nvidia-smi")
    builder = SessionBuilder(
        mlp_path, RuntimeConfig(device=Device("cuda", 0)), driver_version=reader
    )
    try:
        sessions, _ = builder.load()
    except DeviceUnavailable:
        return
    for session in sessions:
        close_session(session)


def test_loading_on_cuda_logs_the_line_for_an_old_driver(
    tmp_path: Path, mlp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    version_file = tmp_path / "version"
    version_file.write_text(OLD_MODULE)
    with caplog.at_level(logging.WARNING, logger="batchserve.runtime"):
        load_on_cuda(mlp_path, version_file)
    lines = [r for r in caplog.records if "NVIDIA driver" in r.getMessage()]
    assert len(lines) == 1, caplog.text
    assert lines[0].levelno == logging.WARNING
    assert "NVIDIA driver 470.256.02 is older than R" in lines[0].getMessage()


def test_loading_on_cuda_is_quiet_about_a_new_driver(
    tmp_path: Path, mlp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    version_file = tmp_path / "version"
    version_file.write_text(OPEN_MODULE)
    with caplog.at_level(logging.DEBUG, logger="batchserve.runtime"):
        load_on_cuda(mlp_path, version_file)
    assert "NVIDIA driver" not in caplog.text


def test_loading_on_cpu_never_reads_the_driver(mlp_path: Path) -> None:
    def read() -> str | None:
        raise AssertionError("the driver was read for a CPU model")

    sessions, _ = SessionBuilder(mlp_path, RuntimeConfig(), driver_version=read).load()
    for session in sessions:
        close_session(session)


def test_the_gpu_guide_quotes_the_line_as_logged() -> None:
    guide = (Path(__file__).parent.parent / "docs" / "gpu.md").read_text()
    message = driver_message("570.172.08", 13)
    assert message is not None
    assert f"\n{message}\n" in guide
