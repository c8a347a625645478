"""The MLPs a ViT or CLIP model can be narrowed in, and the narrowed model itself.

A tower (the vision or text transformer) keeps one ``intermediate_size`` for all its layers, so
a narrowed model stays a plain config that ``from_pretrained`` builds: every layer of a tower
loses the same number of neurons (rows of ``fc1`` and its bias, columns of ``fc2``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from hf_soups.errors import HfSoupsError, UnsupportedArchitectureError
from hf_soups.pruning.flops import (
    SUPPORTED_ARCHITECTURES,
    TOWER_PREFIXES,
    tower_config,
    tower_layer_names,
)


@dataclass
class MLPTower:
    """One tower's MLPs: ``layers`` maps each MLP's module name to its ``(fc1, fc2)``."""

    name: str
    intermediate_size: int
    layers: dict[str, tuple[nn.Linear, nn.Linear]]


def architecture_of(model: PreTrainedModel) -> str:
    """The model's class name, checked to be a ViT or CLIP model whose MLPs can be narrowed."""
    architecture = type(model).__name__
    if architecture not in TOWER_PREFIXES:
        raise UnsupportedArchitectureError(
            f"{architecture}: MLP reduction covers {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return architecture


def mlp_towers(model: PreTrainedModel, towers: Sequence[str] | None = None) -> list[MLPTower]:
    """The towers of ``model`` (all, or those named in ``towers``: ``"vision"``, ``"text"``)."""
    architecture = architecture_of(model)
    available = TOWER_PREFIXES[architecture]
    chosen = list(available) if towers is None else list(towers)
    unknown = [name for name in chosen if name not in available]
    if unknown or not chosen:
        raise HfSoupsError(f"towers {chosen}: {architecture} has towers {list(available)}")
    found = []
    for name in chosen:
        layers = {}
        for layer in tower_layer_names(model.config, architecture, name):
            mlp = model.get_submodule(f"{layer}.mlp")
            layers[f"{layer}.mlp"] = (mlp.fc1, mlp.fc2)
        size = tower_config(model.config, architecture, name).intermediate_size
        found.append(MLPTower(name, size, layers))
    return found


def narrowed_config(model: PreTrainedModel, sizes: Mapping[str, int]):
    """A copy of ``model.config`` with each tower of ``sizes`` at that ``intermediate_size``."""
    config = copy.deepcopy(model.config)
    for tower, size in sizes.items():
        tower_config(config, architecture_of(model), tower).intermediate_size = size
    return config


@torch.no_grad()
def narrowed_model(
    model: PreTrainedModel, keep: Mapping[str, Mapping[str, torch.Tensor]]
) -> PreTrainedModel:
    """A new model of ``model``'s class built from the narrowed config, holding ``model``'s
    weights with only the kept neurons of each MLP.

    Args:
        keep: tower -> {MLP module name -> indices of the neurons kept, increasing}; every
            layer of a tower keeps as many.

    The new model is built from its config (as ``from_pretrained`` does) and loaded strictly,
    so what is returned is exactly what the saved folder will load as. Dtype, device, training
    mode and which parameters are frozen carry over.
    """
    sizes = {}
    for tower, layers in keep.items():
        counts = {len(indices) for indices in layers.values()}
        if len(counts) != 1 or 0 in counts:
            raise HfSoupsError(f"{tower} tower: every layer must keep the same, nonzero width")
        sizes[tower] = counts.pop()
    state = model.state_dict()
    for layers in keep.values():
        for mlp, indices in layers.items():
            indices = indices.to(state[f"{mlp}.fc1.weight"].device)
            for key, dim in (("fc1.weight", 0), ("fc1.bias", 0), ("fc2.weight", 1)):
                state[f"{mlp}.{key}"] = state[f"{mlp}.{key}"].index_select(dim, indices)
    parameter = next(model.parameters())
    # Built on the meta device: a random initialisation of every weight, all overwritten at
    # once, costs seconds for a ViT-B. Cloned, so that training one model leaves the other be.
    with torch.device("meta"):
        narrowed = type(model)(narrowed_config(model, sizes))
    narrowed.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True, assign=True)
    _copy_unsaved_buffers(model, narrowed)
    narrowed.to(device=parameter.device, dtype=parameter.dtype)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    for name, p in narrowed.named_parameters():
        p.requires_grad_(name not in frozen)
    return narrowed.train(model.training)


def _copy_unsaved_buffers(model: nn.Module, narrowed: nn.Module) -> None:
    """Buffers outside the state dict (CLIP's ``position_ids``) are still on the meta device:
    they take the original model's values, which the narrowing does not touch."""
    originals = dict(model.named_buffers())
    for name, buffer in list(narrowed.named_buffers()):
        if buffer.is_meta:
            owner, _, attribute = name.rpartition(".")
            module = narrowed.get_submodule(owner) if owner else narrowed
            module.register_buffer(attribute, originals[name].clone(), persistent=False)
