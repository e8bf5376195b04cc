"""The few CUDA runtime calls ONNX Runtime's Python API lacks: streams and page-locked memory.

They go through ctypes to the same libcudart that onnxruntime-gpu loads, so a stream created
here is a valid `user_compute_stream` for its CUDA execution provider.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import importlib.util
import logging
import os
from pathlib import Path

from batchserve.errors import DeviceUnavailable

log = logging.getLogger("batchserve.runtime")

CUDA_STREAM_NON_BLOCKING = 0x01  # cudaStreamNonBlocking: no implicit sync with stream 0
CUDA_HOST_ALLOC_PORTABLE = 0x01  # pinned for every CUDA context, not only the current one
# Sonames tried when no pip-installed CUDA runtime is found (newest first).
SONAMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so")


def cudart_candidates() -> list[str]:
    """Where libcudart may be, in the order onnxruntime-gpu's preload looks: pip's nvidia-*
    packages first, then the system loader's search path."""
    found: list[str] = []
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        # nvidia-cuda-runtime-cu12 puts it in nvidia/cuda_runtime/lib, the cu13 wheels in
        # nvidia/cu13/lib.
        found += sorted(glob.glob(os.path.join(root, "*", "lib", "libcudart.so*")), reverse=True)
    system = ctypes.util.find_library("cudart")
    if system:
        found.append(system)
    found += SONAMES
    return found


def load_cudart() -> ctypes.CDLL:
    """libcudart, or DeviceUnavailable naming what was tried."""
    tried = []
    for candidate in cudart_candidates():
        try:
            return ctypes.CDLL(candidate)
        except OSError:
            tried.append(Path(candidate).name)
    raise DeviceUnavailable(
        "per-session CUDA streams need the CUDA runtime library (libcudart), which was not "
        f"found (tried {', '.join(tried)}): install onnxruntime-gpu with its CUDA dependencies "
        "(pip install 'onnxruntime-gpu[cuda,cudnn]') or the CUDA toolkit"
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
