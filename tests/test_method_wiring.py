"""Merge methods reached from the command line (``hf-soups merge --method``) and from
``SoupBuilder``: the same output as the Python API, recorded with parameters and citation, and
one-line errors for a missing base or an unknown parameter."""

from __future__ import annotations

import itertools
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from tiny import load_weights, make_vit_folder
from transformers import ViTConfig, ViTForImageClassification

from hf_soups.cli import main
from hf_soups.errors import MissingBaseError
from hf_soups.merge import merge
from hf_soups.methods import ModelStock, get_method
from hf_soups.soup import SoupBuilder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A base ViT and three fine-tunes of it whose deltas share a direction (so Model Stock's
    angle is far from 90 degrees); the last one is sharded."""
    root = tmp_path_factory.mktemp("wiring")
    base = make_vit_folder(root / "base", seed=0)
    weights = load_weights(base)
    generator = torch.Generator().manual_seed(0)
    shared = {name: torch.randn(t.shape, generator=generator) for name, t in weights.items()}
    fine_tunes = []
    for i in range(3):
        folder = shutil.copytree(base, root / f"ft{i}")
        state = {
            name: tensor + 0.01 * (shared[name] + torch.randn(tensor.shape, generator=generator))
            for name, tensor in weights.items()
        }
        (folder / "model.safetensors").unlink()
        if i == 2:
            model = ViTForImageClassification.from_pretrained(
                None, config=ViTConfig.from_pretrained(folder), state_dict=state
            )
            model.save_pretrained(folder, max_shard_size="20KB")
        else:
            save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        fine_tunes.append(folder)
    return base, fine_tunes


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


CLI_CASES = {
    "task_arithmetic": (["scaling=0.7"], {"scaling": 0.7}),
    "ties": (["density=0.3", "scaling=1.2"], {"density": 0.3, "scaling": 1.2}),
    "model_stock": ([], {}),
    "dare_ties": (["drop_rate=0.5", "seed=3"], {"drop_rate": 0.5, "seed": 3}),
}


@pytest.mark.parametrize("name", sorted(CLI_CASES))
def test_cli_method_equals_the_python_api(folders, tmp_path, capsys, name):
    base, fine_tunes = folders
    args, params = CLI_CASES[name]
    out = tmp_path / "cli"
    command = ["-q", "merge", *map(str, fine_tunes), "--out", str(out), "--method", name]
    command += ["--base", str(base), *itertools.chain(*(["--param", a] for a in args))]
    assert main(command) == 0, capsys.readouterr().err
    api = merge(
        [str(f) for f in fine_tunes],
        tmp_path / "api",
        method=get_method(name, **params),
        base=str(base),
        progress=False,
    )
    assert_same_tensors(load_weights(out), load_weights(api))
    recorded = json.loads((out / "soup.json").read_text())
    assert recorded["method"] == name
    assert recorded["parameters"] == json.loads((api / "soup.json").read_text())["parameters"]
    assert recorded["citation"] and recorded["base"]["source"] == str(base)


def test_cli_task_arithmetic_matches_float64(folders, tmp_path):
    """theta_0 + lambda_i (theta_i - theta_0), per-ingredient scaling given as a YAML list."""
    base, fine_tunes = folders
    out = tmp_path / "ta"
    command = ["-q", "merge", *map(str, fine_tunes), "--out", str(out), "--method"]
    command += ["task_arithmetic", "--base", str(base), "--param", "scaling=[0.5, -0.25, 1]"]
    assert main(command) == 0
    theta0 = load_weights(base)
    thetas = [load_weights(f) for f in fine_tunes]
    merged = load_weights(out)
    for name, t0 in theta0.items():
        t0 = t0.double()
        expected = t0 + sum(c * (t[name].double() - t0) for c, t in zip([0.5, -0.25, 1.0], thetas))
        torch.testing.assert_close(merged[name].double(), expected, atol=1e-6, rtol=0)


CLI_ERRORS = {
    "missing base": (["--method", "ties"], ["--method ties", "--base"]),
    "unknown parameter": (
        ["--method", "ties", "--base", "{base}", "--param", "densty=0.2"],
        ["'ties'", "densty", "density", "scaling"],
    ),
    "malformed parameter": (
        ["--method", "ties", "--base", "{base}", "--param", "density"],
        ["--param", "'density'", "KEY=VALUE"],
    ),
    "param without method": (["--param", "density=0.2"], ["--method"]),
    "base for fisher": (
        ["--method", "fisher", "--base", "{base}", "--param", "fisher_dirs=[a, b, c]"],
        ["--base", "'fisher'"],
    ),
    "weights and method": (
        ["--method", "model_stock", "--base", "{base}", "--weights", "0.2,0.3,0.5"],
        ["weights", "method"],
    ),
}


@pytest.mark.parametrize("case", sorted(CLI_ERRORS))
def test_cli_errors_are_one_line_with_exit_2(folders, tmp_path, capsys, case):
    base, fine_tunes = folders
    extra, expected = CLI_ERRORS[case]
    extra = [arg.replace("{base}", str(base)) for arg in extra]
    out = tmp_path / "out"
    code = main(["-q", "merge", *map(str, fine_tunes), "--out", str(out), *extra])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("hf-soups merge: error: "), lines
    for fragment in expected:
        assert fragment in lines[0]
    assert not out.exists()


def model_stock_reference(base: dict, thetas: list[dict]) -> dict[str, torch.Tensor]:
    """Model Stock in float64, per tensor, with the mean of the pairwise cosines written out."""
    k = len(thetas)
    out = {}
    for name, t0 in base.items():
        t0 = t0.double()
        deltas = [(t[name].double() - t0).flatten() for t in thetas]
        cosines = [
            torch.dot(a, b) / (a.norm() * b.norm()) for a, b in itertools.combinations(deltas, 2)
        ]
        cos = sum(cosines).item() / len(cosines)
        ratio = k * cos / (1 + (k - 1) * cos)
        mean = sum(t[name].double() for t in thetas) / k
        out[name] = ratio * mean + (1 - ratio) * t0
    return out


def test_builder_model_stock_equals_the_engine(folders, tmp_path):
    base, fine_tunes = folders
    soup = SoupBuilder.from_pretrained([str(f) for f in fine_tunes]).model_stock(base=str(base))
    assert soup.method.name == "model_stock" and soup.base.source == str(base)
    saved = soup.save_pretrained(tmp_path / "soup", progress=False)
    engine = merge(
        [str(f) for f in fine_tunes], tmp_path / "engine", method=ModelStock(), base=str(base)
    )
    assert_same_tensors(load_weights(saved), load_weights(engine))
    assert_same_tensors(soup.state_dict(), load_weights(engine))
    reference = model_stock_reference(load_weights(base), [load_weights(f) for f in fine_tunes])
    merged = load_weights(saved)
    ratios = list(soup.method.ratios.values())
    assert 0.3 < sum(ratios) / len(ratios) < 0.95  # correlated deltas: t far from 0 and 1
    for name, expected in reference.items():
        torch.testing.assert_close(merged[name].double(), expected, atol=1e-6, rtol=0)
    record = json.loads((saved / "soup.json").read_text())
    assert record["method"] == record["soup"]["method"] == "model_stock"
    assert "Model Stock" in record["citation"] and record["soup"]["citation"] == record["citation"]
    assert record["base"]["source"] == str(base)


def test_builder_merge_method_wiring(folders, tmp_path):
    base, fine_tunes = folders
    builder = SoupBuilder.from_pretrained([str(f) for f in fine_tunes])
    soup = builder.merge_method("dare_linear", base=str(base), drop_rate=0.5, seed=7)
    engine = merge(
        [str(f) for f in fine_tunes],
        tmp_path / "engine",
        method=get_method("dare_linear", drop_rate=0.5, seed=7),
        base=str(base),
        progress=False,
    )
    assert_same_tensors(soup.state_dict(), load_weights(engine))
    saved = soup.save_pretrained(tmp_path / "soup", progress=False)
    record = json.loads((saved / "soup.json").read_text())
    assert record["parameters"] == json.loads((engine / "soup.json").read_text())["parameters"]
    assert record["parameters"]["drop_rate"] == 0.5 and record["parameters"]["seed"] == 7

    with pytest.raises(MissingBaseError, match="'ties'"):
        builder.merge_method("ties", density=0.2)
    with pytest.raises(ValueError, match="densty.*density"):
        builder.merge_method("ties", base=str(base), densty=0.2)
    with pytest.raises(ValueError, match="'nope'"):
        builder.merge_method("nope", base=str(base))
    with pytest.raises(ValueError, match="'fisher' does not use a base"):
        builder.merge_method("fisher", base=str(base), fisher_dirs=[str(f) for f in fine_tunes])
    with pytest.raises(ValueError, match=r"uniform\(\)"):
        builder.merge_method("weighted_average", weights=[1, 0, 0])
