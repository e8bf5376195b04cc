"""Running a session through ONNX Runtime's I/O binding, with buffers reused across batches.

A batch's outputs are split into per-request row views that are encoded later, on the event
loop, while the session may already run the next batch. So a CPU output buffer is lent only
when no view of its previous loan is alive (a weak reference tells), and CUDA outputs are
copied to fresh host arrays: a reused buffer never changes under an answer still being sent.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from batchserve.errors import ModelLoadError
from batchserve.runtime.cuda import PinnedAllocator
from batchserve.runtime.metadata import ModelMetadata, TensorSpec

# Loans kept per buffer size: the runs in flight plus the batches still being encoded.
BUFFERS_PER_SIZE = 4
# Distinct (bucket, input shapes) combinations given their own pinned and device buffers; more
# (models with variable non-batch dimensions) run unpinned rather than grow without bound.
MAX_SLOTS = 16


def bucket_rows(rows: int) -> int:
    """The power of two at or above `rows`: buffers are sized, and graphs captured, per bucket."""
    return 1 << max(rows - 1, 0).bit_length()


def capture_rows(max_rows: int) -> list[int]:
    """Row counts whose runs reach every bucket a batch of up to `max_rows` rows falls in:
    the powers of two below it, then `max_rows` itself (its bucket may be above it)."""
    rows = []
    bucket = 1
    while bucket < max_rows:
        rows.append(bucket)
        bucket *= 2
    return [*rows, max_rows]


def bindable(metadata: ModelMetadata) -> bool:
    """I/O binding takes tensors of fixed-size elements only (not strings)."""
    return all(spec.dtype.kind != "O" for spec in metadata.inputs + metadata.outputs)


def output_shape(spec: TensorSpec, rows: int, batched: bool) -> tuple[int, ...] | None:
    """The shape a run of `rows` rows gives this output, or None when only the run can tell."""
    shape = (rows, *spec.shape[1:]) if batched else spec.shape
    return shape if all(d >= 0 for d in shape) else None


@dataclass(frozen=True, slots=True)
class BindingStatistics:
    runs: int
    buffers: int  # pooled output buffers (CPU) or bucket slots (CUDA)
    unpooled: int  # outputs that got a fresh buffer because every pooled one was still lent


class _Buffer:
    """Memory lent out as one array at a time; free again once every view of it is gone."""

    __slots__ = ("_loan", "memory")

    def __init__(self, nbytes: int) -> None:
        self.memory = np.empty(nbytes, np.uint8).data
        self._loan: weakref.ref[np.ndarray] | None = None

    def free(self) -> bool:
        return self._loan is None or self._loan() is None

    def lend(self, dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray:
        # frombuffer over a memoryview makes a fresh base array per loan: every slice taken
        # downstream keeps that base alive, and the weak reference dies with the last of them.
        base = np.frombuffer(self.memory, dtype, math.prod(shape))
        self._loan = weakref.ref(base)
        return base.reshape(shape)


class OutputBuffers:
    """Output arrays for the CPU: pooled by power-of-two byte size, never lent twice at once."""

    def __init__(self, per_size: int = BUFFERS_PER_SIZE) -> None:
        self._per_size = per_size
        self._pools: dict[int, list[_Buffer]] = {}
        self.unpooled = 0

    @property
    def buffers(self) -> int:
        return sum(len(pool) for pool in self._pools.values())

    def lend(self, dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray:
        size = bucket_rows(math.prod(shape) * dtype.itemsize)
        pool = self._pools.setdefault(size, [])
        for buffer in pool:
            if buffer.free():
                return buffer.lend(dtype, shape)
        if len(pool) < self._per_size:
            buffer = _Buffer(size)
            pool.append(buffer)
            return buffer.lend(dtype, shape)
        self.unpooled += 1
        return np.empty(shape, dtype)


class CpuBinding:
    """Inputs bound in place (no copy), outputs written straight into pooled buffers."""

    def __init__(self, session: ort.InferenceSession, metadata: ModelMetadata) -> None:
        self._session = session
        self._binding = session.io_binding()
        self._metadata = metadata
        self._buffers = OutputBuffers()
        self._runs = 0

    def run(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        binding, metadata = self._binding, self._metadata
        for name, array in zip(metadata.input_names, arrays, strict=True):
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        rows = arrays[0].shape[0] if metadata.batched else 0
        results: list[np.ndarray | None] = []
        for spec in metadata.outputs:
            shape = output_shape(spec, rows, metadata.batched)
            if shape is None:
                binding.bind_output(spec.name, "cpu")
                results.append(None)
                continue
            out = self._buffers.lend(spec.dtype, shape)
            binding.bind_output(spec.name, "cpu", 0, out.dtype, shape, out.ctypes.data)
            results.append(out)
        self._session.run_with_iobinding(binding)
        self._runs += 1
        if any(r is None for r in results):
            values = binding.get_outputs()
            # An output ORT allocated: its numpy view keeps ORT's buffer alive on its own.
            return [r if r is not None else values[i].numpy() for i, r in enumerate(results)]
        return results  # type: ignore[return-value]  # no None left

    def statistics(self) -> BindingStatistics:
        return BindingStatistics(self._runs, self._buffers.buffers, self._buffers.unpooled)

    def close(self) -> None:
        self._binding.clear_binding_inputs()
        self._binding.clear_binding_outputs()


class _CudaSlot:
    """Buffers for one bucket and input shape: pinned host inputs, device outputs, a binding
    (and, with CUDA graphs, device inputs and the graph's id)."""

    def __init__(
        self,
        session: ort.InferenceSession,
        metadata: ModelMetadata,
        row_shapes: tuple[tuple[int, ...], ...],
        bucket: int,
        device: int,
        pinned: PinnedAllocator,
        graph_id: int,
    ) -> None:
        self.binding = session.io_binding()
        self.bucket = bucket
        self.device = device
        self.graph_id = graph_id
        self.hosts = [
            _pinned(pinned, spec.dtype, (bucket, *rows) if metadata.batched else rows)
            for spec, rows in zip(metadata.inputs, row_shapes, strict=True)
        ]
        self.outputs = [self._device_output(spec, metadata.batched) for spec in metadata.outputs]
        self.run_options: ort.RunOptions | None = None
        self.device_inputs: list[ort.OrtValue] = []
        if graph_id:
            self._bind_graph(metadata)

    def _device_output(self, spec: TensorSpec, batched: bool) -> ort.OrtValue | None:
        shape = output_shape(spec, self.bucket, batched)
        if shape is None:
            return None
        return ort.OrtValue.ortvalue_from_shape_and_type(shape, spec.dtype, "cuda", self.device)

    def _bind_graph(self, metadata: ModelMetadata) -> None:
        # A replayed graph reads and writes fixed addresses: bind them once, for good.
        for spec, host in zip(metadata.inputs, self.hosts, strict=True):
            value = ort.OrtValue.ortvalue_from_shape_and_type(
                host.shape, spec.dtype, "cuda", self.device
            )
            self.device_inputs.append(value)
            self.binding.bind_ortvalue_input(spec.name, value)
        for spec, output in zip(metadata.outputs, self.outputs, strict=True):
            assert output is not None  # CudaBinding refuses such models up front
            self.binding.bind_ortvalue_output(spec.name, output)
        self.run_options = ort.RunOptions()
        # Graph ids are positive; ORT reserves 0 and takes -1 as "do not capture".
        self.run_options.add_run_config_entry("gpu_graph_id", str(self.graph_id))


def _pinned(pinned: PinnedAllocator, dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray:
    count = math.prod(shape)
    memory = pinned.allocate(count * dtype.itemsize)
    return np.frombuffer(memory, dtype, count).reshape(shape)


class CudaBinding:
    """Inputs staged through pinned host buffers, outputs in preallocated device buffers per
    bucket and copied to fresh host arrays; with CUDA graphs, inputs padded to their bucket and
    one graph captured and replayed per bucket.

    ORT captures a graph on the run's thread in a capture mode that CUDA calls from other
    threads (allocations, synchronous copies) can break. So graphs are captured only until
    `stop_capturing`: the engine captures every bucket at load, one session at a time, then
    calls it. After that a batch without a graph (a new input shape, a bucket above the
    largest batch) runs without one."""

    def __init__(
        self,
        session: ort.InferenceSession,
        metadata: ModelMetadata,
        device: int,
        pinned: PinnedAllocator,
        *,
        graphs: bool = False,
    ) -> None:
        if graphs:
            for spec in metadata.outputs:
                if output_shape(spec, 1, metadata.batched) is None:
                    raise ModelLoadError(
                        "--cuda-graphs needs outputs of fixed shape (but the batch dimension); "
                        f"{spec.name!r} has shape {list(spec.shape)}"
                    )
        self._session = session
        self._metadata = metadata
        self._device = device
        self._pinned = pinned
        self._slots: dict[tuple[int, tuple[tuple[int, ...], ...]], _CudaSlot] = {}
        self._fallback = session.io_binding()
        self._runs = 0
        self._unpooled = 0
        self._capturing = graphs
        self._no_graph: ort.RunOptions | None = None
        if graphs:
            # With enable_cuda_graph, a run without a graph id captures as graph 0; -1 skips.
            self._no_graph = ort.RunOptions()
            self._no_graph.add_run_config_entry("gpu_graph_id", "-1")

    def stop_capturing(self) -> None:
        """Capture no more graphs; batches without one run as plain bound runs."""
        self._capturing = False

    def run(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        batched = self._metadata.batched
        rows = arrays[0].shape[0] if batched else 0
        row_shapes = tuple(a.shape[1:] if batched else a.shape for a in arrays)
        slot = self._slot(bucket_rows(rows) if batched else 1, row_shapes)
        self._runs += 1
        if slot is None:
            return self._run_unpinned(arrays)
        if slot.graph_id:
            return self._run_graph(slot, arrays, rows)
        binding = slot.binding
        for spec, host, array in zip(self._metadata.inputs, slot.hosts, arrays, strict=True):
            staged = host[: array.shape[0]] if batched else host
            np.copyto(staged, array)
            binding.bind_input(spec.name, "cpu", 0, spec.dtype, array.shape, staged.ctypes.data)
        for spec, output in zip(self._metadata.outputs, slot.outputs, strict=True):
            shape = output_shape(spec, rows, batched)
            if output is None or shape is None:
                binding.bind_output(spec.name, "cuda", self._device)
            else:
                binding.bind_output(
                    spec.name, "cuda", self._device, spec.dtype, shape, output.data_ptr()
                )
        return self._finish(binding, self._no_graph)

    def _run_graph(
        self, slot: _CudaSlot, arrays: Sequence[np.ndarray], rows: int
    ) -> list[np.ndarray]:
        for host, device_input, array in zip(slot.hosts, slot.device_inputs, arrays, strict=True):
            # Rows past `rows` keep an earlier batch's data: rows are independent, and their
            # outputs are cut off below.
            host[: len(array)] = array
            device_input.update_inplace(host)
        outputs = self._finish(slot.binding, slot.run_options)
        if not self._metadata.batched:
            return outputs
        return [output[:rows] for output in outputs]

    def _run_unpinned(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        self._unpooled += 1
        binding = self._fallback
        for name, array in zip(self._metadata.input_names, arrays, strict=True):
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name in self._metadata.output_names:
            binding.bind_output(name, "cuda", self._device)
        return self._finish(binding, self._no_graph)

    def _finish(self, binding: ort.IOBinding, options: ort.RunOptions | None) -> list[np.ndarray]:
        self._session.run_with_iobinding(binding, options)
        binding.synchronize_outputs()
        # Fresh host arrays: the device buffers are the next batch's at once.
        outputs: list[np.ndarray] = binding.copy_outputs_to_cpu()
        return outputs

    def _slot(self, bucket: int, row_shapes: tuple[tuple[int, ...], ...]) -> _CudaSlot | None:
        key = (bucket, row_shapes)
        slot = self._slots.get(key)
        if slot is None and len(self._slots) < MAX_SLOTS:
            graph_id = len(self._slots) + 1 if self._capturing else 0
            slot = _CudaSlot(
                self._session,
                self._metadata,
                row_shapes,
                bucket,
                self._device,
                self._pinned,
                graph_id,
            )
            self._slots[key] = slot
        return slot

    def statistics(self) -> BindingStatistics:
        return BindingStatistics(self._runs, len(self._slots), self._unpooled)

    def graphs(self) -> list[int]:
        """The buckets that have a CUDA graph (captured, or captured on their next run)."""
        return sorted(slot.bucket for slot in self._slots.values() if slot.graph_id)

    def close(self) -> None:
        self._slots.clear()
        self._fallback.clear_binding_inputs()
        self._fallback.clear_binding_outputs()
