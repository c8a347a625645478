"""Tiny checkpoints built from configs, and an independent reader for checking merges.

``make_vit_folder`` and ``make_clip_folder`` write ordinary ``save_pretrained`` folders (weights
drawn from ``seed``, plus processor / tokenizer files) in a few hundred milliseconds, optionally
sharded (``max_shard_size``) or cast (``dtype``). ``load_weights`` and ``weighted_reference``
read folders with ``safetensors.torch.load_file`` only, so a test's reference never goes through
hf_soups' own reader.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)

from hf_soups.models.clip import make_word_tokenizer

VIT_CONFIG = dict(
    image_size=16,
    patch_size=4,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    num_labels=3,
)
CLIP_PROMPTS = ["a photo of a cat", "a photo of a dog", "a drawing of a bird"]


def _save(model, path, max_shard_size, dtype) -> Path:
    if dtype is not None:
        model = model.to(dtype)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    return Path(path)


def make_vit_folder(
    path: str | Path,
    seed: int,
    *,
    max_shard_size: int | str | None = None,
    dtype: torch.dtype | None = None,
    **config_overrides,
) -> Path:
    """A tiny ``ViTForImageClassification`` folder (weights from ``seed``) with its processor."""
    torch.manual_seed(seed)
    model = ViTForImageClassification(ViTConfig(**{**VIT_CONFIG, **config_overrides}))
    _save(model, path, max_shard_size, dtype)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(path)
    return Path(path)


def make_clip_folder(
    path: str | Path,
    seed: int,
    *,
    max_shard_size: int | str | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """A tiny transformers ``CLIPModel`` folder with a word-level tokenizer and image processor."""
    tokenizer = make_word_tokenizer(CLIP_PROMPTS, model_max_length=12)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=12,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        vision_config=dict(
            image_size=16,
            patch_size=8,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
        ),
        projection_dim=8,
    )
    torch.manual_seed(seed)
    _save(CLIPModel(config), path, max_shard_size, dtype)
    tokenizer.save_pretrained(path)
    CLIPImageProcessor(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}
    ).save_pretrained(path)
    return Path(path)


def write_weights_folder(
    path: str | Path, tensors: dict[str, torch.Tensor], config: dict | None = None
) -> Path:
    """A bare folder: ``model.safetensors`` holding ``tensors`` and a ``config.json``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path / "model.safetensors")
    config = config if config is not None else {"model_type": "toy", "architectures": ["Toy"]}
    (path / "config.json").write_text(json.dumps(config))
    return path


def load_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of every ``*.safetensors`` file in ``folder``, read with safetensors itself."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        part = load_file(file)
        assert not part.keys() & tensors.keys(), f"{file}: tensor stored twice"
        tensors.update(part)
    return tensors


def weighted_reference(
    folders: Sequence[str | Path], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """``sum_i w_i * theta_i`` in float64 over floating tensors; others from the first folder."""
    states = [load_weights(folder) for folder in folders]
    assert all(states), "a reference folder holds no safetensors weights"
    reference = {}
    for name, first in states[0].items():
        if not first.is_floating_point():
            reference[name] = first.clone()
            continue
        total = torch.zeros(first.shape, dtype=torch.float64)
        for weight, state in zip(weights, states):
            total += float(weight) * state[name].double()
        reference[name] = total
    return reference


def assert_matches_reference(
    merged: dict[str, torch.Tensor],
    reference: dict[str, torch.Tensor],
    *,
    rel_tol: float = 1e-6,
) -> None:
    """Same names; each floating tensor within ``rel_tol * max|reference|`` of the reference."""
    assert reference and merged.keys() == reference.keys()
    for name, expected in reference.items():
        got = merged[name]
        assert got.shape == expected.shape, name
        if not expected.is_floating_point():
            assert got.dtype == expected.dtype and torch.equal(got, expected), name
            continue
        scale = expected.abs().max().item() or 1.0
        error = (got.double() - expected).abs().max().item() if got.numel() else 0.0
        assert error <= rel_tol * scale, f"{name}: max abs error {error:.3g}, scale {scale:.3g}"
