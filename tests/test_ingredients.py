"""Ingredient: the lazy index from safetensors headers, reads, config, compatibility checks."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny import load_weights, make_clip_folder, make_vit_folder, write_weights_folder
from tiny_open_clip import make_tiny_open_clip_folder

from hf_soups.errors import CorruptedCheckpointError, IncompatibleIngredientsError
from hf_soups.ingredients import Ingredient, check_compatible
from hf_soups.recipe import Source


def test_sharded_folder_index_follows_the_shard_index(tmp_path):
    folder = make_vit_folder(tmp_path / "vit", seed=0, max_shard_size="8KB")
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 2

    ingredient = Ingredient.from_source(folder)

    assert ingredient.revision is None and ingredient.path == folder
    assert set(ingredient.tensors) == set(weight_map)
    for name, info in ingredient.tensors.items():
        assert info.file == folder / weight_map[name]
        assert info.group == "model"
        with safe_open(info.file, "pt") as handle:
            stored = handle.get_tensor(name)
        assert info.dtype == stored.dtype and info.shape == tuple(stored.shape), name
        assert info.nbytes == stored.numel() * stored.element_size()
    assert ingredient.config == json.loads((folder / "config.json").read_text())


def test_read_returns_fresh_tensors_equal_to_safetensors(tmp_path):
    folder = make_clip_folder(tmp_path / "clip", seed=0, dtype=torch.bfloat16)
    ingredient = Ingredient.from_source(folder)
    expected = load_weights(folder)
    assert set(ingredient.tensors) == set(expected)
    assert expected["logit_scale"].dim() == 0  # a scalar tensor is read too
    for name, tensor in expected.items():
        got = ingredient.read(name)
        assert got.dtype == tensor.dtype == torch.bfloat16
        assert torch.equal(got, tensor), name
    # Fresh buffers: changing one read does not change the file or the next read.
    name = "text_projection.weight"
    ingredient.read(name).zero_()
    assert torch.equal(ingredient.read(name), expected[name])
    state = ingredient.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[n], expected[n]) for n in expected)


def test_empty_and_integer_tensors(tmp_path):
    tensors = {
        "empty": torch.zeros(0, 4),
        "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "flags": torch.tensor([True, False]),
        "half": torch.randn(3, dtype=torch.float16),
    }
    ingredient = Ingredient.from_source(write_weights_folder(tmp_path / "toy", tensors))
    for name, tensor in tensors.items():
        got = ingredient.read(name)
        assert got.dtype == tensor.dtype and torch.equal(got, tensor), name


def test_open_clip_folder_config_and_file_groups(tmp_path):
    folder = make_tiny_open_clip_folder(tmp_path / "oc", seed=0)
    ingredient = Ingredient.from_source(folder)
    assert ingredient.config == json.loads((folder / "open_clip_config.json").read_text())
    groups = {info.group for info in ingredient.tensors.values()}
    assert groups == {"open_clip_model", "classifier"}
    assert ingredient.tensors["classifier.weight"].file.name == "classifier.safetensors"
    assert set(ingredient.tensors) == set(load_weights(folder))


def test_metadata_and_name(tmp_path):
    folder = make_vit_folder(tmp_path / "vit", seed=0)
    (folder / "ingredient.json").write_text(json.dumps({"learning_rate": 3e-5, "step": 100}))
    ingredient = Ingredient.from_source(str(folder))
    assert ingredient.metadata == {"learning_rate": 3e-5, "step": 100}
    assert ingredient.name == str(folder)
    assert ingredient.record() == Source(source=str(folder), revision=None)


def test_index_listing_a_tensor_its_shard_lacks_is_corrupted(tmp_path):
    folder = make_vit_folder(tmp_path / "vit", seed=0, max_shard_size="8KB")
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    name, shard = next(iter(index["weight_map"].items()))
    other = next(f for f in index["weight_map"].values() if f != shard)
    index["weight_map"][name] = other
    index_file.write_text(json.dumps(index))
    with pytest.raises(CorruptedCheckpointError, match=f"{name}.*{other}"):
        Ingredient.from_source(folder)


def test_index_naming_a_missing_shard_is_corrupted(tmp_path):
    folder = make_vit_folder(tmp_path / "vit", seed=0, max_shard_size="8KB")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CorruptedCheckpointError, match=f"{shard.name}.*is missing"):
        Ingredient.from_source(folder)


def test_tensor_stored_in_two_files_is_corrupted(tmp_path):
    folder = write_weights_folder(tmp_path / "toy", {"a": torch.ones(2), "b": torch.ones(2)})
    save_file({"a": torch.zeros(2)}, folder / "extra.safetensors")
    with pytest.raises(CorruptedCheckpointError, match="'a' is stored twice"):
        Ingredient.from_source(folder)


def test_compatibility_allows_float_precisions_but_not_integer_dtypes(tmp_path):
    fp32 = Ingredient.from_source(make_vit_folder(tmp_path / "fp32", seed=0))
    bf16 = Ingredient.from_source(make_vit_folder(tmp_path / "bf16", 1, dtype=torch.bfloat16))
    check_compatible([fp32, bf16])  # accumulated in float32 either way

    ids64 = write_weights_folder(tmp_path / "i64", {"ids": torch.arange(3)})
    ids32 = write_weights_folder(tmp_path / "i32", {"ids": torch.arange(3, dtype=torch.int32)})
    with pytest.raises(IncompatibleIngredientsError, match="'ids'.*torch.int32.*i32"):
        check_compatible([Ingredient.from_source(ids64), Ingredient.from_source(ids32)])
    floats = write_weights_folder(tmp_path / "f", {"ids": torch.ones(3)})
    with pytest.raises(IncompatibleIngredientsError, match="'ids'.*float32"):
        check_compatible([Ingredient.from_source(ids64), Ingredient.from_source(floats)])


def test_same_tensors_but_different_architecture_is_incompatible(tmp_path):
    # Same names and shapes; only the config says these are different models.
    tensors = {"w": torch.ones(2)}
    a = write_weights_folder(tmp_path / "a", tensors, {"model_type": "vit"})
    b = write_weights_folder(tmp_path / "b", tensors, {"model_type": "deit"})
    with pytest.raises(IncompatibleIngredientsError, match="deit.*vit"):
        check_compatible([Ingredient.from_source(a), Ingredient.from_source(b)])


def test_pickled_state_dict_is_read_with_weights_only(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    state = {"w": torch.randn(3, 2), "ids": torch.arange(4)}
    torch.save(state, folder / "pytorch_model.bin")
    ingredient = Ingredient.from_folder(folder, allow_pickle=True)
    assert set(ingredient.tensors) == {"w", "ids"}
    assert all(torch.equal(ingredient.read(n), state[n]) for n in state)
    assert ingredient.tensors["w"].group == "model"


def test_a_checkpoint_given_twice_is_refused_by_the_builder(tmp_path):
    from hf_soups import SoupBuilder

    a, b = (make_vit_folder(tmp_path / name, seed=i) for i, name in enumerate("ab"))
    for sources in ([a, b, a], [a, b, b / ".." / "b"]):
        with pytest.raises(IncompatibleIngredientsError, match="the same checkpoint as"):
            SoupBuilder([Ingredient.from_source(str(source)) for source in sources])
    assert len(SoupBuilder([Ingredient.from_source(str(s)) for s in (a, b)]).ingredients) == 2
