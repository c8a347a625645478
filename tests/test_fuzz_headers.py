"""Safetensors headers and shard indexes, mutated: hf_soups accepts a header exactly when
``safetensors.safe_open`` does, and every merge ends with a one-line error or a correct output.

The checkpoint has two shards and an index, with tensors of equal byte size (so that swapped
offsets make a valid file whose tensors read each other's bytes), integer and boolean buffers and
an empty tensor. Hand-written cases cover each rule of the format; seeded random mutations of the
header bytes and of the index cover what nobody thought of. Each run goes through the real
command line in-process: exit 0 with weights equal to a float64 reference computed with
safetensors' own reader, or exit 2 with one line on stderr, an hf_soups error class (checked by
rerunning with ``--debug``), and nothing left in the output folder.
"""

import json
import os
import random
import shutil
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny import load_weights, weighted_reference

from hf_soups.checkpoint_files import MAX_JSON_DEPTH
from hf_soups.cli import main
from hf_soups.errors import CorruptedCheckpointError, HfSoupsError
from hf_soups.ingredients import read_safetensors_header

CONFIG = {"model_type": "toy", "architectures": ["Toy"]}
SHARDS = {
    "model-00001-of-00002.safetensors": ["w1", "ids", "flag"],
    "model-00002-of-00002.safetensors": ["w2", "b", "empty", "w3"],
}
SHARD_1, SHARD_2 = SHARDS
INDEX = "model.safetensors.index.json"
WEIGHTS = [0.25, 0.75]


def _tensors(seed):
    generator = torch.Generator().manual_seed(seed)
    return {
        "w1": torch.randn(2, 3, generator=generator),  # 24 bytes, as ids
        "ids": torch.arange(3, dtype=torch.int64),
        "flag": torch.tensor([True, False]),
        "w2": torch.randn(4, generator=generator).half(),  # 8 bytes, as b and w3
        "b": torch.randn(4, generator=generator).bfloat16(),
        "empty": torch.zeros(0, 2),
        "w3": torch.randn(2, generator=generator),
    }


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """Ingredient A (two shards and an index, the one mutated) and B (one file)."""
    root = tmp_path_factory.mktemp("fuzz")
    a, b = root / "a", root / "b"
    for folder in (a, b):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(CONFIG))
    tensors = _tensors(0)
    weight_map = {}
    for shard, names in SHARDS.items():
        save_file({name: tensors[name] for name in names}, a / shard)
        weight_map.update(dict.fromkeys(names, shard))
    (a / INDEX).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    save_file(_tensors(1), b / "model.safetensors")
    return a, b


def _split(data):
    length = int.from_bytes(data[:8], "little")
    return data[8 : 8 + length], data[8 + length :]


def _join(header, data, fix_length=True, original_length=None):
    length = len(header) if fix_length else original_length
    return struct.pack("<Q", length) + header + data


def _safetensors_verdict(file):
    try:
        with safe_open(file, "pt"):
            return True
    except Exception:  # noqa: BLE001 - any refusal of safetensors' reader counts
        return False


def _check_verdict(file):
    """hf_soups accepts the file exactly when safe_open does, except for valid dtypes torch cannot
    average, which it refuses saying so."""
    theirs = _safetensors_verdict(file)
    try:
        read_safetensors_header(file, "model")
    except CorruptedCheckpointError as error:
        message = str(error)
        assert "\n" not in message
        assert not theirs or "does not support" in message, message
        return
    assert theirs, f"hf_soups accepts {file.read_bytes()[:300]!r}, safetensors does not"


def _assert_matches(merged, reference):
    """The merge equals the reference (safetensors' own reader of every file, float64
    arithmetic, buffers from A) up to float32 rounding; empty tensors included."""
    assert merged.keys() == reference.keys()
    for name, expected in reference.items():
        got = merged[name]
        assert got.shape == expected.shape, name
        if expected.is_floating_point():
            assert got.dtype == torch.float32, name
            torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=0, msg=name)
        else:
            assert got.dtype == expected.dtype and torch.equal(got, expected), name


def _run_merge(a, b, outputs, capsys):
    """Merge A and B through the command line; check the outcome as the module says."""
    out = outputs / "soup"
    argv = ["merge", str(a), str(b), "--out", str(out), "--weights", "0.25,0.75"]
    argv += ["--dtype", "float32"]
    capsys.readouterr()
    code = main(["-q", *argv])
    stderr = capsys.readouterr().err
    if code == 0:
        assert os.listdir(outputs) == ["soup"]
        assert sorted(os.listdir(out)) == [
            "README.md",  # the model card every merge writes
            "config.json",
            "model.safetensors",
            "soup.json",
        ]
        _assert_matches(load_weights(out), weighted_reference([a, b], WEIGHTS))
        return "merged"
    assert code == 2, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("hf-soups merge: error: ")]
    assert len(errors) == 1 and stderr.endswith(errors[0] + "\n"), stderr
    assert os.listdir(outputs) == []  # no output, no temporary folder
    with pytest.raises(HfSoupsError) as caught:
        main(["-q", "--debug", *argv])
    assert "\n" not in str(caught.value)
    assert os.listdir(outputs) == []
    return type(caught.value).__name__


@pytest.fixture
def workspace(pristine, tmp_path):
    def fresh(case):
        root = tmp_path / f"case{case}"
        a = shutil.copytree(pristine[0], root / "a")
        outputs = root / "outputs"
        outputs.mkdir()
        return a, pristine[1], outputs

    return fresh


# ---------------------------------------------------------------- hand-written header cases

ENTRY = '"dtype":"F32","shape":[2],"data_offsets":[0,8]'


def _file(header: str, data_size=8):
    return _join(header.encode(), b"\x01" * data_size)


def _nested(depth):
    return "[" * depth + "]" * depth


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
    "not UTF-8": (_join(b'{"x\xff":{' + ENTRY.encode() + b"}}", b"\x01" * 8), False, "UTF-8"),
    f"nested {MAX_JSON_DEPTH} deep": (
        _file('{"x":{' + ENTRY + ',"note":' + _nested(MAX_JSON_DEPTH - 2) + "}}"),
        True,
        None,
    ),
    f"nested {MAX_JSON_DEPTH + 1} deep": (
        _file('{"x":{' + ENTRY + ',"note":' + _nested(MAX_JSON_DEPTH - 1) + "}}"),
        False,
        "nested 128 deep",
    ),
    "nested 100000 deep": (_file('{"x":' + _nested(100_000) + "}"), False, "nested"),
    "empty header": (_join(b"", b""), False, "unreadable"),
    "header longer than file": (struct.pack("<Q", 100) + b"{}", False, "header length"),
    "header over 100 MB": (struct.pack("<Q", 100_000_001) + b"{}", False, "header length"),
    "shorter than 8 bytes": (b"\x02\x00\x00", False, "not a safetensors file"),
}


@pytest.mark.parametrize("case", HEADER_CASES, ids=list(HEADER_CASES))
def test_header_rules_agree_with_safetensors(case, tmp_path):
    data, accepted, fragment = HEADER_CASES[case]
    file = tmp_path / "model.safetensors"
    file.write_bytes(data)
    assert _safetensors_verdict(file) == accepted
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
        file.write_bytes(_join(header.encode(), data))
        info = read_safetensors_header(file, "model")["x"]
        with safe_open(file, "pt") as handle:
            assert torch.equal(handle.get_tensor("x"), values)
        assert info.offset == 8 + len(header) and info.nbytes == 8 and info.shape == (2,)


# ---------------------------------------------------------------- seeded header mutations

TOKENS = [
    '"F32"', '"F16"', '"BF16"', '"I64"', '"BOOL"', '"dtype"', '"shape"', '"data_offsets"',
    '"__metadata__"', '"pt"', "[", "]", "{", "}", ",", ":", "0", "2", "3", "4", "8", "24",
]  # fmt: skip
REPLACEMENTS = [
    '"F64"', '"I32"', '"I16"', '"U16"', '"F16"', '"BF16"', '"F32"', '"C64"', '"F4"', '"Q32"',
    '"U8"', "null", "true", "-1", "-0", "1.5", "1e400", "NaN", "18446744073709551616", "[", "]",
    "{", "}", ",", ":", '"', "", " ", "0", "1", "2", "3", "4", "6", "8", "16", "[[[[", '"x"',
]  # fmt: skip


def _mutate_header(rng: random.Random, data: bytes) -> bytes:
    header, rest = _split(data)
    length = len(header)
    fix = rng.random() < 0.85
    kind = rng.choice(["byte", "bit", "token", "token", "token", "insert", "delete", "length"])
    kind = rng.choice([kind, kind, "truncate", "append", "structured", "structured"])
    if kind == "byte":
        position = rng.randrange(8 + length)
        return data[:position] + bytes([rng.randrange(256)]) + data[position + 1 :]
    if kind == "bit":
        position = rng.randrange(8 + length)
        return (
            data[:position] + bytes([data[position] ^ 1 << rng.randrange(8)]) + data[position + 1 :]
        )
    if kind == "token":
        text = header.decode()
        token = rng.choice([t for t in TOKENS if t in text])
        starts = [i for i in range(len(text)) if text.startswith(token, i)]
        start = rng.choice(starts)
        mutated = text[:start] + rng.choice(REPLACEMENTS) + text[start + len(token) :]
        return _join(mutated.encode(), rest, fix, length)
    if kind == "insert":
        position = rng.randrange(length + 1)
        byte = rng.choice([b" ", b"\n", b"\t", b"{", b"[", b'"', b",", b"-", b"0", b"9", b"\x00"])
        return _join(header[:position] + byte + header[position:], rest, fix, length)
    if kind == "delete":
        position = rng.randrange(length)
        return _join(header[:position] + header[position + 1 :], rest, fix, length)
    if kind == "length":
        change = rng.choice([1, 2, 7, 8, 100, 2**32, 2**63]) * rng.choice([-1, 1])
        return struct.pack("<Q", max(0, length + change) % 2**64) + header + rest
    if kind == "truncate":
        return data[: rng.randrange(len(data))]
    if kind == "append":
        return data + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 17)))
    return _join(_structured(rng, json.loads(header)).encode(), rest)


def _structured(rng, header):
    """A JSON-level mutation of a parsed header, serialized again."""
    names = [name for name in header if name != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    operation = rng.randrange(11)
    if operation == 0:  # swap two tensors' bytes: valid when their sizes match
        other = rng.choice(names)
        entry["data_offsets"], header[other]["data_offsets"] = (
            header[other]["data_offsets"],
            entry["data_offsets"],
        )
    elif operation == 1:
        entry["shape"] = list(reversed(entry["shape"])) or [rng.choice([0, 1])]
    elif operation == 2:
        entry["shape"] = [rng.choice([-1, 1.5, True, "2", None, 2**64, 2**64 - 1, [2]])]
    elif operation == 3:
        shift = rng.choice([-4, -1, 1, 4])
        entry["data_offsets"] = [max(0, offset + shift) for offset in entry["data_offsets"]]
    elif operation == 4:
        entry["dtype"] = rng.choice(["F16", "BF16", "I16", "U16", "F32", "I32", "U32", "F64"])
    elif operation == 5:
        del header[name]
    elif operation == 6:
        header[name + rng.choice(["", "_renamed"])] = header.pop(name)
    elif operation == 7:
        header["__metadata__"] = rng.choice([None, {"a": "b"}, {"a": 1}, [], "pt"])
    elif operation == 8:
        entry["note"] = json.loads(_nested(rng.choice([1, 60, MAX_JSON_DEPTH - 2, 300])))
    elif operation == 9:
        header[name] = [entry["dtype"], entry["shape"], entry["data_offsets"]]
    else:
        end = max(offsets[1] for key, offsets in _offsets(header))
        header["extra"] = {"dtype": "F32", "shape": [0], "data_offsets": [end, end]}
    text = json.dumps(header, separators=rng.choice([(",", ":"), (", ", ": ")]))
    return text + " " * rng.choice([0, -len(text) % 8])


def _offsets(header):
    for key, entry in header.items():
        if isinstance(entry, dict) and "data_offsets" in entry:
            yield key, entry["data_offsets"]


@pytest.mark.timeout(120)
def test_mutated_headers_end_in_one_line_or_a_correct_merge(workspace, capsys, one_thread):
    rng = random.Random(21)
    outcomes = {}
    for case in range(260):
        a, b, outputs = workspace(case)
        shard = a / rng.choice([SHARD_1, SHARD_2])
        shard.write_bytes(_mutate_header(rng, shard.read_bytes()))
        _check_verdict(shard)
        outcome = _run_merge(a, b, outputs, capsys)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    # The mutations reach every kind of outcome, not only the first check.
    assert outcomes.get("merged", 0) >= 5, outcomes
    assert outcomes.get("CorruptedCheckpointError", 0) >= 100, outcomes
    assert outcomes.get("IncompatibleIngredientsError", 0) >= 5, outcomes


# ---------------------------------------------------------------- seeded index mutations


def _mutate_index(rng: random.Random, index: dict, a, b) -> str:
    weight_map = index["weight_map"]
    name = rng.choice(sorted(weight_map))
    operation = rng.randrange(9)
    if operation == 0:
        index["weight_map"] = rng.choice([[], None, "model.safetensors", 3, {}, [[name, SHARD_1]]])
    elif operation == 1:
        weight_map[name] = rng.choice([None, 5, [], {"a": 1}, True, ""])
    elif operation == 2:  # other files, inside the folder or not
        weight_map[name] = rng.choice(
            [
                os.path.relpath(b / "model.safetensors", a),
                str(b / "model.safetensors"),
                "/dev/zero",
                "config.json",
                "model-00003-of-00002.safetensors",
                f"sub/../{weight_map[name]}",
                weight_map[name] + "\0",
                SHARD_1 if weight_map[name] == SHARD_2 else SHARD_2,
            ]
        )
    elif operation == 3:  # equivalent spellings of the same file
        weight_map[name] = rng.choice(
            [f"./{weight_map[name]}", f"{weight_map[name]}/", f".//{weight_map[name]}"]
        )
    elif operation == 4:
        del weight_map[name]
    elif operation == 5:
        weight_map[name + "_renamed"] = weight_map.pop(name)
    elif operation == 6:
        index["metadata"] = "NESTED"
    elif operation == 7:
        index = rng.choice([[], None, "x", {"metadata": {}}])
    text = json.dumps(index)
    if operation == 6:  # as text: json itself cannot write 5000 levels
        depth = rng.choice([1, 100, MAX_JSON_DEPTH - 1, MAX_JSON_DEPTH, 5000])
        text = text.replace('"NESTED"', _nested(depth))
    if operation == 8:  # bytes of the text
        position = rng.randrange(len(text))
        edit = rng.choice(["", " ", '"', "{", "]", ",", "\\", "\x00", "é"])
        text = text[:position] + edit + text[position + rng.choice([0, 1]) :]
    return text


@pytest.mark.timeout(120)
def test_mutated_indexes_end_in_one_line_or_a_correct_merge(workspace, capsys, one_thread):
    rng = random.Random(2121)
    outcomes = {}
    for case in range(120):
        a, b, outputs = workspace(case)
        index = json.loads((a / INDEX).read_text())
        (a / INDEX).write_text(_mutate_index(rng, index, a, b))
        outcome = _run_merge(a, b, outputs, capsys)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert outcomes.get("merged", 0) >= 5, outcomes
    assert outcomes.get("CorruptedCheckpointError", 0) >= 50, outcomes
