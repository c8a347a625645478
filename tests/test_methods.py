"""Merge methods against float64 references written here from the papers' equations.

The checkpoints are tiny ViTs saved with ``save_pretrained``: a base and fine-tunes made of the
base plus small random deltas. Weights and deltas lie on a dyadic grid (multiples of 2^-12,
below 2 in magnitude), so float32 holds every weight and every task vector exactly; that makes
the discrete steps (TIES' trim thresholds, with their many ties, and sign elections) identical in
float32 and float64, and the remaining differences are last-digit rounding.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import ViTConfig, ViTForImageClassification

from hf_soups.errors import (
    IncompatibleIngredientsError,
    InvalidWeightsError,
    MissingBaseError,
)
from hf_soups.ingredients import Ingredient
from hf_soups.merge import merge
from hf_soups.methods import (
    DARETIES,
    METHODS,
    TIES,
    DARELinear,
    FisherAverage,
    ModelStock,
    TaskArithmetic,
    compute_fisher,
    get_method,
)

GRID = 2.0**-12


def _config() -> ViTConfig:
    return ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
    )


def _save(state: dict[str, torch.Tensor], folder: Path) -> Path:
    model = ViTForImageClassification(_config())
    model.load_state_dict(state)
    model.save_pretrained(folder)
    return folder


def _on_grid(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor / GRID).round() * GRID


@pytest.fixture(scope="module")
def base_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = ViTForImageClassification(_config())
    # Random LayerNorm parameters, so that no tensor starts as all ones or all zeros.
    return {k: _on_grid(v + 0.05 * torch.randn_like(v)) for k, v in model.state_dict().items()}


def _fine_tune(base_state, seed: int) -> dict[str, torch.Tensor]:
    # A direction shared by all fine-tunes (as the pull of one task) plus each run's own noise,
    # in whole multiples of GRID.
    shared = torch.Generator().manual_seed(1000)
    own = torch.Generator().manual_seed(seed)
    return {
        k: v
        + (torch.randn(v.shape, generator=shared) * 6 + torch.randn(v.shape, generator=own) * 6)
        .round()
        .mul(GRID)
        for k, v in base_state.items()
    }


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, base_state):
    """Base folder and three fine-tuned folders; in the third, the classifier is untouched."""
    root = tmp_path_factory.mktemp("ckpt")
    base = _save(base_state, root / "base")
    tunes = []
    for seed in (1, 2, 3):
        state = _fine_tune(base_state, seed)
        if seed == 3:
            state["classifier.bias"] = base_state["classifier.bias"].clone()
        tunes.append(_save(state, root / f"ft{seed}"))
    return base, tunes


def _read(folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(file))
    return state


def _float64(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in _read(folder).items()}


def _assert_matches(out: Path, reference: dict[str, torch.Tensor]) -> None:
    merged = _read(out)
    assert merged.keys() == reference.keys()
    for name, expected in reference.items():
        assert merged[name].dtype == torch.float32, name
        torch.testing.assert_close(
            merged[name].double(), expected, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )


def _run(method, tunes, base, out, **kwargs) -> Path:
    return merge(tunes, out, method=method, base=base, progress=False, **kwargs)


# ---------------------------------------------------------------- references (paper equations)


def ref_task_arithmetic(thetas, theta0, lambdas):
    return theta0 + sum(lam * (theta - theta0) for lam, theta in zip(lambdas, thetas))


def ref_trim(tau, density):
    """Keep the int(density * n) largest magnitudes (at least one), and every entry tied with
    the last kept."""
    keep = max(1, int(density * tau.numel()))
    threshold = tau.abs().flatten().sort(descending=True).values[keep - 1]
    return torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau))


def ref_disjoint_merge(taus):
    stacked = torch.stack(taus)
    elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0).double()  # zero sum elects +
    agree = torch.sign(stacked) == elected
    count = agree.sum(0)
    total = (stacked * agree).sum(0)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def ref_ties(thetas, theta0, density, lam):
    return theta0 + lam * ref_disjoint_merge([ref_trim(t - theta0, density) for t in thetas])


def ref_dare_keep(seed, name, index, shape, p):
    """The mask protocol documented in hf_soups.methods.dare."""
    entropy = [seed, zlib.crc32(name.encode("utf-8")), index]
    state = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]
    generator = torch.Generator().manual_seed(int(state))
    return torch.rand(shape, generator=generator) >= p


def ref_dare(thetas, theta0, name, p, seed):
    return [
        (t - theta0) * ref_dare_keep(seed, name, i, t.shape, p) / (1 - p)
        for i, t in enumerate(thetas)
    ]


def ref_model_stock(thetas, theta0):
    k = len(thetas)
    taus = [(t - theta0).flatten() for t in thetas]
    cosines = []
    for a, b in itertools.combinations(taus, 2):
        norms = a.norm() * b.norm()
        cosines.append(float(a @ b / norms) if norms > 0 else 0.0)
    cos = sum(cosines) / len(cosines)
    t = k * cos / (1 + (k - 1) * cos)
    return t * sum(thetas) / k + (1 - t) * theta0, t


def _reference(checkpoints, fn):
    base, tunes = checkpoints
    theta0 = _float64(base)
    thetas = [_float64(t) for t in tunes]
    return {name: fn(name, [t[name] for t in thetas], theta0[name]) for name in theta0}


# ---------------------------------------------------------------- task arithmetic


def test_task_arithmetic_matches_reference(checkpoints, tmp_path):
    base, tunes = checkpoints
    lambdas = [0.5, -1.0, 0.25]  # -1: negating a task
    out = _run(TaskArithmetic(scaling=lambdas), tunes, base, tmp_path / "out")
    _assert_matches(
        out, _reference(checkpoints, lambda n, ts, t0: ref_task_arithmetic(ts, t0, lambdas))
    )
    recipe = json.loads((out / "soup.json").read_text())
    assert recipe["method"] == "task_arithmetic"
    assert recipe["parameters"] == {"scaling": lambdas}
    assert "Task Arithmetic" in recipe["citation"]


def test_outputs_load_with_from_pretrained(checkpoints, tmp_path):
    base, tunes = checkpoints
    images = torch.randn(2, 1, 8, 8)
    for method in (TaskArithmetic(0.3), TIES(0.5), DARETIES(0.5), ModelStock()):
        out = _run(method, tunes, base, tmp_path / method.name)
        model = ViTForImageClassification.from_pretrained(out)
        assert model(pixel_values=images).logits.shape == (2, 3)
        assert model.classifier.weight.equal(_read(out)["classifier.weight"])


# ---------------------------------------------------------------- TIES


@pytest.mark.parametrize("density", [0.3, 1.0])
def test_ties_matches_reference(checkpoints, tmp_path, density):
    base, tunes = checkpoints
    out = _run(TIES(density=density, scaling=0.8), tunes, base, tmp_path / "out")
    _assert_matches(out, _reference(checkpoints, lambda n, ts, t0: ref_ties(ts, t0, density, 0.8)))


def test_ties_keeps_the_largest_entry_of_a_tensor_density_would_empty():
    # 3 entries at density 0.2: int(0.6) = 0 would trim both task vectors to nothing and leave
    # the base. By hand: tau_1 keeps its largest |.|, -0.5 (entry 1); tau_2 its -0.375
    # (entry 2). Summed: (0, -0.5, -0.375), so - is elected on entries 1 and 2 and the zero
    # sum of entry 0 elects +, where no kept value agrees. Disjoint means: (0, -0.5, -0.375).
    base = torch.tensor([1.0, 2.0, 3.0])
    taus = [torch.tensor([0.125, -0.5, 0.25]), torch.tensor([0.25, 0.0625, -0.375])]
    out = TIES(density=0.2, scaling=0.5).merge_tensor(
        "head.bias", [lambda t=t: base + t for t in taus], lambda: base.clone()
    )
    assert out.tolist() == [1.0, 2.0 - 0.5 * 0.5, 3.0 - 0.5 * 0.375]


def test_ties_equal_signs_is_mean_of_trimmed_deltas(base_state, tmp_path):
    # Every fine-tune moves each weight the same way: nothing is disjoint, and with density 1
    # TIES is the base plus lambda times the mean task vector.
    generator = torch.Generator().manual_seed(7)
    signs = {
        k: torch.where(torch.rand(v.shape, generator=generator) < 0.5, -1.0, 1.0)
        for k, v in base_state.items()
    }
    tunes = []
    for i in range(3):
        tunes.append(
            _save(
                {
                    k: v
                    + signs[k] * (torch.rand(v.shape, generator=generator) * 8 + 1).round() * GRID
                    for k, v in base_state.items()
                },
                tmp_path / f"ft{i}",
            )
        )
    base = _save(base_state, tmp_path / "base")
    out = _run(TIES(density=1.0, scaling=1.0), tunes, base, tmp_path / "out")
    reference = _reference((base, tunes), lambda n, ts, t0: t0 + sum(t - t0 for t in ts) / len(ts))
    _assert_matches(out, reference)


def test_ties_zero_sum_elects_positive(base_state, tmp_path):
    # tau_2 = -tau_1: the summed mass is 0 everywhere, the documented tie rule elects +, so each
    # entry takes the positive one of the two values.
    tau = {k: (torch.randn(v.shape) * 8).round() * GRID for k, v in base_state.items()}
    base = _save(base_state, tmp_path / "base")
    plus = _save({k: v + tau[k] for k, v in base_state.items()}, tmp_path / "plus")
    minus = _save({k: v - tau[k] for k, v in base_state.items()}, tmp_path / "minus")
    out = _run(TIES(density=1.0), [plus, minus], base, tmp_path / "out")
    on_disk_tau = {k: _float64(plus)[k] - v for k, v in _float64(base).items()}
    _assert_matches(out, {k: v + on_disk_tau[k].abs() for k, v in _float64(base).items()})


def test_task_arithmetic_warns_once_when_the_scalings_extrapolate(checkpoints, tmp_path, caplog):
    base, tunes = checkpoints
    with caplog.at_level(logging.WARNING, logger="hf_soups"):
        _run(TaskArithmetic(), tunes, base, tmp_path / "default")
    # One warning for the whole merge (not one per tensor), naming the sum and the average.
    warnings = [r.getMessage() for r in caplog.records if "extrapolates" in r.getMessage()]
    assert len(warnings) == 1
    assert "3 task vectors sum to 3" in warnings[0] and "0.333333 each" in warnings[0]
    caplog.clear()
    method = TaskArithmetic([0.7, 0.6])
    with caplog.at_level(logging.WARNING, logger="hf_soups"):
        method.check(2)
        method.check(2)
    assert [r.getMessage() for r in caplog.records if "sum to 1.3" in r.getMessage()] != []
    assert len(caplog.records) == 1
    caplog.clear()
    # Averaging (1/N each), negating a task, or one task vector at 1: no extrapolation.
    with caplog.at_level(logging.WARNING, logger="hf_soups"):
        for scaling, count in ((1 / 3, 3), ([1.0, -1.0], 2), (1.0, 1), ([0.5, 0.5], 2)):
            TaskArithmetic(scaling).check(count)
    assert caplog.records == []


def test_dare_linear_warns_once_when_the_scalings_extrapolate(checkpoints, tmp_path, caplog):
    base, tunes = checkpoints
    with caplog.at_level(logging.WARNING, logger="hf_soups"):
        _run(DARELinear(drop_rate=0.5, seed=0), tunes, base, tmp_path / "default")
    warnings = [r.getMessage() for r in caplog.records if "extrapolates" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("dare_linear: the scalings of the 3")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_soups"):
        DARELinear(scaling=1 / 3).check(3)
    assert caplog.records == []


# ---------------------------------------------------------------- DARE


def test_dare_linear_matches_reference(checkpoints, tmp_path):
    base, tunes = checkpoints
    lambdas = [1.0, 0.5, -0.5]
    out = _run(DARELinear(drop_rate=0.3, scaling=lambdas, seed=11), tunes, base, tmp_path / "out")

    def reference(name, thetas, theta0):
        taus = ref_dare(thetas, theta0, name, 0.3, 11)
        return theta0 + sum(lam * tau for lam, tau in zip(lambdas, taus))

    _assert_matches(out, _reference(checkpoints, reference))


def test_dare_ties_matches_reference(checkpoints, tmp_path):
    base, tunes = checkpoints
    out = _run(DARETIES(drop_rate=0.5, scaling=0.7, seed=3), tunes, base, tmp_path / "out")

    def reference(name, thetas, theta0):
        return theta0 + 0.7 * ref_disjoint_merge(ref_dare(thetas, theta0, name, 0.5, 3))

    _assert_matches(out, _reference(checkpoints, reference))


def test_dare_is_reproducible_and_independent_of_tensor_order(checkpoints, tmp_path):
    base, tunes = checkpoints
    first = _read(_run(DARETIES(0.5, seed=5), tunes, base, tmp_path / "a"))
    # Other sharding, hence other files and another order of work: same tensors.
    again = _read(_run(DARETIES(0.5, seed=5), tunes, base, tmp_path / "b", max_shard_size=4000))
    assert first.keys() == again.keys()
    assert all(first[k].equal(again[k]) for k in first)
    other_seed = _read(_run(DARETIES(0.5, seed=6), tunes, base, tmp_path / "c"))
    assert any(not first[k].equal(other_seed[k]) for k in first)

    method = DARELinear(0.5, seed=5)
    ingredients = [Ingredient.from_folder(t) for t in tunes]
    base_ingredient = Ingredient.from_folder(base)
    names = sorted(base_ingredient.tensors)

    def merged(name):
        loaders = [lambda i=i: i.read(name).float() for i in ingredients]
        return method.merge_tensor(name, loaders, lambda: base_ingredient.read(name).float())

    forward = {n: merged(n) for n in names}
    backward = {n: merged(n) for n in reversed(names)}
    assert all(forward[n].equal(backward[n]) for n in names)


def test_dare_drops_at_rate_and_rescales_survivors():
    # Checked from the output alone, without the mask protocol: every entry of the merged delta
    # is 0 or tau / (1 - p), about a fraction p is 0, and two identical ingredients (or two
    # tensor names) get different masks.
    tau = torch.rand(200_000) + 0.5
    p = 0.25
    out = DARELinear(drop_rate=p, scaling=[1.0], seed=0).merge_tensor(
        "w", [lambda: tau.clone()], lambda: torch.zeros_like(tau)
    )
    kept = out != 0
    assert math.isclose(1 - kept.float().mean().item(), p, abs_tol=0.005)
    torch.testing.assert_close(out[kept], tau[kept] / (1 - p))
    two = DARELinear(drop_rate=p, scaling=[1.0, 1.0], seed=0).merge_tensor(
        "w", [lambda: tau.clone()] * 2, lambda: torch.zeros_like(tau)
    )
    # Independent masks: the three levels 0, 1 and 2 survivors appear at (p^2, 2p(1-p), (1-p)^2).
    levels = (two / (tau / (1 - p))).round()
    for level, share in ((0, p * p), (1, 2 * p * (1 - p)), (2, (1 - p) ** 2)):
        assert math.isclose((levels == level).float().mean().item(), share, abs_tol=0.005)
    renamed = DARELinear(drop_rate=p, scaling=[1.0], seed=0).merge_tensor(
        "v", [lambda: tau.clone()], lambda: torch.zeros_like(tau)
    )
    assert not renamed.equal(out)


def test_dare_without_drops_is_task_arithmetic(checkpoints, tmp_path):
    base, tunes = checkpoints
    lambdas = [0.4, 0.3, -0.2]
    dare = _read(_run(DARELinear(drop_rate=0.0, scaling=lambdas), tunes, base, tmp_path / "d"))
    plain = _read(_run(TaskArithmetic(scaling=lambdas), tunes, base, tmp_path / "t"))
    assert all(dare[k].equal(plain[k]) for k in plain)


# ---------------------------------------------------------------- Model Stock


@pytest.mark.parametrize("k", [2, 3])
def test_model_stock_matches_reference(checkpoints, tmp_path, k):
    base, tunes = checkpoints
    method = ModelStock()
    out = _run(method, tunes[:k], base, tmp_path / "out")
    ratios = {}

    def reference(name, thetas, theta0):
        merged, ratios[name] = ref_model_stock(thetas, theta0)
        return merged

    _assert_matches(out, _reference((base, tunes[:k]), reference))
    assert method.ratios.keys() == ratios.keys()
    for name, t in ratios.items():
        assert math.isclose(method.ratios[name], t, rel_tol=1e-5, abs_tol=1e-6), name
    # Deltas sharing a direction: positive cosines, so t is strictly between 0 and 1.
    assert all(0 < t < 1 for name, t in ratios.items() if name != "classifier.bias" or k == 2)


def test_model_stock_cancelling_deltas_keep_the_base(caplog):
    tau = torch.randn(50)
    base = torch.randn(50)
    method = ModelStock()
    out = method.merge_tensor("w", [lambda: base + tau, lambda: base - tau], lambda: base.clone())
    assert out.equal(base)
    assert method.ratios["w"] == 0.0
    assert "cancel out" in caplog.text


# ---------------------------------------------------------------- shared edge cases


@pytest.mark.parametrize(
    "method",
    [TaskArithmetic([1.0, 1.0]), TIES(0.3), DARELinear(0.5), DARETIES(0.5), ModelStock()],
    ids=lambda m: m.name,
)
def test_zero_task_vectors_give_the_base(base_state, tmp_path, method):
    base = _save(base_state, tmp_path / "base")
    same = [_save(base_state, tmp_path / f"same{i}") for i in range(2)]
    out = _run(method, same, base, tmp_path / "out")
    expected = _read(base)
    merged = _read(out)
    assert all(merged[k].equal(expected[k]) for k in expected)


@pytest.mark.parametrize(
    "name", ["task_arithmetic", "ties", "dare_linear", "dare_ties", "model_stock"]
)
def test_missing_base_is_refused(checkpoints, tmp_path, name):
    _, tunes = checkpoints
    with pytest.raises(MissingBaseError, match=name):
        merge(tunes, tmp_path / "out", method=get_method(name), progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("build", "argument"),
    [
        (lambda: TIES(density=0.0), "density"),
        (lambda: TIES(density=1.5), "density"),
        (lambda: TIES(scaling=[1.0, 2.0]), "scaling"),
        (lambda: DARELinear(drop_rate=1.0), "drop_rate"),
        (lambda: DARETIES(drop_rate=-0.1), "drop_rate"),
        (lambda: DARELinear(seed=-1), "seed"),
        (lambda: TaskArithmetic(scaling=float("nan")), "scaling"),
        (lambda: TaskArithmetic(scaling=[]), "scaling"),
    ],
)
def test_invalid_parameters_name_the_argument(build, argument):
    with pytest.raises(InvalidWeightsError, match=argument):
        build()


def test_parameters_that_do_not_fit_the_ingredients(checkpoints, tmp_path):
    base, tunes = checkpoints
    with pytest.raises(InvalidWeightsError, match="scaling: got 2 coefficients for 3"):
        _run(TaskArithmetic([1.0, 1.0]), tunes, base, tmp_path / "a")
    with pytest.raises(InvalidWeightsError, match="at least 2"):
        _run(ModelStock(), tunes[:1], base, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_registry_builds_methods_by_name():
    assert set(METHODS) >= {
        "task_arithmetic",
        "ties",
        "dare_linear",
        "dare_ties",
        "model_stock",
        "fisher",
    }
    method = get_method("dare_ties", drop_rate=0.2, seed=4)
    assert isinstance(method, DARETIES)
    assert method.parameters() == {
        "drop_rate": 0.2,
        "scaling": 1.0,
        "seed": 4,
        "sign_election": "total",
    }
    with pytest.raises(ValueError, match="unknown merge method 'slerp'"):
        get_method("slerp")
    with pytest.raises(ValueError, match="density"):
        get_method("ties", dropout=0.1)
    for method_class in METHODS.values():
        if method_class.name != "weighted_average":
            assert method_class.citation and "year" in method_class.citation


# ---------------------------------------------------------------- Fisher


def _fisher_folder(folder: Path, like: Path, generator: torch.Generator) -> Path:
    # Positive values spanning decades, with a few zeros so that the floor matters.
    fisher = {}
    for name, tensor in _read(like).items():
        values = torch.exp(torch.randn(tensor.shape, generator=generator) * 3) * 1e-4
        values[torch.rand(tensor.shape, generator=generator) < 0.1] = 0.0
        fisher[name] = values
    folder.mkdir()
    save_file(fisher, folder / "model.safetensors")
    return folder


def test_fisher_average_matches_reference(checkpoints, tmp_path):
    base, tunes = checkpoints
    generator = torch.Generator().manual_seed(0)
    fisher_dirs = [_fisher_folder(tmp_path / f"f{i}", t, generator) for i, t in enumerate(tunes)]
    weights = [0.5, 0.3, 0.2]
    epsilon = 1e-5
    out = merge(
        tunes, tmp_path / "out", method=FisherAverage(fisher_dirs, epsilon, weights), progress=False
    )
    fishers = [_float64(f) for f in fisher_dirs]
    thetas = [_float64(t) for t in tunes]
    reference = {}
    for name in thetas[0]:
        floored = [f[name].clamp(min=epsilon) for f in fishers]
        numerator = sum(w * f * t[name] for w, f, t in zip(weights, floored, thetas))
        reference[name] = numerator / sum(w * f for w, f in zip(weights, floored))
    _assert_matches(out, reference)
    recipe = json.loads((out / "soup.json").read_text())
    assert recipe["parameters"]["epsilon"] == epsilon
    assert [f["path"] for f in recipe["parameters"]["fishers"]] == [str(f) for f in fisher_dirs]


def test_fisher_average_errors(checkpoints, tmp_path):
    base, tunes = checkpoints
    generator = torch.Generator().manual_seed(0)
    fisher_dirs = [_fisher_folder(tmp_path / f"f{i}", t, generator) for i, t in enumerate(tunes)]
    with pytest.raises(InvalidWeightsError, match="fisher_dirs: got 2 Fisher folders for 3"):
        merge(tunes, tmp_path / "a", method=FisherAverage(fisher_dirs[:2]), progress=False)
    with pytest.raises(InvalidWeightsError, match="epsilon"):
        FisherAverage(fisher_dirs, epsilon=0.0)
    with pytest.raises(InvalidWeightsError, match="weights"):
        merge(
            tunes,
            tmp_path / "b",
            method=FisherAverage(fisher_dirs, weights=[1, -1, 1]),
            progress=False,
        )
    partial = tmp_path / "partial"
    partial.mkdir()
    state = load_file(fisher_dirs[0] / "model.safetensors")
    state.pop("classifier.bias")
    save_file(state, partial / "model.safetensors")
    with pytest.raises(IncompatibleIngredientsError, match="classifier.bias"):
        merge(
            tunes, tmp_path / "c", method=FisherAverage([partial, *fisher_dirs[1:]]), progress=False
        )
    assert not any((tmp_path / name).exists() for name in "abc")


@pytest.fixture(scope="module")
def fisher_data():
    import datasets

    generator = torch.Generator().manual_seed(0)
    return datasets.Dataset.from_dict(
        {
            "pixel_values": torch.randn(7, 1, 8, 8, generator=generator).tolist(),
            "labels": [0, 1, 2, 0, 1, 2, 0],
        }
    )


def _gauss_newton_fisher(folder: Path, dataset, num_examples: int, empirical: bool):
    """E_x[J^T (diag p - p p^T) J] (expected) or E_x[(J^T (e_y - p))^2] (empirical), in float64,
    J the Jacobian of the logits: the Fisher through another route than log-prob gradients."""
    from torch.func import functional_call

    model = ViTForImageClassification.from_pretrained(folder).double().eval()
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for _, p in model.named_parameters()]
    total = [torch.zeros_like(p) for p in params]
    for row in range(num_examples):
        x = torch.tensor(dataset[row]["pixel_values"], dtype=torch.float64).unsqueeze(0)

        def logits(*values, x=x):
            return functional_call(model, dict(zip(names, values)), (x,)).logits[0]

        jacobians = torch.autograd.functional.jacobian(logits, tuple(params))
        p = torch.softmax(logits(*params), -1)
        for acc, jac in zip(total, jacobians):
            flat = jac.reshape(len(p), -1)
            if empirical:
                residual = (
                    torch.nn.functional.one_hot(torch.tensor(dataset[row]["labels"]), len(p)) - p
                )
                acc += ((residual @ flat) ** 2).reshape(acc.shape)
            else:
                middle = torch.diag(p) - torch.outer(p, p)
                acc += ((middle @ flat) * flat).sum(0).reshape(acc.shape)
    return {n: t / num_examples for n, t in zip(names, total)}


@pytest.mark.parametrize("fisher_type", ["expected", "empirical"])
def test_compute_fisher_matches_gauss_newton_reference(
    checkpoints, fisher_data, tmp_path, fisher_type
):
    _, tunes = checkpoints
    out = compute_fisher(
        tunes[0],
        fisher_data,
        tmp_path / "fisher",
        num_examples=4,
        batch_size=3,
        fisher_type=fisher_type,
        progress=False,
    )
    assert json.loads((out / "fisher.json").read_text())["num_examples"] == 4
    # Keyed as the model's weights on disk, so the engine can read it beside them.
    assert (
        Ingredient.from_folder(out).tensors.keys()
        == Ingredient.from_folder(tunes[0]).tensors.keys()
    )
    computed = dict(ViTForImageClassification.from_pretrained(out).named_parameters())
    reference = _gauss_newton_fisher(tunes[0], fisher_data, 4, empirical=fisher_type == "empirical")
    # Some entries are zero in exact arithmetic (key biases: softmax ignores a shift), so the
    # absolute tolerance is relative to the largest Fisher value of the model.
    scale = max(expected.abs().max().item() for expected in reference.values())
    for name, expected in reference.items():
        torch.testing.assert_close(
            computed[name].detach().double(),
            expected,
            rtol=1e-3,
            atol=1e-6 * scale,
            msg=lambda m, n=name: f"{n}: {m}",
        )
    assert reference["classifier.weight"].abs().max() > 0


def test_sampled_fisher_is_seeded(checkpoints, fisher_data, tmp_path):
    _, tunes = checkpoints
    runs = [
        _read(
            compute_fisher(
                tunes[0],
                fisher_data,
                tmp_path / f"s{i}",
                fisher_type="sampled",
                seed=seed,
                progress=False,
            )
        )
        for i, seed in enumerate((1, 1, 2))
    ]
    assert all(runs[0][k].equal(runs[1][k]) for k in runs[0])
    assert any(not runs[0][k].equal(runs[2][k]) for k in runs[0])
    with pytest.raises(ValueError, match="num_examples"):
        compute_fisher(tunes[0], fisher_data, tmp_path / "x", num_examples=100, progress=False)
