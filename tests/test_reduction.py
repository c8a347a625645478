"""Structured reduction of ViT/CLIP MLP widths: scores against hand computations and the
weight-gradient identity, slicing against the dead-neuron output and plain indexing, the saved
folder against plain ``from_pretrained``, the tower choice against a hand FLOP count."""

import json
import math

import pytest
import torch
from tiny import CLIP_PROMPTS, VIT_CONFIG, make_clip_folder
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    AutoTokenizer,
    CLIPModel,
    CLIPVisionModel,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
)

from hf_soups.errors import HfSoupsError, OutputExistsError, UnsupportedArchitectureError
from hf_soups.pruning import model_counts, reduce_and_retrain, reduce_mlp, save_reduced
from hf_soups.pruning.reduction import (
    REDUCTION_FILE,
    magnitude_importance,
    mlp_towers,
    plan_cuts,
    taylor_importance,
    trainer_retrain,
)
from hf_soups.pruning.reduction.step import flops_per_neuron


class TinyMLP(nn.Module):
    """fc1: 2 -> 3, identity activation, fc2: 3 -> 1; weights set by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2, 3)
        self.fc2 = nn.Linear(3, 1)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
            self.fc1.bias.copy_(torch.tensor([0.0, 0.0, -1.0]))
            self.fc2.weight.copy_(torch.tensor([[2.0, -1.0, 3.0]]))
            self.fc2.bias.zero_()

    def forward(self, x):
        return self.fc2(self.fc1(x))


# Two examples of two tokens each.
TOKENS = torch.tensor([[[1.0, 2.0], [-1.0, 0.0]], [[0.0, 1.0], [2.0, -3.0]]])


def _sum_loss(model, batch):
    """Mean over examples of the sum of the outputs over tokens."""
    return model(batch).sum(dim=(1, 2)).mean()


def test_taylor_scores_match_a_hand_computation(one_thread):
    # a = (x0, x1, x0 + x1 - 1) per token; summed over tokens: example 0 -> (0, 2, 0),
    # example 1 -> (2, -2, -2). dL/da_j = w2_j / 2 = (1, -0.5, 1.5). Per example
    # |sum_t a_j dL/da_j|: (0, 1, 0) and (2, 1, 3); summed over examples (2, 2, 3), and the
    # mean over two identical batches keeps it. (Per-token absolute values would give
    # (4, 2, 12): the sum over tokens comes first.)
    model = TinyMLP()
    layers = {"mlp": (model.fc1, model.fc2)}
    scores = taylor_importance(model, layers, [TOKENS, TOKENS.clone()], _sum_loss)
    assert torch.allclose(scores["mlp"], torch.tensor([2.0, 2.0, 3.0]))
    assert model.fc1.weight.grad is None and model.fc2.weight.grad is None
    # A frozen network scores the same: the graph starts at the activation.
    model.requires_grad_(False)
    frozen = taylor_importance(model, layers, [TOKENS], _sum_loss)
    assert torch.allclose(frozen["mlp"], torch.tensor([2.0, 2.0, 3.0]))


def test_magnitude_scores_match_a_hand_computation():
    model = TinyMLP()
    # Row norms of fc1 (1, 1, sqrt 2) times column norms of fc2 (2, 1, 3).
    scores = magnitude_importance({"mlp": (model.fc1, model.fc2)})["mlp"]
    assert torch.allclose(scores, torch.tensor([2.0, 1.0, 3.0 * math.sqrt(2.0)]))


def _vit(seed=0, **overrides):
    torch.manual_seed(seed)
    return ViTForImageClassification(ViTConfig(**{**VIT_CONFIG, **overrides})).eval()


def _vit_batches(count=2, size=4, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "pixel_values": torch.randn(size, 3, 16, 16, generator=generator),
            "labels": torch.randint(0, 3, (size,), generator=generator),
        }
        for _ in range(count)
    ]


@pytest.fixture
def clip(tmp_path):
    folder = make_clip_folder(tmp_path / "clip", seed=0)
    return CLIPModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def _clip_loss(prompts):
    def loss_fn(model, batch):
        logits = model(**prompts, pixel_values=batch["pixel_values"]).logits_per_image
        return nn.functional.cross_entropy(logits, batch["labels"])

    return loss_fn


def _weight_gradient_reference(model, loss, layers):
    """With one example, the Taylor score is |sum_i W2[i, j] dL/dW2[i, j]| (dL/dW2 = g a^T)."""
    model.zero_grad()
    loss.backward()
    return {name: (fc2.weight * fc2.weight.grad).sum(0).abs() for name, (_, fc2) in layers.items()}


def test_taylor_scores_of_a_vit_match_the_weight_gradient_identity(one_thread):
    model = _vit()
    (tower,) = mlp_towers(model)
    batch = _vit_batches(count=1, size=1)[0]
    scores = taylor_importance(model, tower.layers, [batch])
    reference = _weight_gradient_reference(model, model(**batch).loss, tower.layers)
    assert set(scores) == {"vit.layers.0.mlp", "vit.layers.1.mlp"}
    for name in scores:
        torch.testing.assert_close(scores[name], reference[name], rtol=1e-4, atol=1e-9)


def test_taylor_scores_of_both_clip_towers_match_the_weight_gradient_identity(one_thread, clip):
    model, tokenizer = clip
    prompts = tokenizer(CLIP_PROMPTS[:1], return_tensors="pt")  # one example in each tower
    image = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))

    def loss_fn(m, batch):
        return m(**prompts, pixel_values=batch).logits_per_image.sum()

    layers = {n: pair for tower in mlp_towers(model) for n, pair in tower.layers.items()}
    scores = taylor_importance(model, layers, [image], loss_fn)
    reference = _weight_gradient_reference(model, loss_fn(model, image), layers)
    assert set(scores) == {"text_model.encoder.layers.0.mlp", "vision_model.encoder.layers.0.mlp"}
    for name in scores:
        assert scores[name].abs().sum() > 0, name
        torch.testing.assert_close(scores[name], reference[name], rtol=1e-4, atol=1e-9)


def _kill(layers, dead):
    """Zero the fc1 rows and biases of neurons ``dead[name]``: their activations are act(0) = 0."""
    with torch.no_grad():
        for name, (fc1, _) in layers.items():
            fc1.weight[dead[name]] = 0.0
            fc1.bias[dead[name]] = 0.0


def _without(tensor, indices, dim):
    keep = torch.ones(tensor.shape[dim], dtype=torch.bool)
    keep[indices] = False
    return tensor[keep] if dim == 0 else tensor[:, keep]


@pytest.mark.parametrize("scored", [True, False], ids=["taylor", "magnitude"])
def test_removing_dead_neurons_leaves_a_vit_output_unchanged(one_thread, tmp_path, scored):
    model = _vit()
    (tower,) = mlp_towers(model)
    dead = {"vit.layers.0.mlp": [3, 7, 30], "vit.layers.1.mlp": [0, 12, 13]}
    _kill(tower.layers, dead)
    batches = _vit_batches()
    original = {name: t.clone() for name, t in model.state_dict().items()}
    reduced, step = reduce_mlp(model, batches if scored else None, neurons=3)
    assert step.removed == dead and step.neurons == {"vision": 3}
    assert step.importance == ("taylor" if scored else "magnitude")
    assert reduced.config.intermediate_size == 29 and model.config.intermediate_size == 32
    for batch in batches:
        torch.testing.assert_close(
            reduced(pixel_values=batch["pixel_values"]).logits,
            model(pixel_values=batch["pixel_values"]).logits,
            rtol=1e-6,
            atol=1e-7,
        )
    # The input model is untouched, and the saved folder loads as its tensors minus the dead ones.
    assert all(torch.equal(original[n], t) for n, t in model.state_dict().items())
    reduced.save_pretrained(tmp_path / "reduced")
    stored = ViTForImageClassification.from_pretrained(tmp_path / "reduced").state_dict()
    for name, indices in dead.items():
        for key, dim in (("fc1.weight", 0), ("fc1.bias", 0), ("fc2.weight", 1)):
            expected = _without(original[f"{name}.{key}"], indices, dim)
            assert torch.equal(stored[f"{name}.{key}"], expected), (name, key)
        assert torch.equal(stored[f"{name}.fc2.bias"], original[f"{name}.fc2.bias"])


def test_removing_dead_neurons_leaves_clip_outputs_unchanged(one_thread, clip):
    model, tokenizer = clip
    prompts = dict(tokenizer(CLIP_PROMPTS, padding=True, return_tensors="pt"))
    towers = {tower.name: tower for tower in mlp_towers(model)}
    dead = {"text_model.encoder.layers.0.mlp": [1, 5], "vision_model.encoder.layers.0.mlp": [2, 9]}
    for tower in towers.values():
        _kill(tower.layers, dead)
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    batches = [{"pixel_values": images, "labels": torch.tensor([0, 1, 2])}]
    reduced, step = reduce_mlp(model, batches, neurons=4, loss_fn=_clip_loss(prompts))
    assert step.neurons == {"text": 2, "vision": 2} and step.removed == dead
    assert reduced.config.text_config.intermediate_size == 30
    assert reduced.config.vision_config.intermediate_size == 30
    got = reduced(**prompts, pixel_values=images)
    want = model(**prompts, pixel_values=images)
    for key in ("logits_per_image", "text_embeds", "image_embeds"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7)


def test_flop_aware_selection_picks_the_tower_a_hand_count_says(clip):
    model, _ = clip
    # Tiny CLIP: both towers width 16, one layer; vision 2x2 patches + class token = 5 tokens,
    # text max_position_embeddings = 12 tokens. One neuron per layer saves 2 FLOPs x (16 MACs
    # in fc1 + 16 in fc2) per token.
    assert flops_per_neuron(model, mlp_towers(model)) == {
        "text": 2 * 2 * 16 * 12,
        "vision": 2 * 2 * 16 * 5,
    }
    assert flops_per_neuron(model, mlp_towers(model), text_length=4)["text"] == 2 * 2 * 16 * 4
    # Weight-magnitude scores by hand; scale the text MLP so its least important neuron scores
    # twice the vision one: text still loses less per FLOP (2 / 768 < 1 / 320).
    layers = {tower.name: next(iter(tower.layers.values())) for tower in mlp_towers(model)}

    def least(pair):
        fc1, fc2 = pair
        return float((fc1.weight.norm(dim=1) * fc2.weight.norm(dim=0)).min())

    with torch.no_grad():
        layers["text"][0].weight.mul_(2 * least(layers["vision"]) / least(layers["text"]))
        assert least(layers["text"]) > least(layers["vision"])
    _, step = reduce_mlp(model, neurons=1)
    assert step.neurons == {"text": 1, "vision": 0}
    # With 4-token texts a text neuron saves 256 FLOPs: vision is now cheaper (1/320 < 2/256).
    _, step = reduce_mlp(model, neurons=1, text_length=4)
    assert step.neurons == {"text": 0, "vision": 1}


def test_plan_cuts_by_hand():
    scores = {
        "text": torch.tensor([[0.1, 0.2, 0.9], [0.1, 0.3, 0.9]]),  # cut sums 0.2, 0.5
        "vision": torch.tensor([[0.05, 0.09, 0.2]]),  # cut sums 0.05, 0.09
    }
    costs = {"text": 100, "vision": 20}
    # Per FLOP: text 0.002 then 0.005; vision 0.0025 then 0.0045; the last neuron stays.
    assert plan_cuts(scores, costs, neurons=1) == {"text": 1, "vision": 0}
    assert plan_cuts(scores, costs, neurons=2) == {"text": 1, "vision": 1}
    assert plan_cuts(scores, costs, flops=121) == {"text": 1, "vision": 2}
    assert plan_cuts(scores, costs, neurons=4) == {"text": 2, "vision": 2}
    with pytest.raises(HfSoupsError, match="down to one neuron"):
        plan_cuts(scores, costs, neurons=5)
    with pytest.raises(HfSoupsError, match="exactly one"):
        plan_cuts(scores, costs)


def test_a_flop_share_is_reached_in_one_step(one_thread):
    model = _vit()
    reduced, step = reduce_mlp(model, _vit_batches(), flops=0.2)
    assert 1 - step.flops[1] / step.flops[0] >= 0.2
    # One neuron fewer would not have reached it.
    per_neuron = flops_per_neuron(model, mlp_towers(model))["vision"]
    assert 1 - (step.flops[1] + per_neuron) / step.flops[0] < 0.2
    assert reduced.config.intermediate_size == 32 - step.neurons["vision"]


def test_reduce_and_retrain_reaches_its_targets_and_saves_a_plain_folder(one_thread, tmp_path):
    model = _vit()
    batches = _vit_batches()
    train = [
        {**b, "pixel_values": b["pixel_values"][i], "labels": b["labels"][i]}
        for b in batches
        for i in range(4)
    ]
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        use_cpu=True,
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    calls, changed = [], []
    retrain = trainer_retrain(args, train)

    def counted(narrowed, step):
        before = narrowed.vit.layers[0].mlp.fc1.weight.clone()
        retrain(narrowed, step)
        calls.append(step)
        changed.append(not torch.equal(before, narrowed.vit.layers[0].mlp.fc1.weight))

    seen = []
    result = reduce_and_retrain(
        model,
        batches,
        retrain=counted,
        target_parameters=0.2,
        target_flops=0.2,
        step_neurons=4,
        on_step=lambda step, m: seen.append(m.config.intermediate_size),
    )
    assert calls == list(range(len(result.steps))) and all(changed)
    assert seen == [32 - 4 * (i + 1) for i in range(len(result.steps))]
    assert result.parameter_reduction >= 0.2 and result.flop_reduction >= 0.2
    # One step fewer would have missed a target.
    previous = result.steps[-1]
    assert (
        1 - previous.parameters[0] / result.before["parameters"] < 0.2
        or 1 - previous.flops[0] / result.before["flops"] < 0.2
    )
    folder = save_reduced(result, tmp_path / "reduced")
    loaded = ViTForImageClassification.from_pretrained(folder)
    assert loaded.config.intermediate_size == seen[-1]
    recipe = json.loads((folder / REDUCTION_FILE).read_text())
    assert recipe["parameters"]["after"] == sum(p.numel() for p in loaded.parameters())
    assert recipe["parameters"]["before"] == sum(p.numel() for p in model.parameters())
    assert recipe["intermediate_size"] == {"before": {"vision": 32}, "after": {"vision": seen[-1]}}
    assert len(recipe["steps"]) == len(result.steps)
    loaded.config._attn_implementation = "eager"
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        loaded(pixel_values=batches[0]["pixel_values"][:1])
    assert recipe["flops"]["after"] == counter.get_total_flops()
    torch.testing.assert_close(
        loaded(pixel_values=batches[0]["pixel_values"]).logits,
        result.model(pixel_values=batches[0]["pixel_values"]).logits,
    )
    with pytest.raises(OutputExistsError):
        save_reduced(result, folder)


def test_reduced_clip_saves_and_loads_with_plain_from_pretrained(one_thread, clip, tmp_path):
    model, tokenizer = clip
    prompts = dict(tokenizer(CLIP_PROMPTS, padding=True, return_tensors="pt"))
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    batches = [{"pixel_values": images, "labels": torch.tensor([0, 1, 2])}]
    result = reduce_and_retrain(
        model,
        batches,
        target_flops=0.15,
        step_flops=0.05,
        loss_fn=_clip_loss(prompts),
        text_length=prompts["input_ids"].shape[1],
    )
    folder = save_reduced(result, tmp_path / "reduced", processing_class=tokenizer)
    loaded = CLIPModel.from_pretrained(folder)
    recipe = json.loads((folder / REDUCTION_FILE).read_text())
    after = recipe["intermediate_size"]["after"]
    assert after == {
        "text": loaded.config.text_config.intermediate_size,
        "vision": loaded.config.vision_config.intermediate_size,
    }
    assert min(after.values()) < 32
    assert recipe["parameters"]["after"] == sum(p.numel() for p in loaded.parameters())
    counts = model_counts(loaded, text_length=prompts["input_ids"].shape[1])
    assert recipe["flops"]["after"] == counts["flops"]
    assert recipe["flops"]["reduction"] >= 0.15
    torch.testing.assert_close(
        loaded(**prompts, pixel_values=images).logits_per_image,
        result.model(**prompts, pixel_values=images).logits_per_image,
    )


def test_a_clip_vision_model_narrows(one_thread, clip, tmp_path):
    model, _ = clip
    vision = CLIPVisionModel(model.config.vision_config).eval()
    reduced, step = reduce_mlp(vision, neurons=5)
    assert step.neurons == {"vision": 5} and reduced.config.intermediate_size == 27
    reduced.save_pretrained(tmp_path / "vision")
    loaded = CLIPVisionModel.from_pretrained(tmp_path / "vision")
    assert sum(p.numel() for p in loaded.parameters()) == step.parameters[1]


def test_mistakes_are_named(clip):
    model, _ = clip
    with pytest.raises(UnsupportedArchitectureError, match="TinyMLP"):
        reduce_mlp(TinyMLP(), neurons=1)
    with pytest.raises(HfSoupsError, match="towers"):
        reduce_mlp(model, neurons=1, towers=["audio"])
    with pytest.raises(ValueError, match="flops"):
        reduce_mlp(model, flops=1.5)
    with pytest.raises(HfSoupsError, match="target"):
        reduce_and_retrain(model, step_neurons=1)
    with pytest.raises(HfSoupsError, match="max_steps"):
        reduce_and_retrain(model, target_flops=0.9, step_neurons=1, max_steps=2)
    with pytest.raises(HfSoupsError, match="exactly one of step_neurons or step_flops"):
        reduce_and_retrain(model, target_flops=0.2)


def test_the_last_step_takes_only_what_is_left_of_the_flop_target(one_thread):
    model = _vit()
    result = reduce_and_retrain(model, _vit_batches(), target_flops=0.2, step_flops=0.15)
    # A second full step would save 15% of the remaining 85%, ending near 27.8%; the capped
    # one stops at the first cut past 20%.
    assert len(result.steps) == 2
    assert 0.2 <= result.flop_reduction < 0.25, result.flop_reduction
