"""The streamed learned soup against the official algorithm written out with autograd.

References differentiate the loss through ``torch.func.functional_call`` over the stacked
ingredients, as mlfoundations/model-soups' ``learned_bylayer.py`` does, on models loaded by
transformers itself; the fits under test stream the ingredients from their files.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from launch import ACCELERATE_CONFIG, ACCELERATE_LAUNCH, free_port
from tiny import make_clip_folder, make_vit_folder
from torch.func import functional_call
from transformers import AutoTokenizer, CLIPModel, ViTForImageClassification

from hf_soups.ingredients import Ingredient
from hf_soups.learned import (
    MixedModel,
    MixingCoefficients,
    choose_memory,
    fit_mixing_coefficients,
)
from hf_soups.learned import placement as placement_module
from hf_soups.models import CLIPZeroShotClassifier, save_model
from hf_soups.soup import SoupBuilder

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location(
    "distributed_learned", HERE / "distributed_learned.py"
)
distributed_learned = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(distributed_learned)

F64 = torch.float64
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Four fine-tunes of one tiny ViT: the start plus independent perturbations."""
    root = tmp_path_factory.mktemp("learned")
    start = make_vit_folder(root / "start", seed=0)
    generator = torch.Generator().manual_seed(1)
    result = []
    for index in range(4):
        model = ViTForImageClassification.from_pretrained(start)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
        model.save_pretrained(root / f"ft{index}")
        result.append(root / f"ft{index}")
    return result


@pytest.fixture(scope="module")
def data():
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(21, 3, 16, 16, generator=generator)
    return datasets.Dataset.from_dict({"pixel_values": images.numpy(), "labels": np.arange(21) % 3})


def batch(data, indices=None):
    rows = data.with_format("torch")[indices if indices is not None else list(range(len(data)))]
    return rows["pixel_values"].to(F64), rows["labels"]


class Official:
    """The official learned soup on plain torch: stacked float64 ingredients, functional_call."""

    def __init__(self, folders):
        models = [ViTForImageClassification.from_pretrained(f).to(F64).eval() for f in folders]
        self.template = models[0]
        self.names = [name for name, _ in self.template.named_parameters()]
        self.stacked = {
            name: torch.stack([dict(m.named_parameters())[name].detach() for m in models])
            for name in self.names
        }

    def loss(self, alpha, scale, inputs, labels, by_layer):
        params = {
            name: torch.tensordot(alpha[j if by_layer else 0], self.stacked[name], dims=1)
            for j, name in enumerate(self.names)
        }
        logits = functional_call(self.template, params, kwargs={"pixel_values": inputs}).logits
        return F.cross_entropy(scale * logits, labels)

    def fit(self, data, *, by_layer, epochs, batch_size, seed, kind="simplex", block=None):
        """AdamW (lr 0.05) over per-ingredient columns; a block step gives gradients to the
        block's columns only (the others keep their Adam state); hyperplane weights are
        projected back onto sum one after each step."""
        n, rows = len(self.stacked[self.names[0]]), len(self.names) if by_layer else 1
        start = 0.0 if kind == "simplex" else 1.0 / n
        columns = [torch.full((rows,), start, dtype=F64, requires_grad=True) for _ in range(n)]
        scale = torch.ones((), dtype=F64, requires_grad=True)
        optimizer = torch.optim.AdamW([*columns, scale], lr=0.05, weight_decay=0.0)
        order = torch.Generator().manual_seed(seed)
        blocks = torch.Generator().manual_seed(seed + 1)

        def weights():
            stacked = torch.stack(columns, dim=1)
            return torch.softmax(stacked, dim=1) if kind == "simplex" else stacked

        for _ in range(epochs):
            permutation = torch.randperm(len(data), generator=order).tolist()
            for begin in range(0, len(data), batch_size):
                chosen = (
                    list(range(n))
                    if block is None
                    else sorted(torch.randperm(n, generator=blocks)[:block].tolist())
                )
                inputs, labels = batch(data, permutation[begin : begin + batch_size])
                loss = self.loss(weights(), scale, inputs, labels, by_layer)
                grads = torch.autograd.grad(loss, [*(columns[m] for m in chosen), scale])
                optimizer.zero_grad(set_to_none=True)
                if kind == "hyperplane":  # the gradient within the hyperplane
                    mean = sum(grads[:-1]) / len(chosen)
                    grads = [*(grad - mean for grad in grads[:-1]), grads[-1]]
                for m, grad in zip([*chosen, None], grads):
                    (columns[m] if m is not None else scale).grad = grad
                before = sum(columns[m].detach() for m in chosen)
                optimizer.step()
                if kind == "hyperplane":
                    with torch.no_grad():
                        shift = (before - sum(columns[m] for m in chosen)) / len(chosen)
                        for m in chosen:
                            columns[m].add_(shift)
        alpha = weights().detach()
        return {name: alpha[j if by_layer else 0] for j, name in enumerate(self.names)}


def ingredients_of(folders):
    return [Ingredient.from_folder(f) for f in folders]


def mixed_model(folders, data, by_layer, memory="stream"):
    return MixedModel(
        ingredients_of(folders),
        by_layer=by_layer,
        memory=memory,
        device=CPU,
        dtype=F64,
        probe=batch(data, [0])[0],
    )


@pytest.mark.parametrize("by_layer", [False, True])
def test_streamed_gradient_equals_autograd(folders, data, by_layer, one_thread):
    mixed = mixed_model(folders, data, by_layer)
    official = Official(folders)
    assert set(mixed.rows) == set(official.names)
    rows = mixed.num_rows
    raw = torch.randn(rows, 4, generator=torch.Generator().manual_seed(3), dtype=F64)
    coefs = MixingCoefficients(rows, 4, "simplex", lr=0.05, device=CPU, dtype=F64)
    with torch.no_grad():
        for m, column in enumerate(coefs.columns):
            column.copy_(raw[:, m])
    mixed.mix(coefs.weights())
    inputs, labels = batch(data)
    scale = torch.tensor(1.7, dtype=F64)
    block = [0, 2, 3]
    got = mixed.gradients(inputs, labels, scale, block)

    # reference: autograd through softmax and functional_call over the stacked tensors
    raw_ref = raw.clone().requires_grad_(True)
    alpha_ref = torch.softmax(raw_ref, dim=1)
    alpha_ref.retain_grad()
    scale_ref = scale.clone().requires_grad_(True)
    order = [mixed.rows[name] for name in official.names]  # the fit's row of each tensor
    loss = official.loss(
        alpha_ref[order] if by_layer else alpha_ref, scale_ref, inputs, labels, by_layer
    )
    loss.backward()
    count = got.count
    torch.testing.assert_close(got.loss / count, loss.detach(), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(got.weights / count, alpha_ref.grad[:, block], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got.logit_scale / count, scale_ref.grad, atol=1e-6, rtol=1e-6)
    # the chain rule through the softmax, for the block's logits only
    raw_grad = coefs.parameter_gradients(got.weights / count, got.mixed / count, block)
    torch.testing.assert_close(raw_grad, raw_ref.grad[:, block], atol=1e-6, rtol=1e-6)
    assert raw_grad.abs().max() > 1e-4  # not a vacuous comparison


@pytest.mark.parametrize("memory", ["stream", "host", "device"])
@pytest.mark.parametrize("by_layer", [False, True])
def test_fit_equals_the_official_loop(folders, data, by_layer, memory, one_thread):
    fit = fit_mixing_coefficients(
        ingredients_of(folders[:3]),
        data,
        by_layer=by_layer,
        epochs=2,
        batch_size=8,
        seed=5,
        memory=memory,
        dtype=F64,
        device="cpu",
        progress=False,
    )
    reference = Official(folders[:3]).fit(data, by_layer=by_layer, epochs=2, batch_size=8, seed=5)
    assert fit.options["memory"] == memory
    if by_layer:
        assert set(fit.tensor_weights) == set(reference)
        for name, row in reference.items():
            np.testing.assert_allclose(fit.tensor_weights[name], row.numpy(), atol=1e-6)
    else:
        np.testing.assert_allclose(fit.model_weights, reference[next(iter(reference))], atol=1e-6)
    assert max(abs(w - 1 / 3) for w in fit.model_weights) > 1e-3  # the fit moved


def test_hyperplane_fit_equals_projected_adam(folders, data, one_thread):
    fit = fit_mixing_coefficients(
        ingredients_of(folders[:3]),
        data,
        by_layer=True,
        epochs=2,
        batch_size=8,
        coefficients="hyperplane",
        dtype=F64,
        device="cpu",
        progress=False,
    )
    reference = Official(folders[:3]).fit(
        data, by_layer=True, epochs=2, batch_size=8, seed=0, kind="hyperplane"
    )
    for name, row in reference.items():
        np.testing.assert_allclose(fit.tensor_weights[name], row.numpy(), atol=1e-6)
        assert sum(fit.tensor_weights[name]) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("kind", ["simplex", "hyperplane"])
def test_block_steps_read_k_ingredients_and_match_the_reference(
    folders, data, kind, monkeypatch, one_thread
):
    reads = []
    real_read = Ingredient.read
    monkeypatch.setattr(
        Ingredient,
        "read",
        lambda self, name, out=None: reads.append(name) or real_read(self, name, out),
    )
    fit = fit_mixing_coefficients(
        ingredients_of(folders),
        data,
        epochs=1,
        batch_size=4,
        seed=7,
        block_size=2,
        coefficients=kind,
        memory="stream",
        dtype=F64,
        device="cpu",
        progress=False,
    )
    monkeypatch.undo()
    reference = Official(folders).fit(
        data, by_layer=False, epochs=1, batch_size=4, seed=7, kind=kind, block=2
    )
    np.testing.assert_allclose(fit.model_weights, reference[next(iter(reference))], atol=1e-6)
    mixed_tensors = len(Official(folders).names)
    steps = 6  # ceil(21 / 4)
    # the first mix reads all 4 ingredients; each step 2 (gradients) + 2 (mix update)
    assert len(reads) == mixed_tensors * (4 + steps * (2 + 2))


def test_full_steps_read_each_ingredient_twice(folders, data, monkeypatch, one_thread):
    reads = []
    real_read = Ingredient.read
    monkeypatch.setattr(
        Ingredient,
        "read",
        lambda self, name, out=None: reads.append(name) or real_read(self, name, out),
    )
    fit_mixing_coefficients(
        ingredients_of(folders[:2]), data, epochs=1, batch_size=11, memory="stream", progress=False
    )
    monkeypatch.undo()
    mixed_tensors = len(Official(folders[:2]).names)
    assert len(reads) == mixed_tensors * (2 + 2 * (2 + 2))


def test_auto_memory_follows_the_sizes(monkeypatch):
    class Available:
        available = 1000

    monkeypatch.setattr(placement_module.psutil, "virtual_memory", lambda: Available)
    assert choose_memory("auto", 500, 10, CPU) == "host"
    assert choose_memory("auto", 501, 10, CPU) == "stream"
    assert choose_memory("stream", 1, 1, CPU) == "stream"
    assert choose_memory("device", 10**12, 1, CPU) == "device"


def test_options_are_recorded_and_checked(folders, data, one_thread):
    builder = SoupBuilder.from_pretrained([str(f) for f in folders[:3]])
    soup = builder.learned(
        data,
        epochs=1,
        batch_size=8,
        coefficients="hyperplane",
        block_size=2,
        seed=3,
        memory="stream",
        progress=False,
    )
    options = soup.record.coefficients["options"]
    assert options["coefficients"] == "hyperplane" and options["block_size"] == 2
    assert options["seed"] == 3 and options["memory"] == "stream"
    assert sum(soup.weights) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="block_size=4"):
        builder.learned(data, block_size=4, progress=False)
    with pytest.raises(ValueError, match="memory='disk'"):
        builder.learned(data, memory="disk", progress=False)
    with pytest.raises(ValueError, match="coefficients='sphere'"):
        builder.learned(data, coefficients="sphere", progress=False)


def test_a_frozen_text_tower_gets_no_coefficients_and_no_reads(tmp_path, data, monkeypatch):
    clip = CLIPModel.from_pretrained(make_clip_folder(tmp_path / "clip", seed=0))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "clip")
    folders = []
    for index in range(2):
        model = CLIPZeroShotClassifier.from_clip(
            clip, tokenizer, ["cat", "dog", "bird"], ["a photo of a {}"], progress=False
        )
        with torch.no_grad():
            torch.manual_seed(index)
            for parameter in model.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
        folders.append(save_model(model, tmp_path / f"ft{index}"))
    text = ("clip.text_model.", "clip.text_projection.", "clip.logit_scale")
    reads = []
    real_read = Ingredient.read
    monkeypatch.setattr(
        Ingredient,
        "read",
        lambda self, name, out=None: reads.append(name) or real_read(self, name, out),
    )
    builder = SoupBuilder.from_pretrained([str(f) for f in folders])
    soup = builder.learned(
        data, by_layer=True, epochs=1, batch_size=8, memory="stream", progress=False
    )
    monkeypatch.undo()
    floating = [
        n
        for n, t in CLIPZeroShotClassifier.from_pretrained(folders[0]).state_dict().items()
        if t.is_floating_point()
    ]
    frozen = soup.record.coefficients["frozen"]
    assert sorted(frozen) == sorted(n for n in floating if n.startswith(text))
    assert frozen and not set(frozen) & set(soup.tensor_weights)
    learned = [n for n in floating if not n.startswith(text)]
    assert sorted(soup.tensor_weights) == sorted(learned)
    assert all(soup.tensor_weights[n] != [0.5, 0.5] for n in learned)
    # no stored text-tower tensor was read for the fit (only disk_names' integer buffers)
    stored_text = {n for n in Ingredient.from_folder(folders[0]).tensors if n.startswith(text)}
    ints = {
        n
        for n, info in Ingredient.from_folder(folders[0]).tensors.items()
        if not info.dtype.is_floating_point
    }
    assert not [n for n in reads if n in stored_text and n not in ints]
    assert len(reads) > 0
    # the by-layer soup replays; frozen tensors are mixed with the per-model weights
    merged = soup.to_model().state_dict()
    states = [CLIPZeroShotClassifier.from_pretrained(f).state_dict() for f in folders]
    for name in frozen[:3] + learned[:3]:
        weights = soup.tensor_weights.get(name, soup.weights)
        reference = sum(w * s[name].double() for w, s in zip(weights, states))
        torch.testing.assert_close(merged[name].double(), reference, atol=1e-6, rtol=1e-6)


@pytest.mark.timeout(300)
def test_two_processes_fit_the_coefficients_of_one(folders, data, tmp_path, one_thread):
    # 17 examples in batches of 8: the last batch has one example, so one process gets none.
    held_out = data.select(range(17))
    held_out.save_to_disk(str(tmp_path / "data"))
    config = tmp_path / "accelerate.yaml"
    config.write_text(ACCELERATE_CONFIG)
    out = tmp_path / "fits.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    command = [
        *ACCELERATE_LAUNCH, "--config_file", str(config), "--multi_gpu",
        "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        str(HERE / "distributed_learned.py"), "--data", str(tmp_path / "data"),
        "--out", str(out), *map(str, folders[:3]),
    ]  # fmt: skip
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stderr[-3000:]
    launched = json.loads(out.read_text())
    assert launched.pop("num_processes") == 2
    # Each process fetched its share only: 2 fits x 2 epochs x 17 examples, plus one probe
    # example per fit and process.
    rows = launched.pop("rows_per_process")
    assert sum(rows) == 2 * 2 * 17 + 2 * 2 and max(rows) < 2 * 2 * 17

    ingredients = ingredients_of(folders[:3])
    for name, options in distributed_learned.FITS.items():
        single = fit_mixing_coefficients(
            ingredients, held_out, memory="stream", device="cpu", progress=False, **options
        )
        np.testing.assert_allclose(launched[name]["model_weights"], single.model_weights, atol=1e-5)
        np.testing.assert_allclose(launched[name]["losses"], single.losses, rtol=1e-5)
        if single.tensor_weights is not None:
            for tensor, row in single.tensor_weights.items():
                np.testing.assert_allclose(launched[name]["tensor_weights"][tensor], row, atol=1e-5)
        assert launched[name]["options"] == single.options
