"""Safetensors files written tensor by tensor, byte-identical to ``safetensors.torch.save_file``.

``save_file`` needs every tensor of a file in memory at once. Here the file's layout is planned
from the tensors' names, dtypes and shapes alone (:func:`plan_safetensors`), its header written
first, and each tensor written at its planned offset as soon as it exists
(:class:`SafetensorsWriter`), in any order: memory holds only the tensors in flight.

The bytes are those ``save_file`` writes (safetensors' Rust ``serialize_to_file``): an 8-byte
little-endian header length; a compact JSON header with ``__metadata__`` first, then the tensors
sorted by dtype (widest alignment first, in the order of safetensors' ``Dtype`` enum, reversed)
and, within a dtype, by name; the header padded with spaces to a multiple of 8 bytes; then the
tensors' data back to back in header order. With two or more metadata entries ``save_file``
itself is not reproducible (it orders them by a randomly seeded hash map); they are written here
in the order given.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from hf_soups.safetensors_io import SAFETENSORS_DTYPES

# safetensors' Dtype enum from its last member to its first, less the dtypes hf_soups does not
# read (checked against save_file by tests/test_writer.py): the order tensors are laid out in,
# most aligned first.
_LAYOUT_ORDER = (
    "U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16",
    "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL",
)  # fmt: skip
_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_RANK = {name: rank for rank, name in enumerate(_LAYOUT_ORDER)}
# Linux writes at most 0x7ffff000 bytes per call; larger tensors take several.
_MAX_WRITE = 1 << 30


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor's place in a planned file: dtype, shape and absolute byte range."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsLayout:
    """A planned safetensors file: its header bytes (length prefix included), where each
    tensor goes, and the file's total size."""

    header: bytes
    tensors: dict[str, PlannedTensor]
    size: int


def plan_safetensors(
    tensors: Mapping[str, tuple[torch.dtype, Sequence[int]]],
    metadata: Mapping[str, str] | None = None,
) -> SafetensorsLayout:
    """Plan the file ``save_file`` would write for tensors of these ``(dtype, shape)``s.

    Raises:
        ValueError: a dtype safetensors (or hf_soups) cannot store, or metadata that is not
            a mapping of strings to strings.
    """
    for name, (dtype, _) in tensors.items():
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"tensor {name!r}: dtype {dtype} cannot be written to safetensors")
    if metadata is not None and not all(
        isinstance(key, str) and isinstance(value, str) for key, value in metadata.items()
    ):
        raise ValueError("safetensors metadata must map strings to strings")
    ordered = sorted(tensors, key=lambda name: (_RANK[_DTYPE_NAMES[tensors[name][0]]], name))
    header: dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    entries: list[tuple[str, torch.dtype, tuple[int, ...], int, int]] = []
    offset = 0
    for name in ordered:
        dtype, shape = tensors[name]
        shape = tuple(int(dim) for dim in shape)
        nbytes = _numel(shape) * dtype.itemsize
        header[name] = {
            "dtype": _DTYPE_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        entries.append((name, dtype, shape, offset, offset + nbytes))
        offset += nbytes
    # serde_json's compact form: no spaces, non-ASCII as UTF-8, the same escapes as Python's.
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    return SafetensorsLayout(
        header=len(text).to_bytes(8, "little") + text,
        tensors={
            name: PlannedTensor(dtype, shape, start + begin, start + end)
            for name, dtype, shape, begin, end in entries
        },
        size=start + offset,
    )


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


class SafetensorsWriter:
    """Write one planned safetensors file, each tensor at its place, in any order.

    Use as a context manager: the file is created (never overwriting one) with its header and
    full size on entry; :meth:`write` puts each tensor in place; a clean exit checks that every
    planned tensor was written. On an error the partial file is left to the caller (merges
    write into :func:`~hf_soups.output.atomic_output_dir`, which removes it).
    """

    def __init__(self, path: str | os.PathLike, layout: SafetensorsLayout):
        self.path = Path(path)
        self.layout = layout
        self._pending = set(layout.tensors)
        self._fd: int | None = None

    def __enter__(self) -> SafetensorsWriter:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            self._write_at(self.layout.header, 0)
            os.ftruncate(self._fd, self.layout.size)
        except BaseException:
            self._close()
            raise
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor`` (a CPU tensor of its planned dtype and shape) to its place.

        Raises:
            ValueError: ``name`` is not planned in this file, already written, or ``tensor``
                does not have its planned dtype and shape.
        """
        planned = self.layout.tensors.get(name)
        if planned is None or name not in self._pending:
            state = "not planned in" if planned is None else "already written to"
            raise ValueError(f"tensor {name!r} is {state} {self.path.name}")
        if tensor.dtype != planned.dtype or tuple(tensor.shape) != planned.shape:
            raise ValueError(
                f"tensor {name!r}: got {tensor.dtype} {list(tensor.shape)}, {self.path.name} "
                f"plans {planned.dtype} {list(planned.shape)}"
            )
        if planned.end > planned.begin:
            data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            self._write_at(memoryview(data), planned.begin)
        self._pending.discard(name)

    def _write_at(self, data: bytes | memoryview, offset: int) -> None:
        view = memoryview(data).cast("B")
        while view:
            written = os.pwrite(self._fd, view[:_MAX_WRITE], offset)
            if written <= 0:
                raise OSError(f"{self.path}: write made no progress at byte {offset}")
            view, offset = view[written:], offset + written

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __exit__(self, kind, error, traceback) -> None:
        self._close()
        if kind is None and self._pending:
            missing = sorted(self._pending)
            raise ValueError(
                f"{self.path.name}: {len(missing)} planned tensors never written "
                f"(first: {missing[0]!r})"
            )
