"""The demo's sparse stage on a tiny schedule: every artifact, checked against the saved files."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from scipy.stats import norm
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoTokenizer, CLIPModel

from hf_soups.cli import main
from hf_soups.demo.pretrain import PretrainConfig
from hf_soups.demo.sparse import SparseConfig, run_sparse_demo
from hf_soups.errors import HfSoupsError

pytestmark = pytest.mark.usefixtures("one_thread")

REPORTED = ["test", "rotate", "noise", "invert", "downscale"]
SPARSITIES = (0.5, 0.8, 0.9)
TINY_PRETRAIN = PretrainConfig(
    patch_size=7,
    hidden_size=32,
    num_layers=1,
    num_heads=2,
    projection_dim=32,
    epochs=1,
    text_hidden_size=32,
)
# Ten steps at a high rate: above chance on every set, so the scores say something.
TINY = SparseConfig(
    copies=2,
    sparsities=SPARSITIES,
    max_steps=10,
    dense_learning_rate=3e-3,
    retrain_learning_rate=3e-3,
    # The tiny CLIP's image MLPs are a small share of it: targets it can reach.
    reduction_parameters=0.05,
    reduction_flops=0.1,
)
REDUCED = "reduced"
# Per-layer pruning rounds each tensor's kept count to the nearest weight.
ROUNDING = 1e-3


@pytest.fixture(scope="module")
def sparse(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    threads = torch.get_num_threads()
    try:
        results = run_sparse_demo(
            out, pretrain=TINY_PRETRAIN, pretrain_steps=20, config=TINY, progress=False
        )
    finally:
        torch.set_num_threads(threads)
    return out / "sparse", results


@pytest.fixture(scope="module")
def report(sparse):
    return json.loads((sparse[0] / "sparse_results.json").read_text())


@pytest.fixture(scope="module")
def data():
    from hf_soups.demo.data import load_demo_data

    return load_demo_data(seed=0)


def _wilson(successes: int, n: int) -> tuple[float, float]:
    z = norm.ppf(0.975)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_the_table_has_dense_imp_and_sparse_soups_at_each_sparsity(sparse, report):
    folder, results = sparse
    names = [row["name"] for row in report["rows"]]
    expected = ["dense (fine-tuned)", "dense soup (uniform)"]
    for kind in ["IMP", "sparse soup (greedy)", "sparse soup (uniform)"]:
        expected += [f"{kind}, {s:.0%} sparse" for s in SPARSITIES]
    widths = report["reduction"]["intermediate_size"]
    before, after = widths["before"]["vision"], widths["after"]["vision"]
    expected.append(f"reduced (vision MLP width {before} -> {after})")
    assert names == expected
    table = (folder / "sparse_results.md").read_text()
    assert all(f"| {name} |" in table for name in expected)
    assert table.count("\n| ") == len(expected) + 1  # header and one line per row
    assert results.table() in table


def test_every_cell_is_an_accuracy_with_its_wilson_interval(report):
    for row in report["rows"]:
        assert list(row["results"]) == REPORTED
        for entry in row["results"].values():
            n, accuracy = entry["n"], entry["metrics"]["accuracy"]
            assert n == 1000
            low, high = entry["intervals"]["accuracy"]
            assert low <= accuracy <= high
            expected = _wilson(round(accuracy * n), n)
            assert (low, high) == pytest.approx(expected, abs=1e-9)


def test_rows_have_the_sparsity_they_claim(report):
    for row in report["rows"]:
        assert row["sparsity"] == pytest.approx(row["target_sparsity"], abs=ROUNDING)
        assert row["copies_per_round"] == (1 if row["kind"] in ("IMP", "dense", REDUCED) else 2)


def test_greedy_rounds_keep_the_copy_best_on_validation_first(report):
    for record in report["rounds"]["sparse soup (greedy)"]:
        scores = record["copy_scores"]
        assert len(scores) == 2
        assert record["kept"][0] == max(range(2), key=lambda i: (scores[i], -i))
    for record in report["rounds"]["sparse soup (uniform)"]:
        assert record["kept"] == [0, 1] and record["copy_scores"] == []


def test_saved_soup_is_a_sparse_clip_whose_zeros_are_its_mask(sparse, report):
    folder = sparse[0] / "sparse_soup"
    weights = load_file(folder / "model.safetensors")
    mask = load_file(folder / "pruning_mask.safetensors")
    assert mask and all(m.dtype == torch.bool for m in mask.values())
    assert all(name.startswith(("vision_model.", "visual_projection.")) for name in mask)
    kept = sum(int(m.sum()) for m in mask.values())
    total = sum(m.numel() for m in mask.values())
    zeros = sum(int((weights[name] == 0).sum()) for name in mask)
    assert 1 - kept / total == pytest.approx(SPARSITIES[-1], abs=ROUNDING)
    assert zeros / total == pytest.approx(SPARSITIES[-1], abs=ROUNDING)
    for name, keep in mask.items():
        assert bool((weights[name][~keep] == 0).all())
    model = CLIPModel.from_pretrained(folder)
    assert model.vision_model.embeddings.patch_embedding.weight.eq(0).float().mean() > 0.85
    assert report["saved_soup"] == "sparse soup (greedy), 90% sparse"


def test_saved_soup_is_the_mean_of_the_copies_it_kept(sparse, report):
    folder = sparse[0]
    recipe = json.loads((folder / "sparse_soup" / "soup.json").read_text())
    kept = report["rounds"]["sparse soup (greedy)"][-1]["kept"]
    sources = [source["source"] for source in recipe["ingredients"]]
    assert sources == [str(folder / "sparse_soup_copies" / f"copy-{i}") for i in kept]
    copies = [load_file(f"{source}/model.safetensors") for source in sources]
    written = load_file(folder / "sparse_soup" / "model.safetensors")
    for name, tensor in written.items():
        if tensor.is_floating_point():
            expected = sum(c[name] for c in copies) / len(copies)
            torch.testing.assert_close(tensor, expected, rtol=1e-6, atol=1e-7)
    pruning = recipe["soup"]["pruning"]
    assert pruning["masks"] == "shared"
    assert pruning["recipe"]["sparsities"] == list(SPARSITIES)
    assert pruning["recipe"]["scorer"] == "magnitude"
    assert [r["kept"] for r in pruning["recipe"]["rounds"]] == [
        r["kept"] for r in report["rounds"]["sparse soup (greedy)"]
    ]


def test_text_tower_is_never_pruned_or_changed(sparse):
    folder = sparse[0]
    soup = load_file(folder / "sparse_soup" / "model.safetensors")
    zero_shot = load_file(folder / "zero_shot" / "model.safetensors")
    text = [n for n in zero_shot if n.startswith(("text_model.", "text_projection.", "logit"))]
    assert text
    assert all(torch.equal(soup[n], zero_shot[n]) for n in text)


def test_saved_soup_scores_match_clip_forward_on_the_test_images(sparse, report, data):
    folder = sparse[0] / "sparse_soup"
    model = CLIPModel.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts = tokenizer(
        [data.templates[0].format(c) for c in data.classnames], padding=True, return_tensors="pt"
    )
    row = next(r for r in report["rows"] if r["name"] == report["saved_soup"])
    for name, dataset in {"test": data.test, **data.shifted}.items():
        images = dataset[:]
        with torch.no_grad():
            logits = model(**prompts, pixel_values=images["pixel_values"]).logits_per_image
        correct = int((logits.argmax(-1) == images["labels"]).sum())
        assert round(row["results"][name]["metrics"]["accuracy"] * 1000) == correct
    assert row["results"]["test"]["metrics"]["accuracy"] > 0.15  # chance is 0.10


def test_card_reports_the_mask_counts(sparse):
    folder = sparse[0] / "sparse_soup"
    card = (folder / "README.md").read_text()
    mask = load_file(folder / "pruning_mask.safetensors")
    kept = sum(int(m.sum()) for m in mask.values())
    total = sum(m.numel() for m in mask.values())
    assert "## Sparsity" in card
    assert f"**{100 * (1 - kept / total):.2f}%**" in card
    assert f"{kept:,} kept of {total:,}" in card
    for name, m in mask.items():
        assert re.search(rf"\| `{re.escape(name)}` \| {int(m.sum()):,} \| {m.numel():,} \|", card)
    assert "Pruned by magnitude scores (scope: layer)" in card
    assert "50.00%, 80.00%, 90.00% sparsity" in card


def _text_length(data, folder) -> int:
    """Tokens of the longest class prompt: what the table's FLOPs count a text as."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts = [t.format(c) for c in data.classnames for t in data.templates]
    return tokenizer(prompts, padding=True, return_tensors="pt")["input_ids"].shape[1]


def _flops(model, text_length) -> int:
    model.config._attn_implementation = "eager"  # its products are what the counter sees
    inputs = {
        "pixel_values": torch.randn(1, 3, 28, 28),
        "input_ids": torch.randint(4, 10, (1, text_length)),
    }
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(**inputs)
    return counter.get_total_flops()


def _numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_reduced_model_loads_with_from_pretrained_and_is_the_row_it_claims(sparse, report, data):
    folder = sparse[0] / "reduced"
    model = CLIPModel.from_pretrained(folder).eval()
    record = json.loads((folder / "reduction.json").read_text())
    dense = CLIPModel.from_pretrained(sparse[0] / "zero_shot")
    assert (
        model.config.vision_config.intermediate_size
        == record["intermediate_size"]["after"]["vision"]
        < dense.config.vision_config.intermediate_size
    )
    assert (
        record["intermediate_size"]["after"]["text"]
        == record["intermediate_size"]["before"]["text"]
    )
    assert record["parameters"]["reduction"] >= TINY.reduction_parameters
    assert record["flops"]["reduction"] >= TINY.reduction_flops
    row = report["rows"][-1]
    assert row["kind"] == REDUCED and row["sparsity"] == 0.0
    text_length = _text_length(data, folder)
    assert row["parameters"] == _numel(model) == record["parameters"]["after"]
    assert row["flops"] == _flops(model, text_length)
    assert 1 - _numel(model) / _numel(dense) == pytest.approx(record["parameters"]["reduction"])
    # The text tower was left whole, and the row's scores are CLIP's own on the saved weights.
    weights = load_file(folder / "model.safetensors")
    zero_shot = load_file(sparse[0] / "zero_shot" / "model.safetensors")
    assert all(torch.equal(weights[n], zero_shot[n]) for n in zero_shot if n.startswith("text_"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts = tokenizer(
        [data.templates[0].format(c) for c in data.classnames], padding=True, return_tensors="pt"
    )
    for name, dataset in {"test": data.test, **data.shifted}.items():
        images = dataset[:]
        with torch.no_grad():
            logits = model(**prompts, pixel_values=images["pixel_values"]).logits_per_image
        correct = int((logits.argmax(-1) == images["labels"]).sum())
        assert round(row["results"][name]["metrics"]["accuracy"] * 1000) == correct
    card = ModelCard.load(folder / "README.md")
    assert {"pruning", "structured-pruning", "hf-soups"} <= set(card.data.tags)
    assert card.data.library_name == "transformers"
    assert f"| {record['parameters']['after']:,} |" in card.text


def test_every_row_has_its_parameter_and_flop_counts(sparse, report, data):
    folder = sparse[0]
    dense = CLIPModel.from_pretrained(folder / "zero_shot")
    dense_flops = _flops(dense, _text_length(data, folder / "zero_shot"))
    for row in report["rows"][:-1]:  # the reduced row: above
        assert row["flops"] == dense_flops, row["name"]
        if row["target_sparsity"] == 0:
            assert row["parameters"] == _numel(dense), row["name"]
    soup = CLIPModel.from_pretrained(folder / "sparse_soup")
    saved = next(r for r in report["rows"] if r["name"] == report["saved_soup"])
    assert saved["parameters"] == sum(int(torch.count_nonzero(p)) for p in soup.parameters())
    imp = [r["parameters"] for r in report["rows"] if r["kind"] == "IMP"]
    assert imp == sorted(imp, reverse=True) and imp[-1] < _numel(dense)
    table = (folder / "sparse_results.md").read_text()
    assert "| sparsity | parameters | FLOPs |" in table
    for row in report["rows"]:
        assert f" | {row['parameters']:,} | {row['flops']:,} |" in table
    assert "Structured reduction: image MLP width" in table
    assert "structured reduction" in sparse[1].seconds


def test_output_is_refused_when_present(sparse):
    out = sparse[0].parent
    with pytest.raises(HfSoupsError, match="exists"):
        run_sparse_demo(out, pretrain=TINY_PRETRAIN, pretrain_steps=1, config=TINY)


def test_cli_sparse_flag_runs_only_the_sparse_stage(monkeypatch, tmp_path, capsys):
    calls = []

    def fake(out, **kwargs):
        calls.append((out, kwargs))
        raise SystemExit(0)

    monkeypatch.setattr("hf_soups.demo.sparse.run_sparse_demo", fake)
    with pytest.raises(SystemExit):
        main(["-q", "demo", "--sparse", "--fast", "--out", str(tmp_path / "o"), "--seed", "3"])
    options = {"fast": True, "seed": 3, "overwrite": False, "progress": False, "zero_shot": None}
    assert calls == [(str(tmp_path / "o"), options)]


def test_cli_zero_shot_needs_the_sparse_stage(tmp_path, capsys):
    assert main(["-q", "demo", "--out", str(tmp_path / "o"), "--zero-shot", str(tmp_path)]) != 0
    assert "--zero-shot" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_given_zero_shot_model_is_started_from_not_copied(sparse, tmp_path):
    zero_shot = sparse[0] / "zero_shot"
    small = SparseConfig(
        copies=1,
        sparsities=(0.5,),
        soups=("uniform",),
        max_steps=2,
        reduction_parameters=0.05,
        reduction_flops=0.1,
    )
    results = run_sparse_demo(tmp_path, config=small, zero_shot=zero_shot, progress=False)
    assert "pre-training" not in results.seconds
    assert sorted(p.name for p in (tmp_path / "sparse").iterdir()) == [
        "reduced",
        "sparse_results.json",
        "sparse_results.md",
        "sparse_soup",
        "sparse_soup_copies",
    ]
    soup = load_file(tmp_path / "sparse" / "sparse_soup" / "model.safetensors")
    start = load_file(zero_shot / "model.safetensors")
    assert all(torch.equal(soup[n], start[n]) for n in start if n.startswith("text_model."))


@pytest.mark.parametrize("given", ["missing", "vit"])
def test_a_zero_shot_folder_that_is_no_demo_clip_is_refused_before_any_work(
    tmp_path, capsys, given
):
    from tiny import make_vit_folder

    folder = tmp_path / "missing" if given == "missing" else make_vit_folder(tmp_path / "vit", 0)
    capsys.readouterr()  # what making the folder printed
    out = tmp_path / "out"
    args = ["-q", "demo", "--sparse", "--fast", "--out", str(out), "--zero-shot", str(folder)]
    assert main(args) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"hf-soups demo: error: --zero-shot {folder}: ")
    assert ("no such folder" if given == "missing" else "not a demo CLIP folder") in error
    assert not out.exists()
