"""Write each merged tensor in a second thread while the next one is computed.

A streaming merge reads, sums and writes one tensor at a time. Reading and summing run on one
core and writing (the kernel copying into the page cache) on the other, both without the GIL;
overlapping them hides most of the write (benchmarks/README.md, "hf-soups merge").

The merged tensors are computed into two float32 buffers in turn rather than into fresh memory:
a fresh tensor costs its page faults, six times the read itself on the 2-core machine (0.30 s
against 0.05 s for a 605 MB checkpoint in the page cache). The second buffer is small, so that
memory stays within twice the largest tensor plus that small buffer: a tensor too large for it
waits until the large one is written.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from hf_soups.safetensors_writer import SafetensorsWriter

OVERLAP_BYTES = 32 * 2**20
"""The second buffer's size: tensors up to this size are computed while the one before them is
written (every tensor of a CLIP model but its token embedding)."""


class WriteBehind:
    """One write in flight at a time, in a background thread, and the memory that the next
    tensor may be computed into meanwhile.

    Use as a context manager inside the writer's, so that the file is closed only after its
    last write; on exit the write in flight is waited for (its error raised, unless another
    error is already on its way) and the thread is stopped::

        with SafetensorsWriter(path, layout) as writer, WriteBehind(writer, numel) as writes:
            for name in names:
                writes.write(name, compute(name, out=writes.buffer(shape_of(name))))

    ``largest_numel``: the number of elements of the largest tensor computed into the buffers.
    """

    def __init__(
        self, writer: SafetensorsWriter, largest_numel: int, overlap_bytes: int = OVERLAP_BYTES
    ) -> None:
        self._writer = writer
        self._sizes = (largest_numel, min(largest_numel, overlap_bytes // 4))
        self._buffers: list[torch.Tensor | None] = [None, None]
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="hf-soups-write")
        self._pending: Future | None = None
        self._pending_tensor: torch.Tensor | None = None

    def buffer(self, shape: torch.Size) -> torch.Tensor:
        """Float32 memory of ``shape`` that no write in flight reads (waits for the write in
        flight when the tensor fits only the buffer it reads)."""
        numel = shape.numel()
        if self._in_flight(0):
            if numel <= self._sizes[1]:
                return self._view(1, shape)
            self.wait()
        return self._view(0, shape)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor`` to its place in the file in the background, once the write before
        it is done (:meth:`SafetensorsWriter.write`'s errors are raised by the next call)."""
        self.wait()
        self._pending_tensor = tensor
        self._pending = self._executor.submit(self._writer.write, name, tensor)

    def wait(self) -> None:
        """Wait for the write in flight, raising its error."""
        pending, self._pending, self._pending_tensor = self._pending, None, None
        if pending is not None:
            pending.result()

    def _in_flight(self, index: int) -> bool:
        buffer, tensor = self._buffers[index], self._pending_tensor
        return (
            buffer is not None
            and tensor is not None
            and tensor.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
        )

    def _view(self, index: int, shape: torch.Size) -> torch.Tensor:
        if self._buffers[index] is None:
            self._buffers[index] = torch.empty(self._sizes[index], dtype=torch.float32)
        return self._buffers[index][: shape.numel()].view(shape)

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        try:
            self.wait()
        except Exception:
            if kind is None:
                raise
        finally:
            self._executor.shutdown(wait=True)
