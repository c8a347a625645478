"""The "Model size" part of soup cards: parameters against the ``numel`` of the model loaded with
``from_pretrained``, FLOPs against torch's ``FlopCounterMode`` on one example, a sparse soup's
nonzero count against the nonzero entries of its saved weights."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file
from tiny import make_clip_folder, make_vit_folder
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPModel, ViTForImageClassification

from hf_soups import SoupBuilder
from hf_soups.cards import write_card
from hf_soups.merge import merge
from hf_soups.pruning import Magnitude, prune, save_pruned

pytestmark = pytest.mark.usefixtures("one_thread")


def _section(card: str, title: str) -> str | None:
    found = re.search(rf"^## {title}\n(.*?)(?=^## |\Z)", card, flags=re.S | re.M)
    return found.group(1) if found else None


def _numbers(row: str) -> list[int]:
    return [int(cell.replace(",", "")) for cell in re.findall(r"\| ([\d,]+)(?= \||\s\()", row)]


def _size_row(card: str) -> list[int]:
    """The numbers of the size table's one row: parameters, [nonzero,] FLOPs."""
    section = _section(card, "Model size")
    assert section is not None, card
    return _numbers(section.strip().splitlines()[2])


def _flops(model, **inputs) -> int:
    model.config._attn_implementation = "eager"  # its products are what the counter sees
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**inputs)
    return counter.get_total_flops()


def test_vit_soup_card_counts_the_loaded_model(tmp_path):
    folders = [str(make_vit_folder(tmp_path / f"m{i}", seed=i)) for i in range(2)]
    out = merge(folders, tmp_path / "soup", progress=False)
    parameters, flops = _size_row((out / "README.md").read_text())
    model = ViTForImageClassification.from_pretrained(out).eval()
    assert parameters == sum(p.numel() for p in model.parameters())
    assert flops == _flops(model, pixel_values=torch.randn(1, 3, 16, 16))


def test_clip_soup_card_counts_the_loaded_model_at_its_full_text_length(tmp_path):
    folders = [str(make_clip_folder(tmp_path / f"c{i}", seed=i)) for i in range(2)]
    out = merge(folders, tmp_path / "soup", progress=False)
    card = (out / "README.md").read_text()
    parameters, flops = _size_row(card)
    model = CLIPModel.from_pretrained(out).eval()
    assert parameters == sum(p.numel() for p in model.parameters())
    length = model.config.text_config.max_position_embeddings
    text = torch.randint(4, 11, (1, length))
    assert flops == _flops(model, pixel_values=torch.randn(1, 3, 16, 16), input_ids=text)
    assert f"one image and one text of {length} tokens" in _section(card, "Model size")


def test_sparse_soup_card_counts_the_nonzero_weights_saved(tmp_path):
    reference = ViTForImageClassification.from_pretrained(make_vit_folder(tmp_path / "r", 0))
    masks = prune(reference, Magnitude(), 0.6, scope="layer")
    folders = []
    for seed in (1, 2):
        model = ViTForImageClassification.from_pretrained(make_vit_folder(tmp_path / f"d{seed}", 9))
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                # As after training: no parameter left at an exact zero of its initialisation
                # (biases start at zero), the copies different, then the shared mask applied.
                parameter.add_(seed + torch.rand_like(parameter))
                if name in masks:
                    parameter.mul_(masks[name])
        folders.append(str(save_pruned(model, masks, tmp_path / f"ft{seed}")))
    soup = SoupBuilder.from_pretrained(folders).uniform()
    out = soup.save_pretrained(tmp_path / "soup", progress=False)
    parameters, nonzero, flops = _size_row((out / "README.md").read_text())
    weights = load_file(out / "model.safetensors")
    assert nonzero == sum(int(torch.count_nonzero(t)) for t in weights.values())
    assert parameters == sum(t.numel() for t in weights.values()) > nonzero
    model = ViTForImageClassification.from_pretrained(out)
    assert parameters == sum(p.numel() for p in model.parameters())
    assert flops == _flops(model.eval(), pixel_values=torch.randn(1, 3, 16, 16))


def test_a_config_without_the_values_transformers_defaults_is_still_counted(tmp_path):
    # Older transformers wrote only what differs from the class defaults.
    folders = [str(make_vit_folder(tmp_path / f"m{i}", seed=i)) for i in range(2)]
    out = merge(folders, tmp_path / "soup", progress=False)
    config = json.loads((out / "config.json").read_text())
    for default in ("num_channels", "qkv_bias", "pooler_output_size"):
        del config[default]
    (out / "config.json").write_text(json.dumps(config))
    write_card(out)
    parameters, _ = _size_row((out / "README.md").read_text())
    model = ViTForImageClassification.from_pretrained(out)
    assert parameters == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("config", [{"architectures": ["BertModel"], "model_type": "bert"}, None])
def test_architectures_not_counted_get_no_size_part(tmp_path, config):
    folders = [str(make_vit_folder(tmp_path / f"m{i}", seed=i)) for i in range(2)]
    out = merge(folders, tmp_path / "soup", progress=False)
    if config is None:  # an open_clip-like folder: no config.json at all
        (out / "config.json").unlink()
    else:
        (out / "config.json").write_text(json.dumps(config))
    card = (write_card(out)).read_text()
    assert _section(card, "Model size") is None
    assert _section(card, "Method") is not None
    shutil.rmtree(out)
