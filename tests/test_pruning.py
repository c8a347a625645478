"""Pruning scorers against hand-computed references on a two-layer MLP, and the mask file.

Every reference is computed here with plain torch (functional forward passes, the full Hessian
from ``torch.autograd.functional.hessian``, SynFlow's closed form for a bias-free ReLU network),
never through hf_soups.pruning's own code path.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from tiny import make_vit_folder
from torch import nn
from transformers import ViTForImageClassification

from hf_soups.ingredients import Ingredient
from hf_soups.pruning import (
    MASK_FILE,
    SNIP,
    GraSP,
    Magnitude,
    Stacked,
    SynFlow,
    load_masks,
    prunable_parameters,
    prune,
    read_mask_file,
    save_pruned,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class MLP(nn.Module):
    def __init__(self, bias: bool = True, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(3, 4, bias=bias)
        self.fc2 = nn.Linear(4, 2, bias=bias)

    def forward(self, x, labels=None):
        logits = self.fc2(torch.relu(self.fc1(x)))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


def _batch(seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(5, 3, generator=generator), "labels": torch.tensor([0, 1, 1, 0, 1])}


def _reference_loss(w1, w2, model, batch):
    hidden = torch.relu(batch["x"] @ w1.T + model.fc1.bias.detach())
    logits = hidden @ w2.T + model.fc2.bias.detach()
    return nn.functional.cross_entropy(logits, batch["labels"])


def _keep_top(scores: dict[str, torch.Tensor], density: float, largest: bool = True):
    """Global top-k by plain torch: k = round(density * n), ties absent for random weights."""
    flat = torch.cat([s.flatten() for s in scores.values()])
    k = int(flat.numel() * density + 0.5)
    kept = torch.zeros(flat.numel(), dtype=torch.bool)
    kept[torch.topk(flat, k, largest=largest).indices] = True
    masks, start = {}, 0
    for name, s in scores.items():
        masks[name] = kept[start : start + s.numel()].view_as(s)
        start += s.numel()
    return masks


def _weights(model):
    return {
        "fc1.weight": model.fc1.weight.detach().clone(),
        "fc2.weight": model.fc2.weight.detach().clone(),
    }


def _check_pruned(model, masks, expected):
    assert set(masks) == set(expected)
    for name, mask in expected.items():
        assert torch.equal(masks[name], mask), name
        weight = dict(model.named_parameters())[name].detach()
        assert bool((weight[~mask] == 0).all())  # exact zeros
        assert bool((weight[mask] != 0).all())


def test_prunable_tensors_are_linear_and_conv_weights_without_the_head(tmp_path):
    assert list(prunable_parameters(MLP())) == ["fc1.weight", "fc2.weight"]
    model = ViTForImageClassification.from_pretrained(make_vit_folder(tmp_path / "vit", 0))
    names = list(prunable_parameters(model))
    assert all(name.endswith(".weight") for name in names)
    assert "classifier.weight" not in names and len(names) == 1 + 2 * 6
    assert "classifier.weight" in prunable_parameters(model, include_heads=True)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_keeps_the_largest_weights(scope):
    model = MLP()
    weights = _weights(model)
    masks = prune(model, Magnitude(), 0.6, scope=scope)
    magnitudes = {name: w.abs() for name, w in weights.items()}
    if scope == "global":
        expected = _keep_top(magnitudes, 0.4)
    else:
        expected = {name: _keep_top({name: m}, 0.4)[name] for name, m in magnitudes.items()}
    _check_pruned(model, masks, expected)
    assert sum(int(m.sum()) for m in masks.values()) == (8 if scope == "global" else 5 + 3)


def test_snip_scores_and_mask_match_the_connection_sensitivity():
    model, batch = MLP(), _batch()
    w1, w2 = (w.requires_grad_() for w in _weights(model).values())
    g1, g2 = torch.autograd.grad(_reference_loss(w1, w2, model, batch), [w1, w2])
    expected_scores = {
        "fc1.weight": (g1 * w1).abs().detach(),
        "fc2.weight": (g2 * w2).abs().detach(),
    }
    scores = SNIP([batch]).scores(model, prunable_parameters(model))
    for name, score in expected_scores.items():
        torch.testing.assert_close(scores[name], score, rtol=1e-6, atol=1e-9)
    masks = prune(model, SNIP([batch]), 0.5)
    _check_pruned(model, masks, _keep_top(expected_scores, 0.5))


def test_grasp_scores_are_minus_weight_times_hessian_gradient_and_the_largest_are_pruned():
    model, batch = MLP(), _batch()
    w1, w2 = _weights(model).values()
    sizes = (w1.numel(), w2.numel())

    def loss_of(flat):
        a, b = flat.split(sizes)
        return _reference_loss(a.view_as(w1), b.view_as(w2), model, batch)

    theta = torch.cat([w1.flatten(), w2.flatten()]).double()
    model.double()
    batch = {"x": batch["x"].double(), "labels": batch["labels"]}
    hessian = torch.autograd.functional.hessian(loss_of, theta)
    gradient = torch.autograd.functional.jacobian(loss_of, theta)
    score = -theta * (hessian @ gradient)
    s1, s2 = score.split(sizes)
    expected_scores = {"fc1.weight": s1.view_as(w1), "fc2.weight": s2.view_as(w2)}
    scores = GraSP([batch]).scores(model, prunable_parameters(model))
    for name, expected in expected_scores.items():
        torch.testing.assert_close(scores[name], expected, rtol=1e-9, atol=1e-12)
    masks = prune(model, GraSP([batch]), 0.7)
    _check_pruned(model, masks, _keep_top(expected_scores, 0.3, largest=False))


def _synflow_closed_form(a1, a2):
    """R = 1ᵀ|W2||W1|1 for a bias-free ReLU MLP: dR/d|W1|_ij = Σ_k |W2|_ki, and
    dR/d|W2|_ki = Σ_j |W1|_ij."""
    return {
        "fc1.weight": a1 * a2.sum(dim=0)[:, None],
        "fc2.weight": a2 * a1.sum(dim=1)[None, :],
    }


@pytest.mark.parametrize("iterations", [1, 5])
def test_synflow_follows_the_closed_form_and_the_exponential_schedule(iterations):
    model = MLP(bias=False)
    a1, a2 = (w.abs().double() for w in _weights(model).values())
    scores = SynFlow((3,), iterations).scores(model, prunable_parameters(model))
    for name, expected in _synflow_closed_form(a1, a2).items():
        torch.testing.assert_close(scores[name], expected)
    model = MLP(bias=False)
    density = 0.2
    m1, m2 = torch.ones_like(a1, dtype=torch.bool), torch.ones_like(a2, dtype=torch.bool)
    for k in range(1, iterations + 1):
        step = _keep_top(_synflow_closed_form(a1 * m1, a2 * m2), density ** (k / iterations))
        m1, m2 = step["fc1.weight"], step["fc2.weight"]
    masks = prune(model, SynFlow((3,), iterations), 1 - density)
    _check_pruned(model, masks, {"fc1.weight": m1, "fc2.weight": m2})


def test_iterative_synflow_differs_from_one_shot_at_high_sparsity():
    """The schedule matters: on this network 100 rounds keep another mask than one round."""
    one_shot = prune(MLP(bias=False, seed=5), SynFlow((3,), 1), 0.85)
    iterative = prune(MLP(bias=False, seed=5), SynFlow((3,), 100), 0.85)
    assert sum(int(m.sum()) for m in iterative.values()) == 3
    assert any(not torch.equal(one_shot[n], iterative[n]) for n in one_shot)


def test_stacked_scoring_splits_the_pruning_geometrically():
    model, batch = MLP(), _batch()
    weights = _weights(model)
    w1, w2 = (w.clone().requires_grad_() for w in weights.values())
    g1, g2 = torch.autograd.grad(_reference_loss(w1, w2, model, batch), [w1, w2])
    snip_scores = {"fc1.weight": (g1 * w1).abs().detach(), "fc2.weight": (g2 * w2).abs().detach()}
    # Target density 0.25 with two scorers: SNIP to 0.25 ** (1/2) = 0.5, magnitude to 0.25.
    after_snip = _keep_top(snip_scores, 0.5)
    survivors = {name: weights[name].abs() * after_snip[name] for name in weights}
    expected = _keep_top(survivors, 0.25)
    masks = prune(model, Stacked([SNIP([batch]), Magnitude()]), 0.75)
    _check_pruned(model, masks, expected)
    assert all(bool((~after_snip[n] <= ~masks[n]).all()) for n in masks)


def test_earlier_masks_stay_pruned_and_count_toward_sparsity():
    model = MLP()
    first = prune(model, SNIP([_batch()]), 0.5)
    second = prune(model, Magnitude(), 0.8, masks=first)
    assert all(bool((~first[n] <= ~second[n]).all()) for n in first)
    assert sum(int(m.sum()) for m in second.values()) == 4
    with pytest.raises(ValueError, match="below the masks"):
        prune(model, Magnitude(), 0.5, masks=second)


def test_mask_file_is_keyed_by_the_stored_tensor_names(tmp_path):
    model = ViTForImageClassification.from_pretrained(make_vit_folder(tmp_path / "vit", 0))
    masks = prune(model, Magnitude(), 0.7)
    save_pruned(model, masks, tmp_path / "pruned")
    stored = load_file(tmp_path / "pruned" / "model.safetensors")
    on_disk = read_mask_file(tmp_path / "pruned")
    assert set(on_disk) <= set(stored) and len(on_disk) == len(masks)
    # ViT stores q_proj as ...attention.attention.query: the file uses the stored name.
    assert "vit.encoder.layer.0.attention.attention.query.weight" in on_disk
    for name, mask in on_disk.items():
        assert mask.dtype == torch.bool
        assert bool((stored[name][~mask] == 0).all()) and bool((stored[name][mask] != 0).all())
    loaded = load_masks(model, tmp_path / "pruned")
    assert all(torch.equal(loaded[n], masks[n]) for n in masks)
    ingredient = Ingredient.from_source(str(tmp_path / "pruned"))
    assert set(ingredient.tensors) == set(stored)  # the mask file is not read as weights
    assert (tmp_path / "pruned" / MASK_FILE).is_file()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_save_pruned_of_a_half_precision_model_round_trips(tmp_path, dtype):
    # Stored names are read off a save with marker values: they must stay distinct in bf16.
    model = ViTForImageClassification.from_pretrained(
        make_vit_folder(tmp_path / "vit", seed=0), dtype=dtype
    )
    masks = prune(model, Magnitude(), 0.5)
    folder = save_pruned(model, masks, tmp_path / "pruned")
    stored = load_file(folder / "model.safetensors")
    mask_file = load_file(folder / MASK_FILE)
    assert len(mask_file) == len(masks)
    for name, kept in mask_file.items():
        assert stored[name].dtype == dtype and bool((stored[name][~kept] == 0).all())
    # The saved weights are the model's, restored after the markers.
    reloaded = ViTForImageClassification.from_pretrained(folder, dtype=dtype)
    for (name, expected), got in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(expected, got), name


def test_a_batch_without_a_loss_is_named(tmp_path):
    from tiny import make_clip_folder
    from transformers import CLIPModel

    from hf_soups.errors import HfSoupsError
    from hf_soups.pruning import model_loss

    model = CLIPModel.from_pretrained(make_clip_folder(tmp_path / "clip", seed=0))
    batch = {"input_ids": torch.tensor([[1, 2, 3]]), "pixel_values": torch.randn(1, 3, 16, 16)}
    with pytest.raises(HfSoupsError, match="CLIPModel returned no loss.*return_loss=True"):
        model_loss(model, batch)
    assert model_loss(model, {**batch, "return_loss": True}).ndim == 0
