"""Safetensors headers, rule by rule: hf_soups accepts a header exactly when
``safetensors.safe_open`` does (the reference in every case), except for valid dtypes torch cannot
average, which it refuses saying so; each refusal is one line naming the file."""

import struct

import pytest
import torch
from header_bytes import join_header, nested, safetensors_accepts
from safetensors import safe_open

from hf_soups.checkpoint_files import MAX_JSON_DEPTH
from hf_soups.errors import CorruptedCheckpointError
from hf_soups.ingredients import read_safetensors_header

ENTRY = '"dtype":"F32","shape":[2],"data_offsets":[0,8]'


def _file(header: str, data_size=8):
    return join_header(header.encode(), b"\x01" * data_size)


HEADER_CASES = {
    # (file bytes, accepted by safetensors, fragment of hf_soups' message when refused)
    "valid": (_file('{"x":{' + ENTRY + "}}"), True, None),
    "metadata null": (_file('{"__metadata__":null,"x":{' + ENTRY + "}}"), True, None),
    "entry as array": (_file('{"x":["F32",[2],[0,8]]}'), True, None),
    "unknown field": (_file('{"x":{' + ENTRY + ',"note":[1,{"a":null}]}}'), True, None),
    "trailing spaces": (_file('{"x":{' + ENTRY + "}}    "), True, None),
    "two empty tensors": (
        _file(
            '{"e":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},'
            '"f":{"dtype":"I64","shape":[3,0],"data_offsets":[0,0]},"x":{' + ENTRY + "}}"
        ),
        True,
        None,
    ),
    "negative dim": (
        _file('{"x":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}'),
        False,
        "shape",
    ),
    "minus zero dim": (
        _file('{"x":{"dtype":"F32","shape":[-0,2],"data_offsets":[0,0]}}', 0),
        False,
        "shape",
    ),
    "float dim": (
        _file('{"x":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}}'),
        False,
        "shape",
    ),
    "exponent dim": (
        _file('{"x":{"dtype":"F32","shape":[2e0],"data_offsets":[0,8]}}'),
        False,
        "shape",
    ),
    "bool dim": (
        _file('{"x":{"dtype":"F32","shape":[true,2],"data_offsets":[0,8]}}'),
        False,
        "shape",
    ),
    "string dim": (
        _file('{"x":{"dtype":"F32","shape":["2"],"data_offsets":[0,8]}}'),
        False,
        "shape",
    ),
    "dim of 2**64": (
        _file('{"x":{"dtype":"F32","shape":[18446744073709551616,0],"data_offsets":[0,0]}}', 0),
        False,
        "shape",
    ),
    "overflowing shape": (
        _file('{"x":{"dtype":"F32","shape":[4294967296,4294967296,0],"data_offsets":[0,0]}}', 0),
        False,
        "2**64",
    ),
    "float offset": (
        _file('{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8.0]}}'),
        False,
        "data_offsets",
    ),
    "three offsets": (
        _file('{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8,8]}}'),
        False,
        "data_offsets",
    ),
    "overlapping": (
        _file('{"x":{' + ENTRY + '},"y":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}', 12),
        False,
        "overlaps 'x'",
    ),
    "same offsets twice": (
        _file('{"x":{' + ENTRY + '},"y":{' + ENTRY + "}}"),
        False,
        "overlaps",
    ),
    "gap": (_file('{"x":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}', 12), False, "gap"),
    "end before begin": (
        _file(
            '{"x":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"y":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}}',
            8,
        ),
        False,
        "ends before it begins",
    ),
    "size of shape": (
        _file('{"x":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}'),
        False,
        "need 12",
    ),
    "size of dtype": (
        _file('{"x":{"dtype":"F64","shape":[2],"data_offsets":[0,8]}}'),
        False,
        "need 16",
    ),
    "trailing data": (_file('{"x":{' + ENTRY + "}}", 9), False, "1 bytes after the last tensor"),
    "short data": (_file('{"x":{' + ENTRY + "}}", 7), False, "truncated"),
    "unknown dtype": (
        _file('{"x":{"dtype":"F31","shape":[2],"data_offsets":[0,8]}}'),
        False,
        "unknown dtype 'F31'",
    ),
    "dtype list": (
        _file('{"x":{"dtype":["F32"],"shape":[2],"data_offsets":[0,8]}}'),
        False,
        "unknown dtype",
    ),
    "lower-case dtype": (
        _file('{"x":{"dtype":"f32","shape":[2],"data_offsets":[0,8]}}'),
        False,
        "unknown dtype",
    ),
    "sub-byte dtype": (
        _file('{"x":{"dtype":"F4","shape":[16],"data_offsets":[0,8]}}'),
        True,
        "does not support",
    ),
    "complex dtype": (
        _file('{"x":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}}'),
        True,
        "does not support",
    ),
    "odd sub-byte count": (
        _file('{"x":{"dtype":"F4","shape":[1],"data_offsets":[0,1]}}', 1),
        False,
        "whole number",
    ),
    "missing field and an unknown one": (
        _file('{"x":{"dtype":"F32","data_offsets":[0,8],"note":1}}'),
        False,
        "no 'shape'",
    ),
    "huge integer in an unknown field": (
        _file('{"x":{' + ENTRY + ',"note":-' + "9" * 400 + "}}"),
        False,
        "out of range",
    ),
    "integer beyond 64 bits in an unknown field": (
        _file('{"x":{' + ENTRY + ',"note":' + "9" * 30 + "}}"),
        True,
        None,
    ),
    "minus zero in an unknown field": (_file('{"x":{' + ENTRY + ',"note":-0}}'), True, None),
    "unknown field twice": (_file('{"x":{' + ENTRY + ',"note":1,"note":2}}'), True, None),
    "escaped field name": (
        _file('{"x":{"\\u0064type":"F32","shape":[2],"data_offsets":[0,8]}}'),
        True,
        None,
    ),
    "escaped field name twice": (
        _file('{"x":{"\\u0064type":"F32",' + ENTRY + "}}"),
        False,
        "'dtype' given twice",
    ),
    "missing field": (_file('{"x":{"dtype":"F32","data_offsets":[0,8]}}'), False, "no 'shape'"),
    "field twice": (_file('{"x":{"dtype":"F32",' + ENTRY + "}}"), False, "'dtype' given twice"),
    "entry null": (_file('{"x":null}'), False, "not a JSON object"),
    "metadata twice": (
        _file('{"__metadata__":{},"__metadata__":{},"x":{' + ENTRY + "}}"),
        False,
        "twice",
    ),
    "metadata number": (
        _file('{"__metadata__":{"format":1},"x":{' + ENTRY + "}}"),
        False,
        "strings to strings",
    ),
    "root list": (_file("[]", 0), False, "not a JSON object"),
    "NaN": (_file('{"x":{' + ENTRY + ',"note":NaN}}'), False, "unreadable"),
    "number out of range": (_file('{"x":{' + ENTRY + ',"note":1e400}}'), False, "out of range"),
    "lone surrogate": (_file('{"x\\ud800":{' + ENTRY + "}}"), False, "surrogate"),
    "control character": (_file('{"x\x01":{' + ENTRY + "}}"), False, "unreadable"),
    "trailing garbage": (_file('{"x":{' + ENTRY + "}}x"), False, "unreadable"),
    "byte order mark": (_file('\ufeff{"x":{' + ENTRY + "}}"), False, "unreadable"),
    "not UTF-8": (join_header(b'{"x\xff":{' + ENTRY.encode() + b"}}", b"\x01" * 8), False, "UTF-8"),
    f"nested {MAX_JSON_DEPTH} deep": (
        _file('{"x":{' + ENTRY + ',"note":' + nested(MAX_JSON_DEPTH - 2) + "}}"),
        True,
        None,
    ),
    f"nested {MAX_JSON_DEPTH + 1} deep": (
        _file('{"x":{' + ENTRY + ',"note":' + nested(MAX_JSON_DEPTH - 1) + "}}"),
        False,
        "nested 128 deep",
    ),
    "nested 100000 deep": (_file('{"x":' + nested(100_000) + "}"), False, "nested"),
    "empty header": (join_header(b"", b""), False, "unreadable"),
    "header longer than file": (struct.pack("<Q", 100) + b"{}", False, "header length"),
    "header over 100 MB": (struct.pack("<Q", 100_000_001) + b"{}", False, "header length"),
    "shorter than 8 bytes": (b"\x02\x00\x00", False, "not a safetensors file"),
}


@pytest.mark.parametrize("case", HEADER_CASES, ids=list(HEADER_CASES))
def test_header_rules_agree_with_safetensors(case, tmp_path):
    data, accepted, fragment = HEADER_CASES[case]
    file = tmp_path / "model.safetensors"
    file.write_bytes(data)
    assert safetensors_accepts(file) == accepted
    if fragment is None:
        assert set(read_safetensors_header(file, "model")) >= {"x"}
        return
    with pytest.raises(CorruptedCheckpointError) as caught:
        read_safetensors_header(file, "model")
    message = str(caught.value)
    assert fragment in message and str(file) in message and "\n" not in message


def test_entry_as_array_and_unknown_fields_read_the_right_bytes(tmp_path):
    values = torch.tensor([1.5, -2.0])
    data = values.numpy().tobytes()
    for header in ('{"x":["F32",[2],[0,8]]}', '{"x":{' + ENTRY + ',"note":{"k":[1]}}}'):
        file = tmp_path / "model.safetensors"
        file.write_bytes(join_header(header.encode(), data))
        info = read_safetensors_header(file, "model")["x"]
        with safe_open(file, "pt") as handle:
            assert torch.equal(handle.get_tensor("x"), values)
        assert info.offset == 8 + len(header) and info.nbytes == 8 and info.shape == (2,)
