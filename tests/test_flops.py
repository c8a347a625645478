"""Parameter and FLOP counts from configs, against real tiny models: ``numel`` of their
parameters (per module and in total) and torch's own ``FlopCounterMode`` on a forward pass."""

import json

import pytest
import torch
from tiny import VIT_CONFIG
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

from hf_soups.errors import UnsupportedArchitectureError
from hf_soups.pruning.flops import JsonConfig, MissingConfigValue, model_counts

TEXT_LENGTH = 7
VIT = VIT_CONFIG
CLIP_TEXT = dict(
    hidden_size=16,
    intermediate_size=24,
    num_attention_heads=2,
    num_hidden_layers=2,
    vocab_size=20,
    max_position_embeddings=TEXT_LENGTH,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)
CLIP_VISION = dict(
    hidden_size=12,
    intermediate_size=40,
    num_attention_heads=2,
    num_hidden_layers=1,
    image_size=16,
    patch_size=8,
    projection_dim=6,
)


def _clip_config():
    return CLIPConfig(text_config=CLIP_TEXT, vision_config=CLIP_VISION, projection_dim=8)


def _image():
    return torch.randn(1, 3, 16, 16)


def _text():
    return torch.randint(2, 20, (1, TEXT_LENGTH))


CASES = [
    (ViTForImageClassification, lambda: ViTConfig(**VIT), lambda: {"pixel_values": _image()}),
    (ViTModel, lambda: ViTConfig(**VIT), lambda: {"pixel_values": _image()}),
    (ViTModel, lambda: ViTConfig(**VIT, qkv_bias=False), lambda: {"pixel_values": _image()}),
    (
        CLIPModel,
        _clip_config,
        lambda: {"pixel_values": _image(), "input_ids": _text()},
    ),
    (CLIPVisionModel, lambda: _clip_config().vision_config, lambda: {"pixel_values": _image()}),
    (
        CLIPVisionModelWithProjection,
        lambda: _clip_config().vision_config,
        lambda: {"pixel_values": _image()},
    ),
    (CLIPTextModel, lambda: _clip_config().text_config, lambda: {"input_ids": _text()}),
    (
        CLIPTextModelWithProjection,
        lambda: _clip_config().text_config,
        lambda: {"input_ids": _text()},
    ),
]


@pytest.mark.parametrize(("model_class", "make_config", "make_inputs"), CASES)
def test_counts_match_the_built_model_and_torchs_flop_counter(
    one_thread, model_class, make_config, make_inputs
):
    config = make_config()
    # Eager attention: its matrix products are what FlopCounterMode sees (not a fused kernel).
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = model_class(config).eval()
    counts = model_counts(model)
    assert counts["architecture"] == model_class.__name__
    assert counts["parameters"] == sum(p.numel() for p in model.parameters())
    for name, part in counts["modules"].items():
        owned = (
            [model.logit_scale] if name == "logit_scale" else model.get_submodule(name).parameters()
        )
        assert part["parameters"] == sum(p.numel() for p in owned), name
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**make_inputs())
    assert counts["flops"] == counter.get_total_flops()


def test_linear_flops_by_hand():
    # ViT layer, 17 tokens of width 16, MLP 32: 6 linear products of 16x16 (q,k,v,o) and
    # 16x32 twice, plus the scores and weighted values 17x17x16 twice; 2 FLOPs per MAC.
    counts = model_counts(ViTConfig(**VIT))
    tokens = (16 // 4) ** 2 + 1
    by_hand = 2 * (tokens * (4 * 16 * 16 + 2 * 16 * 32) + 2 * tokens * tokens * 16)
    assert counts["modules"]["vit.layers.0"]["flops"] == by_hand
    assert counts["image_tokens"] == tokens


def test_config_alone_uses_its_declared_architecture_and_text_length():
    config = _clip_config()
    counts = model_counts(config, text_length=3)
    assert counts["architecture"] == "CLIPModel" and counts["text_tokens"] == 3
    longer = model_counts(config)
    assert longer["text_tokens"] == TEXT_LENGTH and longer["flops"] > counts["flops"]
    assert longer["parameters"] == counts["parameters"]
    vision = model_counts(config.vision_config)
    assert vision["architecture"] == "CLIPVisionModel" and "text_tokens" not in vision
    with pytest.raises(ValueError, match="text_length"):
        model_counts(_clip_config(), text_length=TEXT_LENGTH + 1)


def test_other_architectures_are_refused():
    config = ViTConfig(**VIT)
    with pytest.raises(UnsupportedArchitectureError, match="ViTForMaskedImageModeling"):
        model_counts(config, architecture="ViTForMaskedImageModeling")


@pytest.mark.parametrize(("model_class", "make_config", "make_inputs"), CASES)
def test_a_config_read_as_json_counts_like_the_built_model(model_class, make_config, make_inputs):
    config = make_config()
    torch.manual_seed(0)
    model = model_class(config)
    values = json.loads(config.to_json_string(use_diff=False))
    counted = model_counts(JsonConfig(values), architecture=model_class.__name__)
    assert counted["parameters"] == sum(p.numel() for p in model.parameters())
    assert counted == model_counts(model)


def test_a_json_config_refuses_to_guess_a_missing_value():
    values = json.loads(ViTConfig(**VIT).to_json_string(use_diff=False))
    del values["num_channels"]
    with pytest.raises(MissingConfigValue, match="num_channels"):
        model_counts(JsonConfig(values))
