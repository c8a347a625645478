"""Safetensors files as bytes, for tests that build or break headers by hand."""

from __future__ import annotations

import struct
from pathlib import Path

from safetensors import safe_open


def split_header(data: bytes) -> tuple[bytes, bytes]:
    """A safetensors file's JSON header and what follows it."""
    length = int.from_bytes(data[:8], "little")
    return data[8 : 8 + length], data[8 + length :]


def join_header(header: bytes, data: bytes, length: int | None = None) -> bytes:
    """A safetensors file from its header and data; ``length`` overrides the length prefix."""
    return struct.pack("<Q", len(header) if length is None else length) + header + data


def nested(depth: int) -> str:
    """JSON arrays nested ``depth`` deep."""
    return "[" * depth + "]" * depth


def safetensors_accepts(file: str | Path) -> bool:
    """Whether ``safetensors.safe_open`` opens ``file``: the reference for valid headers."""
    try:
        with safe_open(file, "pt"):
            return True
    except Exception:  # noqa: BLE001 - any refusal of safetensors' reader counts
        return False
