"""Evaluator against plain torch arithmetic, single-process and under `accelerate launch`."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from launch import ACCELERATE_CONFIG, ACCELERATE_LAUNCH, free_port
from references import wilson_closed_form
from sklearn.metrics import balanced_accuracy_score
from torch.utils.data import DataLoader, TensorDataset
from transformers import ViTConfig, ViTForImageClassification

from hf_soups.evaluation import EvalResult, Evaluator, Scored, as_scorer, load_metric, score_fn
from hf_soups.stats import wilson_interval

HERE = Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("distributed_eval", HERE / "distributed_eval.py")
distributed_eval = importlib.util.module_from_spec(spec)
spec.loader.exec_module(distributed_eval)
make_dataset, make_models = distributed_eval.make_dataset, distributed_eval.make_models

N = 37  # does not divide the batch size of 8


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


@pytest.fixture(scope="module")
def dataset():
    return make_dataset(N, seed=1)


def plain_logits(model, data):
    """Logits of the whole dataset in one float64 forward pass."""
    x = torch.as_tensor(np.asarray(data["pixel_values"]), dtype=torch.float64)
    with torch.no_grad():
        return F.linear(x, model.linear.weight.double(), model.linear.bias.double())


def labels_of(data):
    return torch.as_tensor(np.asarray(data["labels"]))


def test_accuracy_and_predictions_match_plain_torch(dataset, accelerator):
    (model,) = make_models(1)
    result = Evaluator(dataset, batch_size=8, accelerator=accelerator, progress=False)(model)
    predictions = plain_logits(model, dataset).argmax(dim=1)
    labels = labels_of(dataset)
    assert result.n == N
    np.testing.assert_array_equal(result.predictions, predictions.numpy())
    np.testing.assert_array_equal(result.labels, labels.numpy())
    expected = (predictions == labels).double().mean().item()
    assert result.metrics == {"accuracy": pytest.approx(expected, abs=1e-12)}
    assert result.score == result.metrics["accuracy"]
    low, high = result.intervals["accuracy"]
    assert low < expected < high


def test_top_k_matches_manual_topk(dataset, accelerator):
    (model,) = make_models(1, seed=2)
    evaluator = Evaluator(
        dataset,
        ["top_k_accuracy", "top_3_accuracy"],
        batch_size=8,
        accelerator=accelerator,
        progress=False,
    )
    result = evaluator.evaluate(model)
    logits, labels = plain_logits(model, dataset), labels_of(dataset)
    for k in (5, 3):
        hits = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
        assert result.metrics[f"top_{k}_accuracy"] == pytest.approx(hits.double().mean().item())
        np.testing.assert_array_equal(result.per_example[f"top_{k}_accuracy"], hits.numpy())
        assert f"top_{k}_accuracy" in result.intervals


def test_top_k_metric_counts_ties_for_the_example():
    # Reference scores tie with others: fewer than k classes score strictly higher.
    scores = [[1.0, 1.0, 1.0, 0.0], [0.0, 2.0, 2.0, 1.0], [3.0, 2.0, 1.0, 0.0]]
    result = load_metric("top_k_accuracy").compute(predictions=scores, references=[2, 3, 2], k=1)
    assert result == {"top_1_accuracy": pytest.approx(1 / 3)}


def test_callable_metrics_get_predictions_or_logits(dataset, accelerator):
    (model,) = make_models(1, seed=3)

    def cross_entropy(logits, labels):
        return F.cross_entropy(torch.as_tensor(logits), torch.as_tensor(labels)).item()

    def counts(predictions, labels):
        return {
            "correct": int((predictions == labels).sum()),
            "wrong": int((predictions != labels).sum()),
        }

    def balanced(predictions, labels):
        return balanced_accuracy_score(labels, predictions)  # sklearn takes (y_true, y_pred)

    metrics = {"balanced": balanced, "nll": cross_entropy, "counts": counts}
    evaluator = Evaluator(
        dataset, metrics, batch_size=8, accelerator=accelerator, progress=False, n_resamples=100
    )
    result = evaluator.evaluate(model, name="linear")
    logits, labels = plain_logits(model, dataset), labels_of(dataset)
    predictions = logits.argmax(dim=1)
    assert result.name == "linear"
    assert result.metrics["balanced"] == pytest.approx(
        balanced_accuracy_score(labels.numpy(), predictions.numpy())
    )
    assert result.metrics["nll"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    correct = int((predictions == labels).sum())
    assert result.metrics["counts/correct"] == correct
    assert result.metrics["counts/wrong"] == N - correct
    for key in ("balanced", "nll", "counts/correct"):
        low, high = result.intervals[key]
        assert low <= high
    assert result.intervals["nll"][0] < result.metrics["nll"] < result.intervals["nll"][1]


def test_evaluate_modules_get_the_inputs_their_features_declare(dataset, accelerator):
    (model,) = make_models(1, seed=4)
    modules = {"acc": load_metric("accuracy"), "top5": load_metric("top_k_accuracy")}
    result = Evaluator(dataset, modules, batch_size=8, accelerator=accelerator, progress=False)(
        model
    )
    logits, labels = plain_logits(model, dataset), labels_of(dataset)
    assert result.metrics["acc"] == pytest.approx((logits.argmax(1) == labels).double().mean())
    top5 = (logits.topk(5, dim=1).indices == labels[:, None]).any(dim=1)
    assert result.metrics["top5"] == pytest.approx(top5.double().mean().item())


def test_ensemble_is_mean_of_logits(dataset, accelerator):
    models = make_models(3, seed=5)
    evaluator = Evaluator(
        dataset,
        ["accuracy", "top_2_accuracy"],
        batch_size=8,
        accelerator=accelerator,
        progress=False,
    )
    result = evaluator.evaluate_ensemble(models)
    mean = torch.stack([plain_logits(m, dataset) for m in models]).mean(dim=0)
    labels = labels_of(dataset)
    np.testing.assert_array_equal(result.predictions, mean.argmax(dim=1).numpy())
    assert result.metrics["accuracy"] == pytest.approx((mean.argmax(1) == labels).double().mean())
    top2 = (mean.topk(2, dim=1).indices == labels[:, None]).any(dim=1)
    assert result.metrics["top_2_accuracy"] == pytest.approx(top2.double().mean().item())
    assert result.name == "ensemble of 3"


def test_vit_from_config_with_logits_output(accelerator):
    config = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=5,
    )
    torch.manual_seed(0)
    model = ViTForImageClassification(config).train()
    images = torch.randn(11, 3, 8, 8)
    labels = torch.randint(0, 5, (11,))
    data = datasets.Dataset.from_dict({"pixel_values": images.numpy(), "labels": labels.numpy()})
    result = Evaluator(data, batch_size=4, accelerator=accelerator, progress=False)(model)
    assert model.training, "the model's training flag must be restored"
    model.eval()
    with torch.no_grad():
        expected = model(pixel_values=images).logits.argmax(dim=1)
    np.testing.assert_array_equal(result.predictions, expected.numpy())
    assert result.metrics["accuracy"] == pytest.approx((expected == labels).double().mean())


def test_dataloader_of_pairs(dataset, accelerator):
    (model,) = make_models(1, seed=6)
    x = torch.as_tensor(np.asarray(dataset["pixel_values"]))
    y = torch.as_tensor(np.asarray(dataset["labels"]))
    loader = DataLoader(TensorDataset(x, y), batch_size=5)
    result = Evaluator(loader, accelerator=accelerator, progress=False)(model)
    np.testing.assert_array_equal(result.predictions, plain_logits(model, dataset).argmax(1))
    np.testing.assert_array_equal(result.labels, y.numpy())


class Flattening(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, pixel_values):
        return self.inner(pixel_values=pixel_values.flatten(1))


def test_dataset_reading_paths_keep_rows_and_order(dataset, accelerator):
    (model,) = make_models(1, seed=9)
    x = np.asarray(dataset["pixel_values"])
    y = np.asarray(dataset["labels"])
    expected = plain_logits(model, dataset).argmax(1).numpy()
    order = np.arange(N)[::-1][::2]
    as_matrices = datasets.Dataset.from_dict(
        {"pixel_values": x.reshape(N, 3, -1), "labels": y},
        features=datasets.Features(
            {
                "pixel_values": datasets.Array2D((3, x.shape[1] // 3), "float32"),
                "labels": datasets.Value("int64"),
            }
        ),
    )

    def to_matrices(batch):
        return {
            "pixel_values": [torch.tensor(v).reshape(3, -1) for v in batch["pixel_values"]],
            "labels": batch["labels"],
        }

    cases = {  # name: (dataset, model, rows it holds in order)
        "indices mapping (select)": (dataset.select(order), model, order),
        "Array2D feature": (as_matrices, Flattening(model), np.arange(N)),
        "with_transform": (dataset.with_transform(to_matrices), Flattening(model), np.arange(N)),
        "torch format": (dataset.with_format("torch"), model, np.arange(N)),
    }
    for case, (data, wrapped, rows) in cases.items():
        result = Evaluator(data, batch_size=5, accelerator=accelerator, progress=False)(wrapped)
        np.testing.assert_array_equal(result.labels, y[rows], err_msg=case)
        np.testing.assert_array_equal(result.predictions, expected[rows], err_msg=case)


def test_ragged_inputs_are_refused(accelerator):
    ragged = datasets.Dataset.from_dict({"pixel_values": [[1.0, 2.0], [3.0]], "labels": [0, 1]})
    (model,) = make_models(1)
    with pytest.raises(ValueError, match="'pixel_values' holds arrays of different lengths"):
        Evaluator(ragged, accelerator=accelerator, progress=False)(model)


def test_save_and_load_keep_per_example_outcomes(dataset, accelerator, tmp_path):
    (model,) = make_models(1, seed=7)
    evaluator = Evaluator(
        dataset,
        ["accuracy", "top_3_accuracy"],
        batch_size=8,
        accelerator=accelerator,
        progress=False,
        primary_metric="top_3_accuracy",
    )
    result = evaluator(model)
    path = result.save(tmp_path / "results" / "linear.json")
    summary = json.loads(path.read_text())
    assert summary["n"] == N and summary["primary_metric"] == "top_3_accuracy"
    assert summary["score"] == result.metrics["top_3_accuracy"]
    with np.load(tmp_path / "results" / "linear.npz") as arrays:
        assert arrays["predictions"].dtype == np.int16
        assert arrays["labels"].dtype == np.int16
        assert arrays["per_example/top_3_accuracy"].dtype == np.bool_
    loaded = EvalResult.load(path)
    np.testing.assert_array_equal(loaded.predictions, result.predictions)
    np.testing.assert_array_equal(loaded.labels, result.labels)
    assert loaded.metrics == result.metrics
    assert loaded.intervals == result.intervals
    assert loaded.score == result.score
    correct = int((loaded.predictions == loaded.labels).sum())
    assert loaded.interval("accuracy") == pytest.approx(wilson_interval(correct, N))


def test_score_fn_and_as_scorer_accept_evaluator_or_callable(dataset, accelerator):
    (model,) = make_models(1, seed=8)
    evaluator = Evaluator(
        dataset,
        ["accuracy", "top_2_accuracy"],
        batch_size=8,
        accelerator=accelerator,
        progress=False,
        primary_metric="top_2_accuracy",
    )
    assert score_fn(evaluator)(model) == evaluator(model).metrics["top_2_accuracy"]
    assert score_fn(lambda m: 0.25)(model) == 0.25
    with pytest.raises(TypeError, match="Evaluator or a callable"):
        score_fn(3)
    # as_scorer, which score_fn wraps, also hands back the EvalResult.
    logits, labels = plain_logits(model, dataset), labels_of(dataset)
    accuracy = (logits.argmax(1) == labels).double().mean().item()
    top2 = (logits.topk(2, dim=1).indices == labels[:, None]).any(dim=1).double().mean().item()
    value, result = as_scorer(evaluator)(model, "named")
    assert value == pytest.approx(top2) and result.name == "named"
    assert as_scorer(evaluator, "accuracy")(model).value == pytest.approx(accuracy)
    assert as_scorer(lambda m: torch.tensor(0.25))(model) == Scored(0.25, None)
    # A callable may return an EvalResult (as sweep eval sets do): its metric is reported.
    scored = as_scorer(lambda m: result, "accuracy")(model)
    assert scored.value == pytest.approx(accuracy) and scored.result is result
    with pytest.raises(KeyError, match="'f1'"):
        as_scorer(evaluator, "f1")(model)
    with pytest.raises(TypeError, match="score function"):
        as_scorer(lambda m: "high")(model)


def test_intervals_have_the_evaluators_confidence(accelerator):
    # 400 examples: Wilson intervals at 80% against the closed form, and the bootstrap interval
    # of a callable's mean against normal theory at 80% (an interval at 95% is half as wide
    # again, well outside the tolerance).
    data = make_dataset(400, seed=3)
    (model,) = make_models(1, seed=3)

    def true_class_logit(logits, labels):
        return float(np.mean(logits[np.arange(len(labels)), labels]))

    evaluator = Evaluator(
        data,
        {"accuracy": "accuracy", "top3": "top_3_accuracy", "logit": true_class_logit},
        batch_size=64,
        accelerator=accelerator,
        progress=False,
        confidence=0.8,
        n_resamples=4000,
    )
    result = evaluator(model)
    logits, labels = plain_logits(model, data), labels_of(data)
    hits = {
        "accuracy": int((logits.argmax(1) == labels).sum()),
        "top3": int((logits.topk(3, dim=1).indices == labels[:, None]).any(dim=1).sum()),
    }
    for key, k in hits.items():
        assert result.intervals[key] == pytest.approx(wilson_closed_form(k, 400, 0.8), abs=1e-12)
    values = logits[torch.arange(400), labels].numpy()
    z80 = 1.2815516
    half = z80 * values.std(ddof=1) / np.sqrt(values.size)
    low, high = result.intervals["logit"]
    assert low == pytest.approx(values.mean() - half, abs=0.12 * half)
    assert high == pytest.approx(values.mean() + half, abs=0.12 * half)
    assert result.confidence == 0.8


def test_with_metrics_adds_metrics_to_a_copy(dataset, accelerator):
    (model,) = make_models(1, seed=10)

    def nll(logits, labels):
        return F.cross_entropy(torch.as_tensor(logits), torch.as_tensor(labels)).item()

    evaluator = Evaluator(dataset, batch_size=8, accelerator=accelerator, progress=False)
    extended = evaluator.with_metrics({"nll": nll, "top2": "top_2_accuracy"})
    quiet = evaluator.with_metrics({"nll": nll}, bootstrap=False)
    logits, labels = plain_logits(model, dataset), labels_of(dataset)
    result = extended(model)
    assert set(result.metrics) == {"accuracy", "nll", "top2"}
    assert result.metrics["nll"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    top2 = (logits.topk(2, dim=1).indices == labels[:, None]).any(dim=1)
    np.testing.assert_array_equal(result.per_example["top2"], top2.numpy())
    assert "nll" in result.intervals
    quiet_result = quiet(model)
    assert quiet_result.metrics["nll"] == result.metrics["nll"]
    assert set(quiet_result.intervals) == {"accuracy"}  # no bootstrap for the added loss
    assert set(evaluator(model).metrics) == {"accuracy"}  # the original is left as it was
    with pytest.raises(ValueError, match="already gave"):
        evaluator.with_metrics("accuracy")(model)


def test_shipped_metrics_need_no_evaluate_module():
    # Accuracy and top-k are computed directly; `evaluate` (and its private API) is not touched.
    code = (
        "import sys, numpy as np, torch\n"
        "from datasets import Dataset\n"
        "from hf_soups.evaluation import Evaluator\n"
        "data = Dataset.from_dict({'pixel_values': np.eye(3, dtype=np.float32), 'labels': [0, 1, 1]})\n"
        "model = torch.nn.Linear(3, 3)\n"
        "model.weight.data = torch.eye(3); model.bias.data.zero_()\n"
        "class M(torch.nn.Module):\n"
        "    def __init__(self): super().__init__(); self.inner = model\n"
        "    def forward(self, pixel_values): return self.inner(pixel_values)\n"
        "r = Evaluator(data, ['accuracy', 'top_2_accuracy'], progress=False)(M())\n"
        "assert r.metrics == {'accuracy': 2 / 3, 'top_2_accuracy': 1.0}, r.metrics\n"
        "assert 'evaluate' not in sys.modules\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]


def test_clear_errors(dataset, accelerator):
    (model,) = make_models(1)
    with pytest.raises(ValueError, match="'image'"):
        Evaluator(dataset, input_column="image", accelerator=accelerator, progress=False)(model)
    with pytest.raises(ValueError, match="primary_metric 'f1'"):
        Evaluator(dataset, accelerator=accelerator, primary_metric="f1", progress=False)(model)
    with pytest.raises(ValueError, match="already gave"):
        Evaluator(dataset, ["accuracy", "accuracy"], accelerator=accelerator, progress=False)(model)

    class NoLogits(torch.nn.Module):
        def forward(self, pixel_values):
            return {"scores": pixel_values}

    with pytest.raises(TypeError, match="NoLogits returned dict"):
        Evaluator(dataset, accelerator=accelerator, progress=False)(NoLogits())


@pytest.mark.timeout(120)
def test_two_processes_give_single_process_results(tmp_path, accelerator):
    n, batch_size = 101, 8
    config = tmp_path / "accelerate.yaml"
    config.write_text(ACCELERATE_CONFIG)
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    command = [
        *ACCELERATE_LAUNCH, "--config_file", str(config), "--multi_gpu",
        "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        str(HERE / "distributed_eval.py"), "--out", str(out), "--n", str(n),
        "--batch-size", str(batch_size),
    ]  # fmt: skip
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=110)
    assert run.returncode == 0, run.stderr[-3000:]

    meta = json.loads((out / "meta.json").read_text())
    assert meta["num_processes"] == 2
    # Each process ran only its shard (plus Accelerate's padding of the last batch).
    assert all(rows < n for rows in meta["rows_seen_per_process"])
    assert sum(meta["rows_seen_per_process"]) >= n

    data = make_dataset(n)
    models = make_models(3)
    evaluator = Evaluator(
        data,
        distributed_eval.METRICS,
        batch_size=batch_size,
        accelerator=accelerator,
        progress=False,
    )
    references = {
        "single": evaluator.evaluate(models[0]),
        "ensemble": evaluator.evaluate_ensemble(models),
    }
    plain = {
        "single": plain_logits(models[0], data).argmax(1).numpy(),
        "ensemble": torch.stack([plain_logits(m, data) for m in models]).mean(0).argmax(1).numpy(),
    }
    for key, reference in references.items():
        distributed = EvalResult.load(out / f"{key}.json")
        assert distributed.n == n
        np.testing.assert_array_equal(distributed.labels, np.asarray(data["labels"]))
        np.testing.assert_array_equal(distributed.predictions, reference.predictions)
        np.testing.assert_array_equal(distributed.predictions, plain[key])
        assert distributed.metrics == reference.metrics
        for name, hits in reference.per_example.items():
            np.testing.assert_array_equal(distributed.per_example[name], hits)
