"""Soupability diagnostics: streamed statistics, barriers on real data, verdicts, plots, CLI.

References are independent of hf_soups: weight statistics are float64 sums over state dicts read
with safetensors itself (tests/tiny.py); path scores come from models built by transformers from
float64 mixtures of those state dicts and scored with plain torch. The models are tiny ViTs
trained on scikit-learn's digits (8x8, 1,797 images): a "pre-trained" start, two fine-tunes of
it (other seeds and learning rates) and a model trained from another random start.
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from datasets import Dataset
from sklearn.datasets import load_digits
from tiny import load_weights, make_vit_folder, write_weights_folder
from transformers import ViTConfig, ViTForImageClassification

from hf_soups.cli import main
from hf_soups.diagnostics import (
    CROSS_ENTROPY,
    PATHS_PLOT,
    SOUP,
    WEIGHTS_PLOT,
    Thresholds,
    check_soupability,
    cross_entropy,
    judge,
    linear_mode_connectivity,
    pairwise_weight_statistics,
    write_plots,
)
from hf_soups.diagnostics import weights as weights_module
from hf_soups.diagnostics.connectivity import interpolation_pairs
from hf_soups.errors import IncompatibleIngredientsError, NonFiniteWeightsError
from hf_soups.evaluation import Evaluator
from hf_soups.ingredients import Ingredient
from hf_soups.patching.recipe import RecipeError

DIGITS_VIT = dict(
    image_size=8,
    patch_size=2,
    num_channels=1,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    num_labels=10,
)


# -- data and models -----------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The test machine is shared: one torch thread runs faster here than contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    """Digits scaled to [0, 1]: 1,000 training images and 797 held-out ones."""
    data = load_digits()
    images = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(data.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, test = order[:1000], order[1000:]
    return images[train], labels[train], images[test], labels[test]


def _train(model, images, labels, *, seed: int, lr: float, epochs: int):
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order), 50):
            batch = order[start : start + 50]
            loss = F.cross_entropy(model(pixel_values=images[batch]).logits, labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits):
    """Folders: ``start`` (trained from seed 0 on 600 images), ``ft1``/``ft2`` (fine-tuned from
    it with other seeds and learning rates) and ``other`` (trained from seed 3)."""
    root = tmp_path_factory.mktemp("digits_vits")
    images, labels, _, _ = digits
    config = ViTConfig(**DIGITS_VIT)
    torch.manual_seed(0)
    start = _train(
        ViTForImageClassification(config), images[:600], labels[:600], seed=0, lr=3e-3, epochs=8
    )
    start.save_pretrained(root / "start")
    folders = {"start": root / "start"}
    for name, seed, lr in (("ft1", 1, 1e-3), ("ft2", 2, 3e-4)):
        model = ViTForImageClassification.from_pretrained(root / "start")
        _train(model, images, labels, seed=seed, lr=lr, epochs=3).save_pretrained(root / name)
        folders[name] = root / name
    torch.manual_seed(3)
    other = _train(ViTForImageClassification(config), images, labels, seed=3, lr=3e-3, epochs=8)
    other.save_pretrained(root / "other")
    folders["other"] = root / "other"
    return folders


@pytest.fixture(scope="module")
def held_out(digits):
    _, _, images, labels = digits
    return Dataset.from_dict({"pixel_values": images.numpy(), "labels": labels.numpy()})


def _evaluator(held_out, **kwargs) -> Evaluator:
    return Evaluator(held_out, progress=False, **kwargs)


@pytest.fixture(scope="module")
def lmc_report(trained, held_out):
    return check_soupability(
        [trained["ft1"], trained["ft2"], trained["other"]],
        evaluator=_evaluator(held_out),
        points=5,
        progress=False,
    )


# -- independent references ----------------------------------------------------------------


def _float_state(folder) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in load_weights(folder).items() if v.is_floating_point()}


def _reference_path(folders, weights_at, ts, held_out_images, held_out_labels):
    """Accuracy and cross-entropy along a path, models mixed in float64 from load_file'd
    weights, built by transformers and scored with plain torch."""
    states = [_float_state(folder) for folder in folders]
    config = ViTConfig.from_pretrained(folders[0])
    accuracies, losses = [], []
    for t in ts:
        weights = weights_at(t)
        mixed = {
            name: sum(w * state[name] for w, state in zip(weights, states)).float()
            for name in states[0]
        }
        model = ViTForImageClassification.from_pretrained(None, config=config, state_dict=mixed)
        with torch.no_grad():
            logits = model.eval()(pixel_values=held_out_images).logits.double()
        accuracies.append((logits.argmax(1) == held_out_labels).double().mean().item())
        losses.append(F.cross_entropy(logits, held_out_labels).item())
    return accuracies, losses


def _barrier(ts, values, higher_is_better=True):
    sign = 1.0 if higher_is_better else -1.0
    gaps = [sign * ((1 - t) * values[0] + t * values[-1] - v) for t, v in zip(ts, values)]
    return max(0.0, max(gaps))


# -- streamed weight statistics --------------------------------------------------------------


def _perturbed(base: Path, out: Path, seed: int, shared: dict, **save_kwargs) -> Path:
    """A "fine-tune" of ``base``: base + a direction shared by all + its own noise."""
    generator = torch.Generator().manual_seed(seed)
    state = {
        name: tensor + shared[name] + 0.05 * torch.randn(tensor.shape, generator=generator)
        for name, tensor in load_weights(base).items()
    }
    config = ViTConfig.from_pretrained(base)
    model = ViTForImageClassification.from_pretrained(None, config=config, state_dict=state)
    dtype = save_kwargs.pop("dtype", None)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(out, **save_kwargs)
    return out


@pytest.fixture(scope="module")
def related(tmp_path_factory):
    """A base and three perturbations of it: one file, 8 KB shards, and float16."""
    root = tmp_path_factory.mktemp("related")
    base = make_vit_folder(root / "base", 0)
    generator = torch.Generator().manual_seed(100)
    shared = {
        name: 0.05 * torch.randn(tensor.shape, generator=generator)
        for name, tensor in load_weights(base).items()
    }
    return base, [
        _perturbed(base, root / "a", 1, shared),
        _perturbed(base, root / "b", 2, shared, max_shard_size="8KB"),
        _perturbed(base, root / "c", 3, shared, dtype=torch.float16),
    ]


def _flat(state: dict[str, torch.Tensor], names) -> torch.Tensor:
    return torch.cat([state[name].reshape(-1) for name in names])


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a @ b / (a.norm() * b.norm())).item()


@pytest.mark.parametrize("with_base", [True, False])
def test_streamed_statistics_match_float64_reference(related, with_base, monkeypatch):
    base, folders = related
    # Slices of 7 elements exercise the chunked accumulation, remainders included.
    monkeypatch.setattr(weights_module, "CHUNK_ELEMENTS", 7)
    stats = pairwise_weight_statistics(folders, base=base if with_base else None, progress=False)

    states = [_float_state(folder) for folder in folders]
    base_state = _float_state(base)
    names = sorted(states[0])
    assert sorted(stats.tensors) == names and stats.skipped == []
    x = torch.stack([_flat(state, names) for state in states])
    expected_distances = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
    np.testing.assert_allclose(stats.distances, expected_distances.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(stats.norms, x.norm(dim=1).numpy(), rtol=1e-12)
    soup = x.mean(dim=0)
    np.testing.assert_allclose(stats.distances_to_soup, (x - soup).norm(dim=1).numpy(), rtol=1e-7)
    u = x - _flat(base_state, names) if with_base else x
    for i in range(3):
        for j in range(3):
            if i != j:
                assert stats.cosines[i, j] == pytest.approx(_cosine(u[i], u[j]), rel=1e-9)
    assert stats.cosine_of == ("deltas from the base" if with_base else "raw weights")
    if with_base:
        # Deltas share one direction: positive, well below 1; raw weights are nearly parallel.
        assert 0.2 < stats.cosines[0, 1] < 0.9
        np.testing.assert_allclose(stats.delta_norms, u.norm(dim=1).numpy(), rtol=1e-9)
        moves = [
            np.median(
                [
                    ((state[n] - base_state[n]).norm() / base_state[n].norm()).item()
                    for n in names
                    if base_state[n].norm() > 0
                ]
            )
            for state in states
        ]
        np.testing.assert_allclose(stats.median_relative_moves, moves, rtol=1e-9)

    # Per tensor and per layer, for one pair, against sums over the same tensors.
    rows = {row["name"]: row for row in stats.per_tensor(2, 0)}
    for name in names:
        distance = (states[2][name] - states[0][name]).norm().item()
        assert rows[name]["distance"] == pytest.approx(distance, rel=1e-9, abs=1e-12)
        assert rows[name]["relative_distance"] == pytest.approx(
            distance / states[2][name].norm().item(), rel=1e-9
        )
    layer = "vit.encoder.layer.1"
    members = [n for n in names if n.startswith(layer + ".")]
    assert len(members) == 16
    (layer_row,) = [row for row in stats.per_layer(2, 0) if row["name"] == layer]
    expected = (_flat(states[2], members) - _flat(states[0], members)).norm().item()
    assert layer_row["distance"] == pytest.approx(expected, rel=1e-9)
    medians = [
        np.median(
            [
                ((states[0][n] - states[j][n]).norm() / states[0][n].norm()).item()
                for n in names
                if states[0][n].norm() > 0
            ]
        )
        for j in range(3)
    ]
    np.testing.assert_allclose(stats.median_relative_distances[0], medians, rtol=1e-9)


def test_statistics_hold_one_tensor_name_at_a_time(related, monkeypatch):
    base, folders = related
    folders = folders[:2]  # float32: the tensor read is the tensor held (no cast copy)
    alive: dict[int, str] = {}
    reads: list[tuple[str, str]] = []
    violations: list[str] = []
    original = Ingredient.read

    def tracked(self, name, out=None):
        others = {held for held in alive.values() if held != name}
        if others:
            violations.append(f"reading {name!r} while {sorted(others)} are held")
        tensor = original(self, name, out=out)
        key = id(tensor)
        alive[key] = name
        weakref.finalize(tensor, alive.pop, key, None)
        reads.append((self.name, name))
        return tensor

    monkeypatch.setattr(Ingredient, "read", tracked)
    stats = pairwise_weight_statistics(folders, base=base, progress=False)

    assert violations == []
    names = list(stats.tensors)
    # Each tensor of each model (base included) read exactly once, name by name.
    assert len(reads) == 3 * len(names) and len(set(reads)) == len(reads)
    assert [name for _, name in reads] == [name for name in names for _ in range(3)]


def test_non_finite_and_incompatible_ingredients_are_named(tmp_path):
    good = {"w": torch.ones(4, 3), "b": torch.zeros(3)}
    bad = {"w": torch.tensor([[float("nan")] * 3] * 4), "b": torch.zeros(3)}
    a = write_weights_folder(tmp_path / "a", good)
    b = write_weights_folder(tmp_path / "b", bad)
    with pytest.raises(NonFiniteWeightsError, match="'w'.*b"):
        pairwise_weight_statistics([a, b], progress=False)
    c = write_weights_folder(tmp_path / "c", {"w": torch.ones(4, 2), "b": torch.zeros(3)})
    with pytest.raises(IncompatibleIngredientsError, match="'w'"):
        check_soupability([a, c], progress=False)


def test_integer_buffers_skipped_and_zero_tensors_give_no_ratio(tmp_path):
    a = write_weights_folder(
        tmp_path / "a", {"w": torch.ones(5), "b": torch.zeros(2), "n": torch.tensor([3])}
    )
    b = write_weights_folder(
        tmp_path / "b", {"w": 2 * torch.ones(5), "b": torch.zeros(2), "n": torch.tensor([4])}
    )
    stats = pairwise_weight_statistics([a, b], progress=False)
    assert stats.skipped == ["n"] and sorted(stats.tensors) == ["b", "w"]
    assert stats.distances[0, 1] == pytest.approx(np.sqrt(5.0))
    # "b" is zero in both: no relative distance, so the median is over "w" alone: |2-1|/1.
    assert stats.median_relative_distances[0, 1] == pytest.approx(1.0)
    assert stats.median_relative_distances[1, 0] == pytest.approx(0.5)
    assert json.dumps(stats.to_dict(per_tensor=True))  # NaN written as null, valid JSON


# -- barriers on real data -------------------------------------------------------------------


def test_fine_tunes_pass_and_another_start_fails_with_measured_barrier(lmc_report, trained, digits):
    _, _, images, labels = digits
    folders = [trained["ft1"], trained["ft2"], trained["other"]]
    report = lmc_report
    statuses = [verdict.status for verdict in report.verdicts]
    assert statuses == ["ok", "ok", "fail"], report.table()
    assert "different pre-trained start" in report.verdicts[2].reason
    assert "averaging will hurt" in report.verdicts[2].reason
    assert report.verdicts[0].reason.startswith("ok: barrier")
    # The yardstick is a fine-tune (the medoid), never the model of another start.
    assert report.reference in (0, 1)
    assert len(report.paths) == 2

    for path in report.paths:
        i, j = path.indices
        assert i == report.reference and path.ts == [0.0, 0.25, 0.5, 0.75, 1.0]
        accuracies, losses = _reference_path(
            [folders[i], folders[j]], lambda t: (1 - t, t), path.ts, images, labels
        )
        # float32 vs float64 mixing may flip a prediction or two out of 797.
        np.testing.assert_allclose(path.scores, accuracies, atol=2.5 / len(labels))
        np.testing.assert_allclose(path.losses, losses, rtol=1e-4)
        assert path.barrier == pytest.approx(100 * _barrier(path.ts, accuracies), abs=0.5)
        assert path.loss_barrier == pytest.approx(
            _barrier(path.ts, losses, higher_is_better=False), abs=1e-3
        )
        assert path.loss_metric == CROSS_ENTROPY
        if j == 2:
            # Another random start: the midpoint is near chance (10%) on real digits.
            assert path.barrier > 30 and path.loss_barrier > 0.5
        else:
            assert path.barrier < 2

    data = report.to_dict()
    assert [v["status"] for v in data["verdicts"]] == statuses
    assert json.loads(json.dumps(data))["paths"][0]["ts"] == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_soup_paths_end_at_the_uniform_soup_and_score_each_model_once(
    trained, held_out, digits, monkeypatch
):
    _, _, images, labels = digits
    folders = [trained["ft1"], trained["ft2"], trained["start"]]
    calls: list[str] = []
    original = Evaluator.evaluate

    def counted(self, model, *, name=None):
        calls.append(name)
        return original(self, model, name=name)

    monkeypatch.setattr(Evaluator, "evaluate", counted)
    evaluator = _evaluator(held_out, metrics={"accuracy": "accuracy", "nll": cross_entropy})
    paths = linear_mode_connectivity(
        folders, evaluator, pairs="soup", points=3, loss="nll", progress=False
    )
    # Three ingredients, three midpoints, one soup: the soup is scored once for three paths.
    assert len(calls) == 7
    assert [p.indices for p in paths] == [(0, SOUP), (1, SOUP), (2, SOUP)]
    soup_accuracy, soup_loss = _reference_path(
        folders, lambda t: (1 / 3, 1 / 3, 1 / 3), [1.0], images, labels
    )
    for k, path in enumerate(paths):
        assert path.end == "uniform soup" and path.loss_metric == "nll"
        assert path.scores[-1] == pytest.approx(soup_accuracy[0], abs=2.5 / len(labels))
        assert path.losses[-1] == pytest.approx(soup_loss[0], rel=1e-4)
        weights = [0.0, 0.0, 0.0]
        weights[k] = 1.0
        midpoint = [0.5 * w + 0.5 / 3 for w in weights]
        accuracy, _ = _reference_path(folders, lambda t, m=midpoint: m, [0.5], images, labels)
        assert path.scores[1] == pytest.approx(accuracy[0], abs=2.5 / len(labels))


def test_distance_only_verdicts_flag_another_start(trained):
    for base in (None, trained["start"]):
        report = check_soupability(
            [trained["ft1"], trained["ft2"], trained["other"]], base=base, progress=False
        )
        assert [v.status for v in report.verdicts] == ["ok", "ok", "fail"], report.table()
        assert all("distance heuristic" in v.reason for v in report.verdicts)
        assert report.paths == [] and not report.ok
        relative = report.verdicts[2].relative_distance
        # Another random start: its tensors are about as far apart as unrelated ones (1.41).
        assert relative > 1.0
        assert all(v.relative_distance < 0.5 for v in report.verdicts[:2])
        if base is not None:
            assert report.weights.cosine_of == "deltas from the base"
            assert "delta cosine" in report.verdicts[0].reason
    # With the start itself among the ingredients, fine-tunes are next to it.
    report = check_soupability([trained["start"], trained["ft1"], trained["ft2"]], progress=False)
    assert report.ok, report.table()


def test_thresholds_are_configurable(lmc_report):
    scratch_barrier = lmc_report.verdicts[2].barrier
    lenient = lmc_report.rejudge(Thresholds(warn_barrier=1.0, fail_barrier=scratch_barrier + 1))
    assert (
        lenient.verdicts[2].status == "warn" and "may cost accuracy" in lenient.verdicts[2].reason
    )
    everything = lmc_report.rejudge(
        Thresholds(warn_barrier=scratch_barrier + 1, fail_barrier=scratch_barrier + 2)
    )
    assert everything.ok
    scratch_loss = lmc_report.paths[-1].loss_barrier
    loss_limited = lmc_report.rejudge(
        Thresholds(
            warn_barrier=scratch_barrier + 1,
            fail_barrier=scratch_barrier + 2,
            max_loss_barrier=scratch_loss / 2,
        )
    )
    assert [v.status for v in loss_limited.verdicts] == ["ok", "ok", "warn"]
    assert loss_limited.verdicts[2].reason.startswith("loss barrier")
    with pytest.raises(ValueError, match="warn_barrier"):
        Thresholds(warn_barrier=5, fail_barrier=1)
    (single,) = judge(None, [], names=["only"])
    assert single.ok


def test_plots_are_written_and_named(lmc_report, tmp_path):
    from matplotlib.image import imread

    names = write_plots(lmc_report, tmp_path / "plots")
    assert names == [WEIGHTS_PLOT, PATHS_PLOT] and lmc_report.plots == names
    for name in names:
        file = tmp_path / "plots" / name
        assert file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width, _ = imread(file).shape
        assert height > 300 and width > 500


def test_bad_path_arguments(trained, held_out):
    folders = [trained["ft1"], trained["ft2"]]
    evaluator = _evaluator(held_out)
    assert interpolation_pairs(3, "all") == [(0, 1), (0, 2), (1, 2)]
    assert interpolation_pairs(3, "reference", reference=1) == [(1, 0), (1, 2)]
    with pytest.raises(ValueError, match="points"):
        linear_mode_connectivity(folders, evaluator, points=2, progress=False)
    with pytest.raises(ValueError, match="index 5"):
        linear_mode_connectivity(folders, evaluator, pairs=[(0, 5)], progress=False)
    with pytest.raises(ValueError, match="'reference'"):
        linear_mode_connectivity(folders, evaluator, pairs="each", progress=False)
    with pytest.raises(ValueError, match="no metric 'loss'"):
        linear_mode_connectivity(folders, evaluator, points=3, loss="loss", progress=False)


# -- command line ----------------------------------------------------------------------------


def test_cli_diagnose_prints_verdicts_and_writes_report(trained, held_out, tmp_path, capsys):
    held_out.save_to_disk(str(tmp_path / "held_out"))
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(yaml.safe_dump({"held_out": {"dataset": "held_out", "metric": "accuracy"}}))
    sources = [str(trained[name]) for name in ("ft1", "ft2", "other")]
    out = tmp_path / "diagnostics"
    argv = ["-q", "diagnose", *sources, "--recipe", str(recipe), "--points", "3"]

    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Verdicts" in printed and "[2] FAIL different pre-trained start" in printed
    assert "[0] OK" in printed and "Interpolation barriers (accuracy, 3 points)" in printed
    report = json.loads((out / "diagnostics.json").read_text())
    assert [v["status"] for v in report["verdicts"]] == ["ok", "ok", "fail"]
    assert report["plots"] == [WEIGHTS_PLOT, PATHS_PLOT]
    assert all((out / name).is_file() for name in report["plots"])
    assert "vit.encoder.layer.0.attention.attention.query.weight" in report["weights"]["tensors"]

    # An existing report is refused before anything is measured.
    assert main([*argv, "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("eval_sets: {}\n")
    with pytest.raises(RecipeError, match="held_out"):
        main(["--debug", "diagnose", *sources, "--recipe", str(bad)])
