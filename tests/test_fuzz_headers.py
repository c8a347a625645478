"""Safetensors headers and shard indexes, mutated: hf_soups accepts a header exactly when
``safetensors.safe_open`` does, and every merge ends with a one-line error or a correct output.

The checkpoint has two shards and an index, with tensors of equal byte size (so that swapped
offsets make a valid file whose tensors read each other's bytes), integer and boolean buffers and
an empty tensor. Seeded random mutations of the header bytes and of the index cover what the
rule-by-rule cases of test_safetensors_spec.py did not think of. Each run goes through the real
command line in-process: exit 0 with weights equal to a float64 reference computed with
safetensors' own reader, or exit 2 with one line on stderr, an hf_soups error class (checked by
rerunning with ``--debug``), and nothing left in the output folder.
"""

import json
import os
import random
import shutil

import pytest
import torch
from header_bytes import join_header, nested, safetensors_accepts, split_header
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


def _check_verdict(file):
    """hf_soups accepts the file exactly when safe_open does, except for valid dtypes torch cannot
    average, which it refuses saying so."""
    theirs = safetensors_accepts(file)
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
    header, rest = split_header(data)
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
        return join_header(mutated.encode(), rest, None if fix else length)
    if kind == "insert":
        position = rng.randrange(length + 1)
        byte = rng.choice([b" ", b"\n", b"\t", b"{", b"[", b'"', b",", b"-", b"0", b"9", b"\x00"])
        return join_header(
            header[:position] + byte + header[position:], rest, None if fix else length
        )
    if kind == "delete":
        position = rng.randrange(length)
        return join_header(
            header[:position] + header[position + 1 :], rest, None if fix else length
        )
    if kind == "length":
        change = rng.choice([1, 2, 7, 8, 100, 2**32, 2**63]) * rng.choice([-1, 1])
        return join_header(header, rest, max(0, length + change) % 2**64)
    if kind == "truncate":
        return data[: rng.randrange(len(data))]
    if kind == "append":
        return data + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 17)))
    return join_header(_structured(rng, json.loads(header)).encode(), rest)


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
        entry["dtype"] = rng.choice(
            ["F16", "BF16", "I16", "U16", "F32", "I32", "U32", "F64", 3, ["F32"], {}, None]
        )
    elif operation == 5:
        del header[name]
    elif operation == 6:
        header[name + rng.choice(["", "_renamed"])] = header.pop(name)
    elif operation == 7:
        header["__metadata__"] = rng.choice([None, {"a": "b"}, {"a": 1}, [], "pt"])
    elif operation == 8:
        entry["note"] = json.loads(nested(rng.choice([1, 60, MAX_JSON_DEPTH - 2, 300])))
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
        text = text.replace('"NESTED"', nested(depth))
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
