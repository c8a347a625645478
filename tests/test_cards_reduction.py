"""The model card ``save_reduced`` writes: its numbers against the dense and the reduced model
loaded with ``from_pretrained`` (``numel``, config widths, torch's ``FlopCounterMode``) and
against ``reduction.json``; its metadata as ``huggingface_hub`` parses it."""

from __future__ import annotations

import json
import re

import pytest
import torch
from huggingface_hub import ModelCard
from tiny import CLIP_PROMPTS, VIT_CONFIG, make_clip_folder
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoTokenizer, CLIPModel, ViTConfig, ViTForImageClassification

from hf_soups.cards.reduction import render_reduction_card
from hf_soups.errors import HfSoupsError, RecipeError
from hf_soups.models import ZeroShotTask
from hf_soups.pruning.reduction import REDUCTION_FILE, reduce_and_retrain, save_reduced

pytestmark = pytest.mark.usefixtures("one_thread")


def _numbers(text: str) -> list[int]:
    return [int(n.replace(",", "")) for n in re.findall(r"\d[\d,]*", text)]


def _row(card: str, label: str) -> list[str]:
    """The cells of the size table's row ``label``."""
    line = next(line for line in card.splitlines() if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


def _numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def reduced_clip(tmp_path_factory):
    root = tmp_path_factory.mktemp("reduced")
    dense_dir = make_clip_folder(root / "dense", seed=0)
    dense = CLIPModel.from_pretrained(dense_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(dense_dir)
    prompts = dict(tokenizer(CLIP_PROMPTS, padding=True, return_tensors="pt"))
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))

    def loss_fn(model, batch):
        logits = model(**prompts, pixel_values=batch["pixel_values"]).logits_per_image
        return nn.functional.cross_entropy(logits, batch["labels"])

    result = reduce_and_retrain(
        dense,
        [{"pixel_values": images, "labels": torch.tensor([0, 1, 2])}],
        target_flops=0.2,
        step_flops=0.08,
        loss_fn=loss_fn,
        text_length=prompts["input_ids"].shape[1],
    )
    task = ZeroShotTask(("cat", "dog", "bird"), templates=("a photo of a {}",))
    folder = save_reduced(
        result,
        root / "tiny-clip-reduced",
        processing_class=tokenizer,
        base_model="openai/clip-vit-base-patch32",
        task=task,
    )
    return dense_dir, folder, prompts["input_ids"].shape[1]


def test_card_metadata_parses(reduced_clip):
    _, folder, _ = reduced_clip
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "zero-shot-image-classification"
    assert {"hf-soups", "pruning", "structured-pruning"} <= set(card.data.tags)
    assert card.data.base_model == "openai/clip-vit-base-patch32"
    assert card.data.base_model_relation == "finetune"
    assert card.text.lstrip().startswith("# tiny-clip-reduced")


def test_card_numbers_match_the_loaded_models_and_the_record(reduced_clip):
    dense_dir, folder, text_length = reduced_clip
    card = (folder / "README.md").read_text()
    record = json.loads((folder / REDUCTION_FILE).read_text())
    dense = CLIPModel.from_pretrained(dense_dir).eval()
    reduced = CLIPModel.from_pretrained(folder).eval()
    before, after, share = _row(card, "Parameters")
    assert _numbers(before) == [_numel(dense)] and _numbers(after) == [_numel(reduced)]
    assert share == f"{1 - _numel(reduced) / _numel(dense):.1%}"
    assert (_numbers(before)[0], _numbers(after)[0]) == (
        record["parameters"]["before"],
        record["parameters"]["after"],
    )

    def flops(model):
        model.config._attn_implementation = "eager"
        inputs = {
            "pixel_values": torch.randn(1, 3, 16, 16),
            "input_ids": torch.randint(4, 11, (1, text_length)),
        }
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(**inputs)
        return counter.get_total_flops()

    before, after, share = _row(card, "Forward FLOPs per example")
    assert _numbers(before) == [flops(dense)] == [record["flops"]["before"]]
    assert _numbers(after) == [flops(reduced)] == [record["flops"]["after"]]
    assert share == f"{record['flops']['reduction']:.1%}" and record["flops"]["reduction"] >= 0.2
    assert f"one image and one text of {text_length} tokens" in card
    for tower, config in (("vision", "vision_config"), ("text", "text_config")):
        cells = _row(card, f"MLP width (`intermediate_size`), {tower} tower")
        width = getattr(reduced.config, config).intermediate_size
        assert cells[:2] == [str(getattr(dense.config, config).intermediate_size), str(width)]
        assert record["intermediate_size"]["after"][tower] == width
    steps = re.findall(r"^\| (\d+) \| taylor \|", card, flags=re.M)
    assert steps == [str(i + 1) for i in range(len(record["steps"]))] and len(steps) >= 2


def test_card_names_the_method_its_paper_and_plain_loading(reduced_clip):
    _, folder, _ = reduced_clip
    card = (folder / "README.md").read_text()
    assert "first-order Taylor importance" in card
    assert "arXiv:1611.06440" in card  # Molchanov et al., ICLR 2017
    assert 'CLIPModel.from_pretrained("tiny-clip-reduced")' in card
    assert "['cat', 'dog', 'bird']" in card  # the task's classes in the pipeline snippet


def test_a_data_free_vit_reduction_gets_its_card(tmp_path):
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(**VIT_CONFIG)).eval()
    result = reduce_and_retrain(model, target_parameters=0.1, step_neurons=4)
    folder = save_reduced(result, tmp_path / "vit")
    card = ModelCard.load(folder / "README.md")
    assert card.data.pipeline_tag == "image-classification" and card.data.base_model is None
    loaded = ViTForImageClassification.from_pretrained(folder)
    assert _numbers(_row(card.text, "Parameters")[1]) == [_numel(loaded)]
    assert "arXiv:1608.08710" in card.text  # magnitude: Li et al., ICLR 2017
    assert "a text of" not in card.text and "tokens" not in _row(card.text, "Parameters")[0]


def test_mistakes_are_named(tmp_path, reduced_clip):
    with pytest.raises(RecipeError, match=REDUCTION_FILE):
        render_reduction_card(tmp_path)
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(**VIT_CONFIG)).eval()
    result = reduce_and_retrain(model, target_parameters=0.1, step_neurons=4)
    with pytest.raises(HfSoupsError, match="base_model"):
        save_reduced(result, tmp_path / "x", base_model="/local/dense")
    assert not (tmp_path / "x").exists()


def test_the_card_command_rewrites_a_reduced_folders_card(reduced_clip, tmp_path, capsys):
    import shutil

    from hf_soups.cli import main

    _, folder, _ = reduced_clip
    copy = shutil.copytree(folder, tmp_path / "copy")
    expected = (copy / "README.md").read_text()
    (copy / "README.md").unlink()
    assert main(["-q", "card", str(copy), "--model-name", "tiny-clip-reduced"]) == 0
    assert capsys.readouterr().out.strip() == f"Wrote {copy / 'README.md'}"
    # The same card save_reduced wrote, but for the zero-shot task only save_reduced knew.
    written = (copy / "README.md").read_text()
    assert written.split("## ")[0] == expected.split("## ")[0]
    assert _row(written, "Parameters") == _row(expected, "Parameters")
    assert main(["-q", "card", str(copy), "--license", "mit"]) == 2
    assert "records no license" in capsys.readouterr().err
