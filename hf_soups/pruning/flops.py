"""Parameter and forward FLOP counts of ViT and CLIP models, computed from their configs.

:func:`model_counts` counts every module of the architecture (per module, named as the model
names it, and in total) from the config alone, so a card or a reduction step can report the
size of a model without building it.

FLOP convention (:data:`FLOPS_CONVENTION`): the forward pass of ONE example costs
``2 x`` the multiply-accumulates of its matrix products: linear layers, the patch-embedding
convolution, the attention scores ``Q K^T`` and the attention-weighted values (over every
position, masked ones included, as dense kernels compute them) and CLIP's image-text logit.
Biases, layer norms, activations, softmax and embedding look-ups are not counted (they are
linear in the width, not quadratic). A ``CLIPModel`` example is one image and one text of
``text_length`` tokens (default: the text config's ``max_position_embeddings``).

:func:`folder_counts` counts a saved folder from its ``config.json`` read as JSON, without
importing transformers (model cards stay light), unless the file leaves out a value whose
default only transformers knows.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_soups.errors import UnsupportedArchitectureError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

FLOPS_CONVENTION = (
    "forward FLOPs of one example = 2 x multiply-accumulates of the matrix products (linear "
    "layers, patch-embedding convolution, attention scores and attention-weighted values over "
    "all positions, CLIP's image-text logit); biases, norms, activations, softmax and "
    "embedding look-ups not counted; a CLIPModel example is one image and one text"
)

# Where each tower's modules live, by architecture: tower name -> module-name prefix.
TOWER_PREFIXES: dict[str, dict[str, str]] = {
    "ViTModel": {"vision": ""},
    "ViTForImageClassification": {"vision": "vit."},
    "CLIPModel": {"text": "text_model.", "vision": "vision_model."},
    "CLIPVisionModel": {"vision": ""},
    "CLIPVisionModelWithProjection": {"vision": "vision_model."},
    "CLIPTextModel": {"text": ""},
    "CLIPTextModelWithProjection": {"text": "text_model."},
}
SUPPORTED_ARCHITECTURES = tuple(TOWER_PREFIXES)
_DEFAULT_ARCHITECTURE = {
    "vit": "ViTForImageClassification",
    "clip": "CLIPModel",
    "clip_vision_model": "CLIPVisionModel",
    "clip_text_model": "CLIPTextModel",
}


def tower_config(config: PretrainedConfig, architecture: str, tower: str) -> PretrainedConfig:
    """The config of one tower: ``vision_config`` / ``text_config`` of a ``CLIPConfig``, else
    the model's own config."""
    return getattr(config, f"{tower}_config") if architecture == "CLIPModel" else config


def tower_layer_names(config: PretrainedConfig, architecture: str, tower: str) -> list[str]:
    """Module names of a tower's transformer layers (``vision_model.encoder.layers.0``...)."""
    prefix = TOWER_PREFIXES[architecture][tower]
    layers = "layers" if architecture.startswith("ViT") else "encoder.layers"
    count = tower_config(config, architecture, tower).num_hidden_layers
    return [f"{prefix}{layers}.{index}" for index in range(count)]


Counts = dict[str, dict[str, int]]


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def image_tokens(config: PretrainedConfig) -> int:
    """The sequence length of a vision tower: one token per patch plus the class token."""
    height, width = _pair(config.image_size)
    patch_height, patch_width = _pair(config.patch_size)
    return (height // patch_height) * (width // patch_width) + 1


def _linear(n_in: int, n_out: int, tokens: int, bias: bool = True) -> dict[str, int]:
    return {"parameters": n_in * n_out + (n_out if bias else 0), "flops": 2 * tokens * n_in * n_out}


def _add(*parts: dict[str, int]) -> dict[str, int]:
    return {key: sum(part[key] for part in parts) for key in ("parameters", "flops")}


def _norm(hidden: int) -> dict[str, int]:
    return {"parameters": 2 * hidden, "flops": 0}


def encoder_layer(
    hidden: int, intermediate: int, tokens: int, *, qkv_bias: bool = True
) -> dict[str, int]:
    """One pre-norm transformer layer: two norms, q/k/v/out projections, the two attention
    matrix products and the MLP (``fc1``: hidden -> intermediate, ``fc2``: back)."""
    attention_products = {"parameters": 0, "flops": 2 * 2 * tokens * tokens * hidden}
    return _add(
        _norm(hidden),
        _norm(hidden),
        *(_linear(hidden, hidden, tokens, bias=qkv_bias) for _ in range(3)),
        _linear(hidden, hidden, tokens),
        attention_products,
        _linear(hidden, intermediate, tokens),
        _linear(intermediate, hidden, tokens),
    )


def _patch_embedding(config: PretrainedConfig, *, bias: bool) -> dict[str, int]:
    patch_height, patch_width = _pair(config.patch_size)
    kernel = config.num_channels * patch_height * patch_width
    counts = _linear(kernel, config.hidden_size, image_tokens(config) - 1, bias=bias)
    positions = image_tokens(config) * config.hidden_size
    # The class token and the position embeddings: parameters, no products.
    return _add(counts, {"parameters": positions + config.hidden_size, "flops": 0})


def _vision_counts(config: PretrainedConfig, architecture: str) -> Counts:
    vision = tower_config(config, architecture, "vision")
    prefix, hidden = TOWER_PREFIXES[architecture]["vision"], vision.hidden_size
    tokens = image_tokens(vision)
    vit = architecture.startswith("ViT")
    counts = {f"{prefix}embeddings": _patch_embedding(vision, bias=vit)}
    if not vit:
        counts[f"{prefix}pre_layrnorm"] = _norm(hidden)
    for name in tower_layer_names(config, architecture, "vision"):
        qkv_bias = vision.qkv_bias if vit else True
        counts[name] = encoder_layer(hidden, vision.intermediate_size, tokens, qkv_bias=qkv_bias)
    counts[f"{prefix}{'layernorm' if vit else 'post_layernorm'}"] = _norm(hidden)
    return counts


def _text_counts(config: PretrainedConfig, architecture: str, tokens: int) -> Counts:
    text = tower_config(config, architecture, "text")
    prefix, hidden = TOWER_PREFIXES[architecture]["text"], text.hidden_size
    embeddings = (text.vocab_size + text.max_position_embeddings) * hidden
    counts = {f"{prefix}embeddings": {"parameters": embeddings, "flops": 0}}
    for name in tower_layer_names(config, architecture, "text"):
        counts[name] = encoder_layer(hidden, text.intermediate_size, tokens)
    counts[f"{prefix}final_layer_norm"] = _norm(hidden)
    return counts


def _text_tokens(config: PretrainedConfig, architecture: str, text_length: int | None) -> int:
    limit = tower_config(config, architecture, "text").max_position_embeddings
    tokens = limit if text_length is None else text_length
    if not 1 <= tokens <= limit:
        raise ValueError(
            f"text_length {tokens} is outside [1, {limit}] (the text config's "
            "max_position_embeddings)"
        )
    return tokens


def _heads(config: PretrainedConfig, architecture: str) -> Counts:
    """What sits on top of the towers: pooler, classifier, projections, the CLIP logit."""
    counts: Counts = {}
    if architecture == "ViTModel":
        counts["pooler"] = _linear(config.hidden_size, config.pooler_output_size, 1)
    if architecture == "ViTForImageClassification" and config.num_labels > 0:
        counts["classifier"] = _linear(config.hidden_size, config.num_labels, 1)
    for tower in ("vision", "text"):
        name = "visual_projection" if tower == "vision" else "text_projection"
        if architecture in ("CLIPModel", f"CLIP{tower.title()}ModelWithProjection"):
            hidden = tower_config(config, architecture, tower).hidden_size
            counts[name] = _linear(hidden, config.projection_dim, 1, bias=False)
    if architecture == "CLIPModel":
        counts["logit_scale"] = {"parameters": 1, "flops": 2 * config.projection_dim}
    return counts


def _is_model(value: object) -> bool:
    # A model exists only once transformers is imported: the check needs no import of its own.
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(value, transformers.PreTrainedModel)


def model_counts(
    config_or_model: PretrainedConfig | PreTrainedModel | JsonConfig,
    *,
    architecture: str | None = None,
    text_length: int | None = None,
) -> dict[str, Any]:
    """Parameter and forward FLOP counts of a ViT or CLIP model, per module and in total.

    Args:
        config_or_model: a config (``ViTConfig``, ``CLIPConfig``, ``CLIPVisionConfig``,
            ``CLIPTextConfig``, or a :class:`JsonConfig` of its ``config.json``) or a model,
            whose config and class are used.
        architecture: the model class name (one of :data:`SUPPORTED_ARCHITECTURES`); default:
            the model's class, else the config's ``architectures[0]``, else the plain model of
            the config's type (``ViTForImageClassification`` for a ``ViTConfig``).
        text_length: tokens of the text a CLIP text tower encodes; default the text config's
            ``max_position_embeddings``.

    Returns:
        ``{"architecture", "parameters", "flops", "flops_convention", "image_tokens" /
        "text_tokens" (where the model has that tower), "modules": {name: {"parameters",
        "flops"}}}``; module names are the model's own (``vision_model.encoder.layers.0``);
        the CLIP logit's product is counted under ``logit_scale``. JSON-serialisable.

    Raises:
        UnsupportedArchitectureError: the architecture is not a ViT or CLIP model.
        MissingConfigValue: a :class:`JsonConfig` lacks a value the counts need.
    """
    if _is_model(config_or_model):
        config = config_or_model.config
        architecture = architecture or type(config_or_model).__name__
    else:
        config = config_or_model
    if architecture is None:
        declared = getattr(config, "architectures", None) or []
        architecture = declared[0] if declared else _DEFAULT_ARCHITECTURE.get(config.model_type)
    if architecture not in TOWER_PREFIXES:
        raise UnsupportedArchitectureError(
            f"{architecture or config.model_type}: parameter and FLOP counts cover "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    towers = TOWER_PREFIXES[architecture]
    modules: Counts = {}
    result: dict[str, Any] = {"architecture": architecture}
    if "text" in towers:
        result["text_tokens"] = _text_tokens(config, architecture, text_length)
        modules.update(_text_counts(config, architecture, result["text_tokens"]))
    if "vision" in towers:
        result["image_tokens"] = image_tokens(tower_config(config, architecture, "vision"))
        modules.update(_vision_counts(config, architecture))
    modules.update(_heads(config, architecture))
    result["parameters"] = sum(part["parameters"] for part in modules.values())
    result["flops"] = sum(part["flops"] for part in modules.values())
    result["flops_convention"] = FLOPS_CONVENTION
    result["modules"] = modules
    return result


class MissingConfigValue(AttributeError):
    """A ``config.json`` leaves out a value (transformers fills in its class default)."""


class JsonConfig:
    """A ``config.json`` read as JSON, its values as attributes (nested configs too), for
    :func:`model_counts` without transformers.

    Only what the file holds is known: a missing value raises :class:`MissingConfigValue`
    rather than guess the class default. ``num_labels`` is the size of ``id2label``, as a
    transformers config computes it.
    """

    def __init__(self, values: Mapping[str, Any]) -> None:
        self._values = dict(values)

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__.get("_values", {})
        if name == "num_labels" and "id2label" in values:
            return len(values["id2label"])
        if name not in values:
            raise MissingConfigValue(f"config.json has no {name!r}")
        value = values[name]
        return JsonConfig(value) if name.endswith("_config") and isinstance(value, dict) else value


CONFIG_FILE = "config.json"


def folder_counts(
    folder: str | os.PathLike, *, text_length: int | None = None
) -> dict[str, Any] | None:
    """:func:`model_counts` of the model saved in ``folder``, from its ``config.json``;
    ``None`` when the folder has none or holds an architecture the counts do not cover.

    The file is read as JSON; only when it leaves out a value the counts need (a file written by
    an older transformers may) is it loaded with ``transformers.AutoConfig``, which knows the
    class defaults.
    """
    file = Path(folder) / CONFIG_FILE
    try:
        values = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(values, dict):
        return None
    try:
        return model_counts(JsonConfig(values), text_length=text_length)
    except UnsupportedArchitectureError:
        return None
    except MissingConfigValue:
        pass
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(file.parent)
    except (OSError, ValueError):  # a model type this transformers does not know
        return None
    try:
        return model_counts(config, text_length=text_length)
    except UnsupportedArchitectureError:
        return None
