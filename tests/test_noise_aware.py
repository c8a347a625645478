"""greedy(noise_aware=True) tests the metric it optimises, with the candidate as the challenger.

The Evaluator here is scripted: each model's per-example values are a function of its distance
to a target model, so which ingredients a correct noise-aware greedy keeps is known in advance
(the paper's loop on that distance, written out below). Top-1 accuracy is the same for every
model, so a rule that tests accuracy instead of the optimised metric keeps nothing but the
best ingredient; so does a rule that tests the current soup against the candidate.
"""

import datasets
import numpy as np
import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification

from hf_soups.evaluation import EvalResult, Evaluator
from hf_soups.soup import SoupBuilder

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = ViTConfig(
    hidden_size=8,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=16,
    image_size=4,
    patch_size=2,
    num_channels=1,
    num_labels=2,
)
N = 400
OFFSETS = np.random.default_rng(0).normal(size=N)  # shared by all models: cancels when paired


def distance(state, target) -> float:
    return float(sum(((state[k].double() - target[k].double()) ** 2).sum() for k in target) ** 0.5)


class ScriptedEvaluator(Evaluator):
    """Per-example `closeness` = -(distance to target) + shared offsets + optional zero-mean
    noise of the model's own; per-example `distance` its negative. Accuracy: half right,
    identically for every model. The metrics are the means: exactly minus the distance."""

    def __init__(self, target, noise: float = 0.0):
        placeholder = datasets.Dataset.from_dict({"pixel_values": [[0.0]], "labels": [0]})
        super().__init__(placeholder, progress=False)
        self.target, self.noise = target, noise

    def evaluate(self, model, *, name=None):
        d = distance(model.state_dict(), self.target)
        own = np.random.default_rng(int(d * 1e9) % 2**32).normal(scale=self.noise, size=N)
        closeness = -d + OFFSETS + (own - own.mean())  # noise that leaves the mean exact
        labels = np.zeros(N, dtype=np.int64)
        predictions = np.where(np.arange(N) < N // 2, 0, 1)
        per_example = {"accuracy": predictions == labels, "closeness": closeness}
        per_example["distance"] = -closeness
        metrics = {key: float(np.mean(values)) for key, values in per_example.items()}
        return EvalResult(name or "scripted", metrics, predictions, labels, per_example=per_example)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("noise_aware_pool")
    torch.manual_seed(0)
    target_model = ViTForImageClassification(CONFIG)
    target = target_model.state_dict()
    generator = torch.Generator().manual_seed(1)
    folders, states = [], []
    for i, scale in enumerate([0.05, 0.3, 0.06, 0.5, 0.07]):
        state = {
            k: v + scale * torch.randn(v.shape, generator=generator) for k, v in target.items()
        }
        model = ViTForImageClassification(CONFIG)
        model.load_state_dict(state)
        model.save_pretrained(root / f"ingredient{i}")
        folders.append(str(root / f"ingredient{i}"))
        states.append(state)
    return folders, states, target


def paper_greedy(states, target) -> list[int]:
    """The mlfoundations/model-soups greedy loop on minus the distance to the target."""
    score = [-distance(s, target) for s in states]
    order = sorted(range(len(states)), key=lambda i: score[i], reverse=True)
    kept, best = [order[0]], score[order[0]]
    for i in order[1:]:
        candidate = {
            k: sum(states[j][k].double() for j in [*kept, i]) / (len(kept) + 1) for k in target
        }
        value = -distance(candidate, target)
        if value > best:
            kept, best = [*kept, i], value
    return kept


def kept_sources(soup) -> list[str]:
    return [ingredient.source for ingredient in soup.ingredients]


def test_noise_aware_greedy_tests_the_optimised_metric(pool):
    folders, states, target = pool
    expected = [folders[i] for i in paper_greedy(states, target)]
    assert len(expected) > 1  # otherwise a rule that rejects everything would pass
    builder = SoupBuilder.from_pretrained(folders)
    evaluator = ScriptedEvaluator(target)
    # Every gain in closeness is exact (the offsets cancel), so every one is significant; a
    # test on accuracy (tied everywhere) or with the arguments swapped would accept none.
    soup = builder.greedy(evaluator, metric="closeness", noise_aware=True)
    assert kept_sources(soup) == expected
    kept_reasons = [t.reason for t in soup.record.greedy_trace[1:] if t.kept]
    assert kept_reasons and all(reason.endswith("significant") for reason in kept_reasons)
    # The same search on the loss form of the metric, minimised, keeps the same ingredients.
    minimised = builder.greedy(evaluator, metric="distance", maximize=False, noise_aware=True)
    assert kept_sources(minimised) == expected


def test_noise_aware_greedy_rejects_gains_within_noise(pool):
    folders, states, target = pool
    builder = SoupBuilder.from_pretrained(folders)
    # Per-example noise of sd 50 against mean gains below 1: the gains pass the paper's rule
    # but the paired bootstrap cannot tell them from zero, so only the best ingredient stays.
    soup = builder.greedy(
        ScriptedEvaluator(target, noise=50.0), metric="closeness", noise_aware=True
    )
    trace = soup.record.greedy_trace
    assert len(soup.ingredients) == 1
    assert soup.ingredients[0].source == folders[paper_greedy(states, target)[0]]
    assert any(t.reason.endswith("within noise") for t in trace[1:])
