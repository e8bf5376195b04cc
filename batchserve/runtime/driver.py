"""Whether the host's NVIDIA driver is new enough for the CUDA that onnxruntime-gpu was built for.

A CUDA runtime runs only on a driver of its major release's branch or newer (NVIDIA's minor
version compatibility: CUDA 13.x needs R580, 12.x R525, 11.x R450). With an older driver the
CUDA provider fails deep inside ONNX Runtime with a message that does not name the driver, so
startup says it first, in one line. Only a warning: the CUDA forward-compatibility package
(cuda-compat) lets some data-center GPUs run a newer CUDA on an older driver.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("batchserve.runtime")

# The kernel module writes its version here; the file is host-wide, so containers see it too.
DRIVER_VERSION_FILE = Path("/proc/driver/nvidia/version")
# Hosts without that file (WSL) still have nvidia-smi.
NVIDIA_SMI = "nvidia-smi"
NVIDIA_SMI_TIMEOUT_S = 10.0
# The oldest driver branch each CUDA major release runs on (NVIDIA's CUDA compatibility guide,
# "Minor Version Compatibility").
MIN_DRIVER_BRANCH = {13: 580, 12: 525, 11: 450}
# What PyPI's onnxruntime-gpu is built for when the installed build does not say.
DEFAULT_CUDA_MAJOR = 13
VERSION = re.compile(r"^\d+(\.\d+)+$")

# Returns the driver version ("580.95.05"), or None when there is no NVIDIA driver to read.
DriverVersionReader = Callable[[], str | None]


def parse_proc_version(text: str) -> str | None:
    """The version in /proc/driver/nvidia/version's NVRM line, e.g. "580.95.05" from
    "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.95.05  Release Build ...".
    The proprietary module's line ("... x86_64 Kernel Module  550.135  <date>") reads the same."""
    for line in text.splitlines():
        if line.startswith("NVRM version:"):
            return next((word for word in line.split() if VERSION.match(word)), None)
    return None


def driver_message(version: str, cuda_major: int | None = None) -> str | None:
    """The startup line for a driver older than `cuda_major` needs, else None (also when the
    version or the CUDA release is one this table does not know: nothing certain to say)."""
    major = cuda_major if cuda_major is not None else DEFAULT_CUDA_MAJOR
    needed = MIN_DRIVER_BRANCH.get(major)
    branch = version.split(".", 1)[0]
    if needed is None or not VERSION.match(version) or int(branch) >= needed:
        return None
    return (
        f"NVIDIA driver {version} is older than R{needed}, the oldest that runs CUDA {major} "
        f"(which this onnxruntime-gpu needs): CUDA will fail to start unless the CUDA "
        f"forward-compatibility package is installed; update the host's driver to R{needed} or "
        "newer"
    )


def installed_driver_version(
    path: Path = DRIVER_VERSION_FILE, nvidia_smi: str = NVIDIA_SMI
) -> str | None:
    """The loaded NVIDIA driver's version: from the kernel module's file, else from nvidia-smi;
    None when neither is there or says."""
    try:
        return parse_proc_version(path.read_text(errors="replace"))
    except OSError:
        pass  # no such file: no driver loaded here, or a host (WSL) that does not have it
    executable = shutil.which(nvidia_smi)
    if executable is None:
        return None
    try:
        done = subprocess.run(
            [executable, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=NVIDIA_SMI_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    # One line per GPU, all the same driver.
    first = done.stdout.strip().splitlines()[:1] if done.returncode == 0 else []
    return first[0].strip() if first and VERSION.match(first[0].strip()) else None


def warn_if_old_driver(read: DriverVersionReader, cuda_major: int | None) -> str | None:
    """Log driver_message's line as a warning when there is one; returns it."""
    version = read()
    if version is None:
        log.debug("no NVIDIA driver version found (%s, %s)", DRIVER_VERSION_FILE, NVIDIA_SMI)
        return None
    message = driver_message(version, cuda_major)
    if message is not None:
        log.warning("%s", message)
    return message
