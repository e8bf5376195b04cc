"""The few CUDA runtime calls ONNX Runtime's Python API lacks: streams and page-locked memory.

They go through ctypes to the same libcudart that onnxruntime-gpu loads, so a stream created
here is a valid `user_compute_stream` for its CUDA execution provider.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from batchserve.errors import DeviceUnavailable

log = logging.getLogger("batchserve.runtime")

CUDA_STREAM_NON_BLOCKING = 0x01  # cudaStreamNonBlocking: no implicit sync with stream 0
CUDA_HOST_ALLOC_PORTABLE = 0x01  # pinned for every CUDA context, not only the current one
# Majors tried when the onnxruntime build does not say which CUDA it was built for.
FALLBACK_MAJORS = ("13", "12", "11.0")
# Candidates are (path or soname, dlopen mode); RTLD_NOLOAD only finds a copy already loaded.
Candidate = tuple[str, int]


def ort_cuda_major() -> str | None:
    """The CUDA major version onnxruntime-gpu was built for ("13"), or None (a CPU build)."""
    try:
        from onnxruntime.capi import build_and_package_info as info
    except ImportError:
        return None
    major = str(getattr(info, "cuda_version", "") or "").split(".")[0]
    return major if major.isdigit() else None


def nvidia_roots() -> list[str]:
    """The directories of pip's `nvidia` namespace package (nvidia-* wheels), if any."""
    spec = importlib.util.find_spec("nvidia")
    return list(spec.submodule_search_locations or []) if spec is not None else []


def cudart_candidates(major: str | None, roots: Sequence[str]) -> list[Candidate]:
    """Where to get libcudart, best first: the copy onnxruntime (or its preload_dlls) already
    loaded, then the soname as ORT's own NEEDED entry resolves it, then pip's nvidia-* wheels.
    Only ORT's CUDA major: streams and pinned memory from another runtime version would be
    handed to a provider that does not share it, and a second copy of the same one is a risk."""
    majors = (major,) if major else FALLBACK_MAJORS
    sonames = [f"libcudart.so.{m}" for m in majors]
    found: list[Candidate] = [(name, os.RTLD_NOLOAD | os.RTLD_LAZY) for name in sonames]
    found += [(name, ctypes.DEFAULT_MODE) for name in sonames]
    for root in roots:
        for name in sonames:
            # nvidia-cuda-runtime-cu12 puts it in nvidia/cuda_runtime/lib, the cu13 wheels in
            # nvidia/cu13/lib.
            paths = sorted(glob.glob(os.path.join(root, "*", "lib", name)))
            found += [(path, ctypes.DEFAULT_MODE) for path in paths]
    return found


def load_cudart() -> ctypes.CDLL:
    """libcudart, or DeviceUnavailable naming what was tried."""
    tried = []
    for candidate, mode in cudart_candidates(ort_cuda_major(), nvidia_roots()):
        try:
            return ctypes.CDLL(candidate, mode=mode)
        except OSError:
            tried.append(Path(candidate).name)
    raise DeviceUnavailable(
        "per-session CUDA streams need the CUDA runtime library (libcudart), which was not "
        f"found (tried {', '.join(dict.fromkeys(tried))}): install onnxruntime-gpu with its "
        "CUDA dependencies (pip install 'onnxruntime-gpu[cuda,cudnn]') or the CUDA toolkit"
    )


class CudaRuntime:
    """Thin typed wrapper over the libcudart calls batchserve needs."""

    def __init__(self, library: ctypes.CDLL | None = None) -> None:
        self._lib = library if library is not None else load_cudart()

    def _check(self, status: int, call: str) -> None:
        if status == 0:
            return
        name = self._lib.cudaGetErrorString
        name.restype = ctypes.c_char_p
        reason = (name(status) or b"unknown error").decode()
        raise DeviceUnavailable(f"{call} failed: {reason} (CUDA error {status})")

    def set_device(self, index: int) -> None:
        self._check(self._lib.cudaSetDevice(ctypes.c_int(index)), f"cudaSetDevice({index})")

    def create_stream(self, device: int) -> int:
        """A non-blocking stream on `device`, as the integer handle ORT's options take."""
        self.set_device(device)
        stream = ctypes.c_void_p()
        status = self._lib.cudaStreamCreateWithFlags(
            ctypes.byref(stream), ctypes.c_uint(CUDA_STREAM_NON_BLOCKING)
        )
        self._check(status, "cudaStreamCreateWithFlags")
        return int(stream.value or 0)

    def destroy_stream(self, stream: int) -> None:
        self._check(self._lib.cudaStreamDestroy(ctypes.c_void_p(stream)), "cudaStreamDestroy")

    def host_alloc(self, nbytes: int) -> int:
        """Page-locked host memory: copies from it to the GPU are DMA, asynchronous."""
        pointer = ctypes.c_void_p()
        status = self._lib.cudaHostAlloc(
            ctypes.byref(pointer), ctypes.c_size_t(max(nbytes, 1)), CUDA_HOST_ALLOC_PORTABLE
        )
        self._check(status, f"cudaHostAlloc({nbytes})")
        return int(pointer.value or 0)

    def host_free(self, pointer: int) -> None:
        self._check(self._lib.cudaFreeHost(ctypes.c_void_p(pointer)), "cudaFreeHost")


class CudaStream:
    """One CUDA stream, created at session load and destroyed when the session is closed."""

    __slots__ = ("_runtime", "device", "handle")

    def __init__(self, runtime: CudaRuntime, device: int) -> None:
        self._runtime = runtime
        self.device = device
        self.handle = runtime.create_stream(device)

    def close(self) -> None:
        if self.handle:
            handle, self.handle = self.handle, 0
            self._runtime.destroy_stream(handle)


class PinnedAllocator:
    """Page-locked host buffers, freed together at close."""

    def __init__(self, runtime: CudaRuntime) -> None:
        self._runtime = runtime
        self._pointers: list[int] = []

    def allocate(self, nbytes: int) -> memoryview:
        pointer = self._runtime.host_alloc(nbytes)
        self._pointers.append(pointer)
        return memoryview((ctypes.c_ubyte * nbytes).from_address(pointer)).cast("B")

    def close(self) -> None:
        pointers, self._pointers = self._pointers, []
        for pointer in pointers:
            self._runtime.host_free(pointer)
