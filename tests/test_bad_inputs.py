"""Every bad input fails with a specific error naming the culprit, and leaves no output behind."""

import importlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny import (
    assert_matches_reference,
    load_weights,
    make_clip_folder,
    make_vit_folder,
    weighted_reference,
    write_weights_folder,
)

from hf_soups.errors import (
    CorruptedCheckpointError,
    IncompatibleIngredientsError,
    IngredientNotFoundError,
    InvalidWeightsError,
    NonFiniteWeightsError,
    OutputExistsError,
    UnsafeCheckpointError,
)
from hf_soups.merge import merge

# `hf_soups.merge` the attribute is the function; the module is reached through importlib.
merge_module = importlib.import_module("hf_soups.merge")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    return make_vit_folder(root / "a", seed=0), make_vit_folder(root / "b", seed=1)


@pytest.fixture
def setup(pristine, tmp_path):
    """Fresh copies of two compatible ViTs, and an empty folder to write outputs into."""
    a = shutil.copytree(pristine[0], tmp_path / "a")
    b = shutil.copytree(pristine[1], tmp_path / "b")
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    return a, b, outputs


def fails_cleanly(outputs, error, fragments, sources, **kwargs):
    """Run merge, expect ``error`` naming every fragment, and nothing new in ``outputs``."""
    before = sorted(os.listdir(outputs))
    with pytest.raises(error) as caught:
        merge(sources, outputs / "soup", progress=False, **kwargs)
    message = str(caught.value)
    for fragment in fragments:
        assert str(fragment) in message, (fragment, message)
    assert "\n" not in message
    assert sorted(os.listdir(outputs)) == before  # no output, no temporary folder
    return message


def _edit_weights(folder, edit):
    file = folder / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)


def test_missing_tensor(setup):
    a, b, outputs = setup
    _edit_weights(b, lambda t: t.pop("classifier.bias"))
    fails_cleanly(outputs, IncompatibleIngredientsError, [b, "lacks", "classifier.bias"], [a, b])


def test_extra_tensor(setup):
    a, b, outputs = setup
    _edit_weights(b, lambda t: t.update({"extra.weight": torch.ones(2)}))
    fails_cleanly(outputs, IncompatibleIngredientsError, [b, "extra.weight"], [a, b])


def test_shape_mismatch(setup, tmp_path):
    a, _, outputs = setup
    four_labels = make_vit_folder(tmp_path / "four", seed=1, num_labels=4)
    fails_cleanly(
        outputs,
        IncompatibleIngredientsError,
        ["classifier.bias", "[4]", "[3]", four_labels],
        [a, four_labels],
    )


def test_different_architecture(setup, tmp_path):
    a, _, outputs = setup
    clip = make_clip_folder(tmp_path / "clip", seed=0)
    fragments = [
        f"different architectures: {clip} is a clip checkpoint (CLIPModel) but {a} is a vit "
        "checkpoint (ViTForImageClassification)"
    ]
    fails_cleanly(outputs, IncompatibleIngredientsError, fragments, [a, clip])


@pytest.mark.parametrize("keep", [4, 200, 0.5])
def test_truncated_safetensors_file(setup, keep):
    a, b, outputs = setup
    file = b / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    fails_cleanly(outputs, CorruptedCheckpointError, [file], [a, b])


def test_truncated_shard_of_a_sharded_checkpoint(setup, tmp_path):
    a, _, outputs = setup
    sharded = make_vit_folder(tmp_path / "sharded", seed=1, max_shard_size="8KB")
    shard = sorted(sharded.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-10])
    fails_cleanly(outputs, CorruptedCheckpointError, [shard, "truncated"], [a, sharded])


@pytest.mark.parametrize(
    "corrupt, expected",
    [
        (lambda d: d[:8] + b"\xff" * 16 + d[24:], "unreadable safetensors header"),
        (lambda d: (2**40).to_bytes(8, "little") + d[8:], "header length"),
        (lambda d: d.replace(b'"F32"', b'"Q32"', 1), "malformed entry"),
        (lambda d: d.replace(b'"shape":[3]', b'"shape":[5]', 1), "need"),
    ],
    ids=["garbage", "length", "dtype", "shape"],
)
def test_corrupted_header(setup, corrupt, expected):
    a, b, outputs = setup
    file = b / "model.safetensors"
    data = file.read_bytes()
    corrupted = corrupt(data)
    assert corrupted != data and len(corrupted) == len(data)
    file.write_bytes(corrupted)
    fails_cleanly(outputs, CorruptedCheckpointError, [file, expected], [a, b])


def _overlap_first_two(header):
    first, second = sorted(
        (name for name in header if name != "__metadata__"),
        key=lambda name: header[name]["data_offsets"],
    )[:2]
    header[second]["data_offsets"][0] -= 4  # starts inside `first`
    header[second]["data_offsets"][1] -= 4


@pytest.mark.parametrize(
    "edit, expected",
    [
        (_overlap_first_two, "overlaps"),
        (lambda h: h["classifier.bias"].update(shape=[3.0]), "shape"),
        (lambda h: h["classifier.bias"].update(shape=[-3]), "shape"),
        (lambda h: h["classifier.bias"].update(shape=[True, 3]), "shape"),
        (lambda h: h["classifier.bias"].update(note=[[[[]]]] * 2), None),  # ignored, as there
        (lambda h: h["classifier.bias"].update(note="[" * 130 + "]" * 130), "nested 132 deep"),
        (lambda h: h["classifier.bias"].update(note="[" * 50_000 + "]" * 50_000), "nested"),
    ],
    ids=["overlap", "float dim", "negative dim", "bool dim", "extra", "deep", "very deep"],
)
def test_headers_safetensors_refuses_are_refused(setup, edit, expected):
    # Rewrites the JSON header (and its length) of a real checkpoint; safetensors' own reader is
    # the reference for which files are valid.
    a, b, outputs = setup
    file = b / "model.safetensors"
    data = file.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    edit(header)
    # Deep nesting is given as a string (json cannot write 50,000 levels), unquoted here.
    text = json.dumps(header).replace('"[', "[").replace(']"', "]").encode()
    file.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + length :])
    try:
        with safe_open(file, "pt"):
            safetensors_accepts = True
    except Exception:  # noqa: BLE001 - any refusal
        safetensors_accepts = False
    assert safetensors_accepts == (expected is None)
    if expected is None:
        out = merge([a, b], outputs / "soup", progress=False)
        assert_matches_reference(load_weights(out), weighted_reference([a, b], [0.5, 0.5]))
        return
    fails_cleanly(outputs, CorruptedCheckpointError, [file, expected], [a, b])


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_weights_fail(setup, bad):
    a, b, outputs = setup
    _edit_weights(b, lambda t: t["vit.embeddings.cls_token"].view(-1).__setitem__(3, bad))
    fails_cleanly(
        outputs, NonFiniteWeightsError, ["vit.embeddings.cls_token", b, "allow_non_finite"], [a, b]
    )


def test_non_finite_weights_warn_when_allowed(setup, caplog):
    a, b, outputs = setup
    _edit_weights(b, lambda t: t["vit.embeddings.cls_token"].view(-1).__setitem__(3, math.nan))
    with caplog.at_level(logging.WARNING, logger="hf_soups"):
        out = merge([a, b], outputs / "soup", allow_non_finite=True, progress=False)
    assert any(
        "vit.embeddings.cls_token" in r.message and str(b) in r.message for r in caplog.records
    )
    merged = load_file(out / "model.safetensors")["vit.embeddings.cls_token"]
    assert torch.isnan(merged.view(-1)[3]) and torch.isfinite(merged.view(-1)[:3]).all()


def test_huge_finite_values_are_not_mistaken_for_non_finite(tmp_path):
    # Their sum overflows float32, which must not be taken for an inf in the weights.
    huge = torch.full((8,), 3e38)
    folders = [write_weights_folder(tmp_path / f"in{i}", {"w": huge}) for i in range(2)]
    out = merge(folders, tmp_path / "soup", progress=False)
    assert torch.equal(load_file(out / "model.safetensors")["w"], huge)


@pytest.mark.parametrize(
    "weights, fragment",
    [
        ([1.0], "got 1 weights for 2"),
        ([0.5, 0.2, 0.3], "got 3 weights for 2"),
        ([math.nan, 0.5], "nan"),
        ([0.5, math.inf], "inf"),
    ],
)
def test_bad_mixing_weights(setup, weights, fragment):
    a, b, outputs = setup
    fails_cleanly(outputs, InvalidWeightsError, ["weights", fragment], [a, b], weights=weights)


def test_weights_and_method_together(setup):
    from hf_soups.methods.base import WeightedAverage

    a, b, outputs = setup
    fails_cleanly(
        outputs,
        ValueError,
        ["weights"],
        [a, b],
        weights=[0.5, 0.5],
        method=WeightedAverage([0.5, 0.5]),
    )


def test_no_ingredients(setup):
    _, _, outputs = setup
    fails_cleanly(outputs, IncompatibleIngredientsError, ["no ingredients"], [])


def test_missing_source_and_file_source(setup, tmp_path):
    a, _, outputs = setup
    missing = tmp_path / "no" / "such" / "model"
    fails_cleanly(outputs, IngredientNotFoundError, [missing], [a, missing])
    weights_file = a / "model.safetensors"
    fails_cleanly(outputs, IngredientNotFoundError, [weights_file, "is a file"], [weights_file])
    empty = tmp_path / "empty"
    empty.mkdir()
    fails_cleanly(outputs, CorruptedCheckpointError, [empty, "no safetensors"], [a, empty])


def test_pickle_only_checkpoint_is_refused(setup, tmp_path):
    a, _, outputs = setup
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(a / "config.json", pickled / "config.json")
    torch.save(load_weights(a), pickled / "pytorch_model.bin")
    fails_cleanly(
        outputs, UnsafeCheckpointError, [pickled, "pytorch_model.bin", "allow_pickle"], [a, pickled]
    )
    # Opting in loads it (with weights_only=True) and merges it like any other ingredient.
    from hf_soups.ingredients import Ingredient

    ingredient = Ingredient.from_source(pickled, allow_pickle=True)
    out = merge([a, ingredient], outputs / "soup", progress=False)
    assert_matches_reference(load_weights(out), weighted_reference([a, a], [0.5, 0.5]))


class _RunsCode:
    """Unpickling this calls ``touch MARKER``: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_running_pickle_is_refused_even_when_pickles_are_allowed(setup, tmp_path):
    a, _, outputs = setup
    evil = tmp_path / "evil"
    evil.mkdir()
    shutil.copy(a / "config.json", evil / "config.json")
    marker = tmp_path / "pwned"
    torch.save({"w": _RunsCode(marker)}, evil / "pytorch_model.bin")
    from hf_soups.ingredients import Ingredient

    with pytest.raises(
        CorruptedCheckpointError, match="pytorch_model.bin.*cannot be loaded safely"
    ):
        Ingredient.from_source(evil, allow_pickle=True)
    assert not marker.exists()
    assert os.listdir(outputs) == []


def test_existing_output_folder_is_untouched(setup):
    a, b, outputs = setup
    existing = outputs / "soup"
    existing.mkdir()
    (existing / "keep.txt").write_text("precious")
    fails_cleanly(outputs, OutputExistsError, [existing, "overwrite"], [a, b])
    assert os.listdir(existing) == ["keep.txt"]
    assert (existing / "keep.txt").read_text() == "precious"
    # A file in the way is refused too.
    blocker = outputs / "file"
    blocker.write_text("x")
    with pytest.raises(OutputExistsError, match="file"):
        merge([a, b], blocker, progress=False)
    assert blocker.read_text() == "x"


def test_empty_existing_output_folder_is_used(setup):
    a, b, outputs = setup
    (outputs / "soup").mkdir()
    out = merge([a, b], outputs / "soup", progress=False)
    assert_matches_reference(load_weights(out), weighted_reference([a, b], [0.5, 0.5]))
    assert os.listdir(outputs) == ["soup"]


def test_overwrite_replaces_the_output(setup):
    a, b, outputs = setup
    old = merge([a, b], outputs / "soup", weights=[1, 0], progress=False)
    (old / "stale.txt").write_text("from the old soup")
    out = merge([a, b], outputs / "soup", weights=[0.3, 0.7], overwrite=True, progress=False)
    assert not (out / "stale.txt").exists()
    assert_matches_reference(load_weights(out), weighted_reference([a, b], [0.3, 0.7]))
    assert os.listdir(outputs) == ["soup"]  # no trash or temporary folder left


def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporary_folder_of_a_dead_process_is_cleaned(setup):
    a, b, outputs = setup
    stale = outputs / f".soup.tmp-{_dead_pid()}-abc123"
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"partial")
    # A merge still running in another process keeps its folder.
    live = outputs / f".soup.tmp-{os.getppid()}-def456"
    live.mkdir()

    out = merge([a, b], outputs / "soup", progress=False)

    assert sorted(os.listdir(outputs)) == sorted(["soup", live.name])
    assert_matches_reference(load_weights(out), weighted_reference([a, b], [0.5, 0.5]))


@pytest.mark.parametrize("failure", [OSError("No space left on device"), KeyboardInterrupt()])
@pytest.mark.parametrize("overwrite", [False, True])
def test_failure_while_writing_leaves_nothing(setup, monkeypatch, failure, overwrite):
    a, b, outputs = setup
    if overwrite:
        previous = merge([a, b], outputs / "soup", weights=[1, 0], progress=False)
        before = load_weights(previous)
    calls = []

    class WriterFailingOnSecondShard(merge_module.SafetensorsWriter):
        def write(self, name, tensor):
            if self.path not in calls:
                calls.append(self.path)
            if len(calls) == 2:  # the second file exists, its header written, no tensor yet
                raise failure
            super().write(name, tensor)

    monkeypatch.setattr(merge_module, "SafetensorsWriter", WriterFailingOnSecondShard)
    listing = sorted(os.listdir(outputs))
    with pytest.raises(type(failure)):
        merge([a, b], outputs / "soup", max_shard_size="8KB", overwrite=overwrite, progress=False)
    assert len(calls) == 2
    assert sorted(os.listdir(outputs)) == listing
    if overwrite:  # the previous output is intact
        after = load_weights(outputs / "soup")
        assert after.keys() == before.keys()
        assert all(torch.equal(after[n], before[n]) for n in before)


def test_a_shard_size_that_is_no_size(setup):
    a, b, outputs = setup
    fails_cleanly(
        outputs, ValueError, ["'lots' is not a size", "5GB"], [a, b], max_shard_size="lots"
    )
