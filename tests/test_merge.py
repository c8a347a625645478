"""The streaming merge against an independent float64 reference, on real (tiny) architectures."""

import json
import logging
import re
import stat

import open_clip
import pytest
import torch
from safetensors.torch import load_file
from tiny import (
    assert_matches_reference,
    load_weights,
    make_clip_folder,
    make_vit_folder,
    weighted_reference,
    write_weights_folder,
)
from tiny_open_clip import make_tiny_open_clip_folder
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel, ViTForImageClassification

from hf_soups.errors import RecipeError
from hf_soups.ingredients import Ingredient
from hf_soups.merge import build_recipe, merge, weighted_state_dict
from hf_soups.methods import WeightedAverage
from hf_soups.methods.base import ReusedBuffer
from hf_soups.recipe import Score, SoupRecord


def _weight_files(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".safetensors"))


def _loads_cleanly(model_class, folder):
    model, info = model_class.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info
    return model


def _half_ulp_bf16(reference: torch.Tensor) -> torch.Tensor:
    # Round-to-nearest in bfloat16 (8 significant bits) moves a value by at most 2**-8 of it.
    return reference.abs() * 2.0**-8


@pytest.fixture(scope="module")
def vit_folders(tmp_path_factory):
    """Three ViTs stored with three shard layouts: one file, 8 KB shards, 20 KB shards."""
    root = tmp_path_factory.mktemp("vits")
    return [
        make_vit_folder(root / "single", 0),
        make_vit_folder(root / "shard8", 1, max_shard_size="8KB"),
        make_vit_folder(root / "shard20", 2, max_shard_size="20KB"),
    ]


def test_vit_sharded_inputs_merge_to_float64_reference_and_load(vit_folders, tmp_path):
    layouts = [tuple(_weight_files(folder)) for folder in vit_folders]
    assert len(set(layouts)) == 3 and len(layouts[1]) > 1 and len(layouts[2]) > 1
    weights = [0.2, 0.5, 0.3]

    out = merge(vit_folders, tmp_path / "soup", weights=weights, progress=False)

    # Small output: one file, as save_pretrained writes it.
    assert _weight_files(out) == ["model.safetensors"]
    merged = load_weights(out)
    assert all(t.dtype == torch.float32 for t in merged.values())
    reference = weighted_reference(vit_folders, weights)
    assert_matches_reference(merged, reference)

    model = _loads_cleanly(ViTForImageClassification, out).eval()
    reference_model = ViTForImageClassification.from_pretrained(
        None,
        config=model.config,
        state_dict={name: tensor.float() for name, tensor in reference.items()},
    ).eval()
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(pixels).logits, reference_model(pixels).logits)


def test_extrapolating_and_one_hot_weights(vit_folders, tmp_path):
    # Weights need not be a convex combination: task-arithmetic style extrapolation.
    weights = [1.5, -0.5, 0.0]
    out = merge(vit_folders, tmp_path / "extrapolated", weights=weights, progress=False)
    assert_matches_reference(load_weights(out), weighted_reference(vit_folders, weights))

    # A one-hot weighting reproduces that ingredient bit for bit.
    picked = merge(vit_folders, tmp_path / "picked", weights=[0, 1, 0], progress=False)
    second = load_weights(vit_folders[1])
    for name, tensor in load_weights(picked).items():
        assert torch.equal(tensor, second[name]), name


def test_weighted_state_dict_matches_reference(vit_folders):
    weights = [0.6, 0.1, 0.3]
    merged = weighted_state_dict(vit_folders, weights)
    assert_matches_reference(merged, weighted_reference(vit_folders, weights))


def test_output_sharding_writes_transformers_layout_that_loads(vit_folders, tmp_path):
    weights = [1 / 3] * 3
    max_shard_size = 10_000
    out = merge(
        vit_folders,
        tmp_path / "sharded",
        weights=weights,
        max_shard_size=max_shard_size,
        progress=False,
    )
    shards = _weight_files(out)
    n = len(shards)
    assert n > 2
    assert shards == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    merged = load_weights(out)
    assert set(index["weight_map"]) == set(merged)
    for shard in shards:
        stored = load_file(out / shard)
        assert {name for name, file in index["weight_map"].items() if file == shard} == set(stored)
        # A shard exceeds the limit only when it holds one tensor that alone exceeds it.
        size = sum(t.numel() * t.element_size() for t in stored.values())
        assert size <= max_shard_size or len(stored) == 1
    total = sum(t.numel() * t.element_size() for t in merged.values())
    assert index["metadata"]["total_size"] == total
    assert_matches_reference(merged, weighted_reference(vit_folders, weights))
    _loads_cleanly(ViTForImageClassification, out)


def test_clip_merge_loads_and_copies_tokenizer_and_processor(tmp_path):
    folders = [make_clip_folder(tmp_path / f"clip{i}", seed=i) for i in range(2)]
    out = merge(folders, tmp_path / "soup", progress=False)

    assert_matches_reference(load_weights(out), weighted_reference(folders, [0.5, 0.5]))
    _loads_cleanly(CLIPModel, out)
    extra = sorted(p.name for p in folders[0].iterdir() if not p.name.endswith(".safetensors"))
    assert {"config.json", "tokenizer.json", "preprocessor_config.json"} <= set(extra)
    for name in extra:
        assert (out / name).read_bytes() == (folders[0] / name).read_bytes(), name
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*extra, "model.safetensors", "soup.json", "README.md"]  # README.md: the model card
    )
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert (
        tokenizer("a photo of a cat")["input_ids"]
        == AutoTokenizer.from_pretrained(folders[0])("a photo of a cat")["input_ids"]
    )
    assert CLIPImageProcessor.from_pretrained(out).crop_size == {"height": 16, "width": 16}


def test_open_clip_merge_keeps_file_layout_and_loads_with_open_clip(tmp_path):
    folders = [make_tiny_open_clip_folder(tmp_path / f"oc{i}", seed=i) for i in range(2)]
    weights = [0.25, 0.75]
    out = merge(folders, tmp_path / "soup", weights=weights, progress=False)

    assert _weight_files(out) == _weight_files(folders[0])
    reference = weighted_reference(folders, weights)
    assert_matches_reference(load_weights(out), reference)
    assert (out / "open_clip_config.json").read_bytes() == (
        folders[0] / "open_clip_config.json"
    ).read_bytes()
    model = open_clip.create_model(f"local-dir:{out}", pretrained_text=False)
    model_state = model.state_dict()
    open_clip_names = set(load_file(folders[0] / "open_clip_model.safetensors"))
    assert open_clip_names and open_clip_names <= set(model_state)
    assert_matches_reference(
        {name: model_state[name] for name in open_clip_names},
        {name: reference[name] for name in open_clip_names},
    )


def _constant_folders(root, values, dtype):
    return [
        write_weights_folder(root / f"in{i}", {"w": torch.full((4,), value, dtype=dtype)})
        for i, value in enumerate(values)
    ]


def test_bf16_inputs_accumulate_in_float32(tmp_path):
    # 256 + 7 x 1 averaged over 8: 32.875 exactly in float32, 33 once rounded to bfloat16. A
    # bfloat16 running sum loses every 1/8 (32 + 0.125 rounds back to 32) and ends at 32.
    values = [256.0] + [1.0] * 7
    folders = _constant_folders(tmp_path, values, torch.bfloat16)
    bf16_running_sum = torch.zeros((), dtype=torch.bfloat16)
    for value in values:
        bf16_running_sum += torch.tensor(value, dtype=torch.bfloat16) / 8
    assert bf16_running_sum.item() == 32.0  # the failure this test guards against

    out = merge(folders, tmp_path / "soup", progress=False)

    merged = load_file(out / "model.safetensors")["w"]
    assert merged.dtype == torch.bfloat16
    assert torch.equal(merged, torch.full((4,), 33.0, dtype=torch.bfloat16))


def test_bf16_model_merge_is_rounded_once(tmp_path):
    folders = [
        make_vit_folder(tmp_path / f"bf16_{i}", seed=i, dtype=torch.bfloat16) for i in range(3)
    ]
    weights = [0.2, 0.5, 0.3]
    out = merge(folders, tmp_path / "soup", weights=weights, progress=False)
    merged = load_weights(out)
    for name, expected in weighted_reference(folders, weights).items():
        assert merged[name].dtype == torch.bfloat16, name
        error = (merged[name].double() - expected).abs()
        # One rounding to bfloat16, plus float32's own error where the terms cancel out.
        assert (error <= _half_ulp_bf16(expected) + 1e-6 * expected.abs().max()).all(), name
    _loads_cleanly(ViTForImageClassification, out)


def test_dtype_override(vit_folders, tmp_path):
    weights = [0.2, 0.5, 0.3]
    out = merge(
        vit_folders, tmp_path / "bf16", weights=weights, dtype=torch.bfloat16, progress=False
    )
    merged = load_weights(out)
    for name, expected in weighted_reference(vit_folders, weights).items():
        assert merged[name].dtype == torch.bfloat16, name
        error = (merged[name].double() - expected).abs()
        # float32 accumulation then one rounding to bfloat16 (plus float32's own tiny error).
        assert (error <= _half_ulp_bf16(expected) + 1e-6 * expected.abs().max()).all(), name
    assert json.loads((out / "soup.json").read_text())["dtype"] == "bfloat16"
    # The config says so too: transformers loads the folder in the dtype it was written in.
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert ViTForImageClassification.from_pretrained(out).dtype == torch.bfloat16
    _loads_cleanly(ViTForImageClassification, out)

    # And the other way: bfloat16 inputs written as float32 keep the float32 sum exactly.
    bf16 = _constant_folders(tmp_path / "b", [256.0] + [1.0] * 7, torch.bfloat16)
    up = merge(bf16, tmp_path / "fp32", dtype=torch.float32, progress=False)
    assert torch.equal(load_file(up / "model.safetensors")["w"], torch.full((4,), 32.875))


def test_non_floating_tensors_are_copied_from_the_first_ingredient(tmp_path):
    folders = [
        write_weights_folder(
            tmp_path / f"in{i}",
            {
                "weight": torch.randn(3, 5, generator=torch.Generator().manual_seed(i)),
                "position_ids": torch.arange(7, dtype=torch.int64)[None] * (i + 1),
                "mask": torch.tensor([True, False, i == 0]),
            },
        )
        for i in range(3)
    ]
    out = merge(
        folders, tmp_path / "soup", weights=[0.5, 0.25, 0.25], dtype=torch.bfloat16, progress=False
    )
    merged = load_file(out / "model.safetensors")
    first = load_file(folders[0] / "model.safetensors")
    assert merged["position_ids"].dtype == torch.int64
    assert torch.equal(merged["position_ids"], first["position_ids"])
    assert torch.equal(merged["mask"], first["mask"])
    assert merged["weight"].dtype == torch.bfloat16


def test_mixed_precision_ingredients_write_the_first_ones_dtype(tmp_path):
    fp32 = make_vit_folder(tmp_path / "fp32", seed=0)
    bf16 = make_vit_folder(tmp_path / "bf16", seed=1, dtype=torch.bfloat16)
    out = merge([fp32, bf16], tmp_path / "soup", progress=False)
    merged = load_weights(out)
    assert {t.dtype for t in merged.values()} == {torch.float32}
    assert_matches_reference(merged, weighted_reference([fp32, bf16], [0.5, 0.5]))


def test_recipe_records_ingredients_weights_and_method(vit_folders, tmp_path):
    ingredients = [Ingredient.from_source(folder) for folder in vit_folders]
    method = WeightedAverage([0.2, 0.5, 0.3])
    soup_record = SoupRecord(method="greedy")
    scores = {"greedy soup": {"held_out": Score(metrics={"accuracy": 0.9})}}
    out = merge(
        ingredients,
        tmp_path / "soup",
        method=method,
        dtype=torch.float16,
        recipe=build_recipe(
            ingredients, method, None, torch.float16, soup=soup_record, scores=scores
        ),
        progress=False,
    )
    recipe = json.loads((out / "soup.json").read_text())
    assert re.fullmatch(r"hf_soups \S+", recipe["library"])
    assert recipe["method"] == "weighted_average"
    assert recipe["parameters"] == {"weights": [0.2, 0.5, 0.3]}
    assert recipe["ingredients"] == [
        {"source": str(folder), "revision": None} for folder in vit_folders
    ]
    assert recipe["base"] is None
    assert recipe["dtype"] == "float16"
    assert recipe["soup"]["method"] == "greedy"
    assert recipe["scores"]["greedy soup"]["held_out"]["metrics"] == {"accuracy": 0.9}
    # A recipe that describes another merge than the one written is refused.
    other = build_recipe(ingredients, WeightedAverage([1, 0, 0]), None, torch.float16)
    with pytest.raises(RecipeError, match="not the merge written"):
        merge(ingredients, tmp_path / "wrong", method=method, recipe=other, progress=False)
    assert not (tmp_path / "wrong").exists()
    # The default is a uniform soup, and says so.
    uniform = merge(vit_folders, tmp_path / "uniform", progress=False)
    assert json.loads((uniform / "soup.json").read_text())["parameters"] == {"weights": [1 / 3] * 3}


def test_output_folder_mode_follows_the_umask_like_a_plain_mkdir(vit_folders, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    out = merge(vit_folders, tmp_path / "soup", progress=False)
    assert stat.S_IMODE(out.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_log_lines_name_the_output_folder_not_its_temporary_one(tmp_path, caplog):
    folders = [make_clip_folder(tmp_path / f"m{seed}", seed=seed) for seed in range(2)]
    with caplog.at_level(logging.INFO, logger="hf_soups"):
        merge(folders, tmp_path / "soup", progress=False)
    messages = [record.getMessage() for record in caplog.records]
    assert any(str(tmp_path / "soup" / "README.md") in message for message in messages)
    assert not [message for message in messages if ".tmp-" in message]


def test_differing_integer_buffers_are_copied_with_one_warning(tmp_path, caplog):
    def state(steps):
        return {
            "w": torch.full((4,), float(steps)),
            **{f"bn{i}.num_batches_tracked": torch.tensor(steps) for i in range(5)},
            "ids": torch.arange(3),
        }

    folders = [write_weights_folder(tmp_path / f"in{i}", state(10 * (i + 1))) for i in range(2)]
    with caplog.at_level(logging.WARNING, logger="hf_soups"):
        merged = weighted_state_dict(folders)
    # Copied from the first ingredient, not averaged; the weights are averaged.
    assert all(int(merged[f"bn{i}.num_batches_tracked"]) == 10 for i in range(5))
    assert torch.equal(merged["ids"], torch.arange(3))
    assert torch.equal(merged["w"], torch.full((4,), 15.0))
    warnings = [r.getMessage() for r in caplog.records if "integer buffer" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith("5 integer buffer(s) ('bn0.num_batches_tracked'")
    assert "in1" in warnings[0] and "'ids'" not in warnings[0]
    # Still once when the output is sharded (the buffers spread over several files).
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_soups"):
        out = merge(folders, tmp_path / "sharded", max_shard_size=16, progress=False)
    assert len(list(out.glob("model-*.safetensors"))) >= 3
    assert len([r for r in caplog.records if "integer buffer" in r.getMessage()]) == 1


def test_reused_buffer_hands_out_one_memory_and_grows_for_a_larger_tensor():
    buffer = ReusedBuffer()
    first = buffer(torch.Size([2, 3]))
    second = buffer(torch.Size([5]))
    assert first.shape == (2, 3) and second.shape == (5,) and second.dtype == torch.float32
    assert first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()
    larger = buffer(torch.Size([4, 4]))
    assert larger.numel() == 16 and larger.is_contiguous()
    assert (
        buffer(torch.Size([3])).untyped_storage().data_ptr() == larger.untyped_storage().data_ptr()
    )


def test_a_streamed_merge_computes_into_reused_memory(tmp_path, monkeypatch):
    # Each merged tensor's first read goes into the engine's buffer, not into fresh memory:
    # the files still equal the plain average.
    folders = [make_clip_folder(tmp_path / f"m{seed}", seed=seed) for seed in range(3)]
    fresh_reads = []
    original = Ingredient.read

    def read(self, name, out=None):
        if out is None and self.tensors[name].dtype.is_floating_point:
            fresh_reads.append(name)
        return original(self, name, out)

    monkeypatch.setattr(Ingredient, "read", read)
    out = merge(folders, tmp_path / "soup", progress=False)
    assert fresh_reads == []
    assert_matches_reference(load_weights(out), weighted_reference(folders, [1 / 3] * 3))


def test_inputs_of_different_precision_are_merged_in_the_first_ones_with_a_warning(
    tmp_path, caplog
):
    first = write_weights_folder(tmp_path / "f32", {"w": torch.full((4,), 1.0)})
    second = write_weights_folder(
        tmp_path / "f16", {"w": torch.full((4,), 3.0, dtype=torch.float16)}
    )
    with caplog.at_level(logging.WARNING, logger="hf_soups"):
        out = merge([first, second], tmp_path / "soup", progress=False)
    merged = load_weights(out)["w"]
    assert merged.dtype == torch.float32 and torch.equal(merged, torch.full((4,), 2.0))
    (message,) = [r.getMessage() for r in caplog.records if "written as" in r.getMessage()]
    assert "stores w as float16" in message and "written as float32" in message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_soups"):
        merge([first, second], tmp_path / "chosen", dtype=torch.float16, progress=False)
    assert not [r for r in caplog.records if "written as" in r.getMessage()]
