"""Safetensors files read without trusting them: headers validated as safetensors validates them,
tensors read into plain buffers.

A header is accepted exactly when ``safetensors.safe_open`` accepts it (its Rust reader's
``read_metadata`` and ``Metadata::validate``): an 8-byte length within the file and at most
100 MB; a UTF-8 JSON object nested at most :data:`~hf_soups.checkpoint_files.MAX_JSON_DEPTH`
deep, without NaN, infinities or out-of-range numbers; an optional ``__metadata__`` mapping
strings to strings; every other key a tensor whose ``dtype`` is a safetensors dtype, whose
``shape`` lists integers in ``[0, 2**64)`` and whose ``data_offsets`` are two such integers;
sorted by offset, each tensor starts where the previous one ended and spans its element count
times its dtype's size, and the last one ends at the end of the file. The one difference: dtypes
torch cannot average (4- and 6-bit floats, FNUZ and E8M0 floats, complex) are refused, as valid
files hf_soups cannot merge. Errors name the file and tensor, never quote bytes of a file that is
not a valid safetensors header, and cut long names short.

Tensors are read one at a time with plain file reads into fresh buffers rather than through
``mmap``: a merge that keeps N files mapped grows its resident memory by the size of every page it
touched, so reading into buffers is what keeps a streaming merge's memory flat in the number of
ingredients.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hf_soups.checkpoint_files import check_json_depth, json_depth, open_regular, too_deep
from hf_soups.errors import CorruptedCheckpointError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
}
"""The safetensors dtypes hf_soups reads, and their torch dtypes."""

# Bits per element of every dtype of the format (safetensors' Dtype::bitsize).
_DTYPE_BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8,
    "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16,
    "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64,
    "U64": 64,
}  # fmt: skip
_METADATA_KEY = "__metadata__"
_ENTRY_FIELDS = ("dtype", "shape", "data_offsets")
_MAX_HEADER_BYTES = 100_000_000
_USIZE_LIMIT = 2**64  # the format's sizes are Rust usize (64 bits)
# A lone UTF-16 surrogate (``"\\ud800"``) is not a string safetensors accepts.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_MINUS_ZERO = re.compile(r"-0(?![.\deE])")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and byte range within the file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    group: str
    """Name of the weights file family the tensor belongs to (``model`` for
    ``model.safetensors`` or ``model-0000k-of-0000n.safetensors``), kept in the merged output."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class _Entry:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


class _JsonObject(dict):
    """A parsed JSON object that remembers which of its keys were given more than once."""

    repeated: frozenset[str] = frozenset()

    @classmethod
    def from_pairs(cls, pairs: list[tuple[str, Any]]) -> _JsonObject:
        parsed = cls(pairs)
        if len(parsed) != len(pairs):
            keys = [key for key, _ in pairs]
            parsed.repeated = frozenset(key for key in parsed if keys.count(key) > 1)
        return parsed


def _short(text: str, limit: int = 60) -> str:
    """``repr`` of a name or value read from a file, cut to keep messages one short line."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number out of range")
    return value


def _usize_or_float(text: str) -> int | float:
    # serde_json reads integers outside [-2**63, 2**64) as floats, and -0 as a float, so a
    # negative or oversized dimension is a float here as there: refused where an integer is due.
    # (The plain parse keeps them integers: refused all the same by _is_usize.)
    value = int(text)
    if text[0] != "-" and value < _USIZE_LIMIT:
        return value
    return _finite_float(text)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _is_usize(value: Any) -> bool:
    return type(value) is int and 0 <= value < _USIZE_LIMIT


def _parse_json(file: Path, raw: bytes) -> dict:
    """Parse a header as serde_json parses it for safetensors: a key given twice is an error (the
    last one wins in Python), -0 and integers beyond 64 bits are floats, NaN, infinities and
    lone surrogates are not JSON. The exact parse, with hooks, costs five times Python's plain one,
    so it runs only when the plain one may differ."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CorruptedCheckpointError(
            f"{file}: unreadable safetensors header (not UTF-8 at byte {8 + error.start})"
        ) from None
    try:
        header = json.loads(text, parse_float=_finite_float, parse_constant=_reject_constant)
        if _plain_parse_may_differ(text, header):
            header = json.loads(
                text,
                object_pairs_hook=_JsonObject.from_pairs,
                parse_int=_usize_or_float,
                parse_float=_finite_float,
                parse_constant=_reject_constant,
            )
        if _SURROGATE_ESCAPE.search(text):
            json.dumps(header, ensure_ascii=False).encode("utf-8")
    except RecursionError:
        raise too_deep(file) from None
    except ValueError as error:
        reason = "a lone surrogate" if isinstance(error, UnicodeEncodeError) else error
        raise CorruptedCheckpointError(
            f"{file}: unreadable safetensors header ({reason})"
        ) from None
    if not isinstance(header, dict):
        raise CorruptedCheckpointError(f"{file}: safetensors header is not a JSON object")
    return header


def _plain_parse_may_differ(text: str, header: Any) -> bool:
    """Whether the text may hold what only the exact parse sees: a repeated ``__metadata__`` or
    entry field (each field's name then occurs more often than the entries that have it, unless
    escaped), or -0 (an integer here, a float there)."""
    if not isinstance(header, dict):
        return False
    entries = [entry for entry in header.values() if isinstance(entry, dict)]
    return (
        text.count(f'"{_METADATA_KEY}"') > 1
        or any(
            text.count(f'"{field}"') != sum(field in entry for entry in entries)
            for field in _ENTRY_FIELDS
        )
        or "\\u" in text  # an escaped name, such as "\\u0064type", eludes the counts
        or _MINUS_ZERO.search(text) is not None
    )


def _check_metadata(file: Path, header: dict) -> None:
    metadata = header.get(_METADATA_KEY)
    if _METADATA_KEY in getattr(header, "repeated", ()):
        raise CorruptedCheckpointError(f"{file}: {_METADATA_KEY} given twice")
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise CorruptedCheckpointError(f"{file}: {_METADATA_KEY} must map strings to strings")


def _entry(file: Path, name: str, raw: Any) -> _Entry:
    if isinstance(raw, list) and len(raw) == len(_ENTRY_FIELDS):
        raw = dict(zip(_ENTRY_FIELDS, raw))  # serde also reads a struct from a sequence
    if not isinstance(raw, dict):
        raise _malformed(file, name, "not a JSON object")
    if raw.keys() != set(_ENTRY_FIELDS) or getattr(raw, "repeated", None):
        _check_fields(file, name, raw)
    dtype, shape, offsets = (raw[field] for field in _ENTRY_FIELDS)
    if not isinstance(dtype, str) or dtype not in _DTYPE_BITS:
        raise _malformed(file, name, f"unknown dtype {_short(str(dtype), 20)}")
    if type(shape) is not list or not all(_is_usize(dim) for dim in shape):
        raise _malformed(file, name, "shape must list integers from 0 to 2**64-1")
    if type(offsets) is not list or len(offsets) != 2 or not all(map(_is_usize, offsets)):
        raise _malformed(file, name, "data_offsets must be two integers from 0 to 2**64-1")
    return _Entry(dtype, tuple(shape), offsets[0], offsets[1])


def _check_fields(file: Path, name: str, raw: dict) -> None:
    """An entry with fields missing, repeated or unknown: safetensors ignores unknown fields, so
    they are only bounded here (depth, numbers within float range)."""
    for field in _ENTRY_FIELDS:
        if field not in raw:
            raise _malformed(file, name, f"no {field!r}")
        if field in getattr(raw, "repeated", ()):
            raise _malformed(file, name, f"{field!r} given twice")
    for field, value in raw.items():
        if field not in _ENTRY_FIELDS:
            check_json_depth(2 + json_depth(value), file)
            if _holds_huge_integer(value):
                raise CorruptedCheckpointError(
                    f"{file}: unreadable safetensors header (number out of range)"
                )


def _holds_huge_integer(value: Any) -> bool:
    # serde_json reads an integer beyond 64 bits as a float: out of range past float's range.
    stack = [value]
    while stack:
        value = stack.pop()
        if isinstance(value, (dict, list)):
            stack.extend(value.values() if isinstance(value, dict) else value)
        elif type(value) is int and abs(value) >= 2**64 and not math.isfinite(_as_float(value)):
            return True
    return False


def _as_float(value: int) -> float:
    try:
        return float(value)
    except OverflowError:
        return math.inf


def _malformed(file: Path, name: str, reason: str) -> CorruptedCheckpointError:
    return CorruptedCheckpointError(
        f"{file}: tensor {_short(name)} has a malformed entry ({reason})"
    )


def _element_count(shape: tuple[int, ...]) -> int:
    """The product of ``shape``, or 2**64 when a partial product overflows 64 bits (safetensors
    refuses such a shape even when a later zero would bring the product back to 0)."""
    count = 1
    for dim in shape:
        count *= dim
        if count >= _USIZE_LIMIT:
            return _USIZE_LIMIT
    return count


def _check_layout(file: Path, entries: dict[str, _Entry], data_size: int) -> None:
    """The tensors tile the data section: contiguous, non-overlapping, sized by shape and dtype,
    and ending at the end of the file (safetensors' ``Metadata::validate``)."""
    position, previous = 0, None
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin != position or entry.end < entry.begin:
            where = f"overlaps {_short(previous)}" if entry.begin < position else "leaves a gap"
            if entry.end < entry.begin:
                where = "ends before it begins"
            raise CorruptedCheckpointError(
                f"{file}: tensor {_short(name)} {where} (data_offsets "
                f"[{entry.begin}, {entry.end}], expected to start at {position})"
            )
        bits = _element_count(entry.shape) * _DTYPE_BITS[entry.dtype]
        if bits >= _USIZE_LIMIT or bits % 8:
            raise CorruptedCheckpointError(
                f"{file}: tensor {_short(name)} of shape {list(entry.shape)} and dtype "
                f"{entry.dtype} does not fill a whole number of bytes below 2**64"
            )
        if entry.end - entry.begin != bits // 8:
            raise CorruptedCheckpointError(
                f"{file}: tensor {_short(name)} spans {entry.end - entry.begin} bytes, its shape "
                f"{list(entry.shape)} and dtype {entry.dtype} need {bits // 8}"
            )
        position, previous = entry.end, name
    if position > data_size:
        raise CorruptedCheckpointError(
            f"{file}: tensor data ends at byte {position} of the data section but the file holds "
            f"only {data_size} bytes of data (truncated)"
        )
    if position < data_size:
        raise CorruptedCheckpointError(
            f"{file}: {data_size - position} bytes after the last tensor that the header does not "
            "account for"
        )


def read_safetensors_header(file: Path, group: str) -> dict[str, TensorInfo]:
    """Index the tensors of one safetensors file from its header, validated as ``safe_open``
    validates it (see the module's docstring).

    Raises:
        CorruptedCheckpointError: naming the file (and tensor) when the file is not a regular
            file, the header is malformed, or the file is shorter or longer than its header says
            (a truncated download, say).
    """
    with open_regular(file) as handle:
        size = handle.seek(0, 2)
        handle.seek(0)
        raw_length = handle.read(8)
        if len(raw_length) < 8:
            raise CorruptedCheckpointError(f"{file}: not a safetensors file ({size} bytes)")
        header_length = int.from_bytes(raw_length, "little")
        # The length is not quoted: for a file that is not safetensors it is 8 bytes of content.
        if header_length > min(_MAX_HEADER_BYTES, size - 8):
            raise CorruptedCheckpointError(
                f"{file}: header length does not fit a file of {size} bytes "
                "(truncated or not a safetensors file)"
            )
        raw_header = handle.read(header_length)
    if len(raw_header) != header_length:
        raise CorruptedCheckpointError(f"{file}: shrank while being read")
    header = _parse_json(file, raw_header)
    _check_metadata(file, header)
    entries = {
        name: _entry(file, name, raw) for name, raw in header.items() if name != _METADATA_KEY
    }
    data_start = 8 + header_length
    _check_layout(file, entries, size - data_start)
    index = {}
    for name, entry in entries.items():
        if entry.dtype not in SAFETENSORS_DTYPES:
            raise CorruptedCheckpointError(
                f"{file}: tensor {_short(name)} has dtype {entry.dtype}, a valid safetensors "
                "dtype that hf_soups does not support"
            )
        dtype = SAFETENSORS_DTYPES[entry.dtype]
        index[name] = TensorInfo(
            file, dtype, entry.shape, data_start + entry.begin, entry.end - entry.begin, group
        )
    return index


def read_tensor(info: TensorInfo, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """Read one tensor into a CPU buffer: ``out`` when given (a contiguous tensor of the stored
    dtype and size, reused so that repeated reads cost no new pages), else a fresh one. No
    memory map stays behind."""
    if out is None:
        buffer = torch.empty(info.nbytes, dtype=torch.uint8)
    elif out.dtype != info.dtype or out.numel() != info.numel or not out.is_contiguous():
        raise ValueError(f"tensor {name!r}: buffer of {out.dtype} {list(out.shape)} does not fit")
    else:
        buffer = out.view(-1).view(torch.uint8)
    with open_regular(info.file) as handle:
        handle.seek(info.offset)
        got = handle.readinto(memoryview(buffer.numpy())) if info.nbytes else 0
    if got != info.nbytes:
        raise CorruptedCheckpointError(
            f"{info.file}: tensor {name!r} is cut short ({got} of {info.nbytes} bytes)"
        )
    return buffer.view(info.dtype).reshape(info.shape)
