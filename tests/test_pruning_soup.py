"""Sparse soups: ingredients sharing a pruning mask, against plain torch arithmetic on the files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny import make_vit_folder
from transformers import ViTForImageClassification

from hf_soups import SoupBuilder
from hf_soups.errors import IncompatibleIngredientsError
from hf_soups.pruning import MASK_FILE, Magnitude, prune, save_pruned
from hf_soups.recipe import replay

pytestmark = pytest.mark.usefixtures("one_thread")


def _pruned_folders(tmp_path, seeds, mask_seeds):
    """One pruned ViT per seed; ingredient ``i`` uses the magnitude mask of ``mask_seeds[i]``."""
    masks_by_seed = {}
    for seed in set(mask_seeds):
        model = ViTForImageClassification.from_pretrained(
            make_vit_folder(tmp_path / f"m{seed}", seed)
        )
        masks_by_seed[seed] = prune(model, Magnitude(), 0.6)
    folders = []
    for seed, mask_seed in zip(seeds, mask_seeds, strict=True):
        model = ViTForImageClassification.from_pretrained(
            make_vit_folder(tmp_path / f"d{seed}", seed)
        )
        with torch.no_grad():
            parameters = dict(model.named_parameters())
            for name, mask in masks_by_seed[mask_seed].items():
                parameters[name].mul_(mask)
        folders.append(save_pruned(model, masks_by_seed[mask_seed], tmp_path / f"ft{seed}"))
    return folders


def _stored(folder):
    return load_file(folder / "model.safetensors")


def test_uniform_soup_keeps_the_shared_mask(tmp_path):
    folders = _pruned_folders(tmp_path, [1, 2, 3], [0, 0, 0])
    soup = SoupBuilder.from_pretrained([str(f) for f in folders]).uniform()
    out = soup.save_pretrained(tmp_path / "soup", progress=False)

    weights = [_stored(f) for f in folders]
    mask = load_file(folders[0] / MASK_FILE)
    written = _stored(out)
    for name, tensor in written.items():
        if tensor.is_floating_point():
            expected = sum(w[name] for w in weights) / 3
            torch.testing.assert_close(tensor, expected, rtol=1e-6, atol=1e-7)
    for name, kept in mask.items():
        assert bool((written[name][~kept] == 0).all()) and bool((written[name][kept] != 0).all())
    soup_mask = load_file(out / MASK_FILE)
    assert soup_mask.keys() == mask.keys() and all(torch.equal(soup_mask[n], mask[n]) for n in mask)
    pruning = json.loads((out / "soup.json").read_text())["soup"]["pruning"]
    total = sum(m.numel() for m in mask.values())
    assert pruning["masks"] == "shared"
    assert pruning["sparsity"] == pytest.approx(
        1 - sum(int(m.sum()) for m in mask.values()) / total
    )
    assert pruning["sparsity"] == pytest.approx(0.6, abs=1e-3)
    # The in-memory soup is the same model.
    in_memory = soup.state_dict()
    assert all(torch.equal(in_memory[n], written[n]) for n in written)


def test_differing_masks_are_refused_naming_ingredients_and_tensor(tmp_path):
    folders = _pruned_folders(tmp_path, [1, 2], [0, 5])
    a, b = (load_file(f / MASK_FILE) for f in folders)
    first = next(n for n in sorted(a) if not torch.equal(a[n], b[n]))
    with pytest.raises(IncompatibleIngredientsError) as error:
        SoupBuilder.from_pretrained([str(f) for f in folders])
    message = str(error.value)
    assert "ft1" in message and "ft2" in message and repr(first) in message
    assert "intersection" in message


def test_intersection_masks_the_soup_and_is_recorded_and_replayed(tmp_path):
    folders = _pruned_folders(tmp_path, [1, 2], [0, 5])
    builder = SoupBuilder.from_pretrained([str(f) for f in folders], masks="intersection")
    out = builder.uniform().save_pretrained(tmp_path / "soup", progress=False)

    a, b = (load_file(f / MASK_FILE) for f in folders)
    both = {n: a[n] & b[n] for n in a}
    weights = [_stored(f) for f in folders]
    written = _stored(out)
    for name, tensor in written.items():
        if tensor.is_floating_point():
            expected = (weights[0][name] + weights[1][name]) / 2
            if name in both:
                expected = expected * both[name]
            torch.testing.assert_close(tensor, expected, rtol=1e-6, atol=1e-7)
            if name in both:
                assert bool((tensor[~both[name]] == 0).all())
    soup_mask = load_file(out / MASK_FILE)
    assert all(torch.equal(soup_mask[n], both[n]) for n in both)
    assert json.loads((out / "soup.json").read_text())["soup"]["pruning"]["masks"] == "intersection"
    replayed = replay(out, tmp_path / "replayed", progress=False)
    again = _stored(replayed)
    assert all(torch.equal(again[n], written[n]) for n in written)


def test_task_arithmetic_from_a_dense_base_keeps_the_masked_zeros(tmp_path):
    folders = _pruned_folders(tmp_path, [1, 2], [0, 0])
    base = make_vit_folder(tmp_path / "base", 9)
    soup = SoupBuilder.from_pretrained([str(f) for f in folders]).merge_method(
        "task_arithmetic", base=str(base), scaling=0.5
    )
    out = soup.save_pretrained(tmp_path / "soup", progress=False)
    base_weights, weights = _stored(base), [_stored(f) for f in folders]
    mask = load_file(folders[0] / MASK_FILE)
    written = _stored(out)
    for name, tensor in written.items():
        if tensor.is_floating_point():
            theta = base_weights[name] + 0.5 * sum(w[name] - base_weights[name] for w in weights)
            if name in mask:
                theta = theta * mask[name]
            torch.testing.assert_close(tensor, theta, rtol=1e-5, atol=1e-6)
    assert all(bool((written[n][~m] == 0).all()) for n, m in mask.items())


def test_some_ingredients_without_a_mask_need_the_intersection(tmp_path):
    (pruned,) = _pruned_folders(tmp_path, [1], [0])
    dense = make_vit_folder(tmp_path / "dense", 2)
    with pytest.raises(IncompatibleIngredientsError, match="has no pruning_mask"):
        SoupBuilder.from_pretrained([str(pruned), str(dense)])
    soup = SoupBuilder.from_pretrained([str(pruned), str(dense)], masks="intersection").uniform()
    mask = load_file(pruned / MASK_FILE)
    state = soup.state_dict()
    assert all(bool((state[n][~m] == 0).all()) for n, m in mask.items())


def test_the_merge_command_keeps_a_shared_mask_refuses_differing_ones_and_intersects(
    tmp_path, capsys
):
    from hf_soups.cli import main

    shared = _pruned_folders(tmp_path / "shared", [1, 2], [0, 0])
    assert main(["-q", "merge", *map(str, shared), "--out", str(tmp_path / "soup")]) == 0
    mask = load_file(shared[0] / MASK_FILE)
    written = _stored(tmp_path / "soup")
    assert all(torch.equal(load_file(tmp_path / "soup" / MASK_FILE)[n], mask[n]) for n in mask)
    assert all(bool((written[n][~mask[n]] == 0).all()) for n in mask)

    differing = _pruned_folders(tmp_path / "differing", [1, 2], [0, 5])
    args = ["-q", "merge", *map(str, differing)]
    assert main([*args, "--out", str(tmp_path / "refused")]) == 2
    assert "intersection" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    out = tmp_path / "intersected"
    assert main([*args, "--masks", "intersection", "--out", str(out)]) == 0
    a, b = (load_file(f / MASK_FILE) for f in differing)
    weights = [_stored(f) for f in differing]
    written = _stored(out)
    for name in a:
        expected = (weights[0][name] + weights[1][name]) / 2 * (a[name] & b[name])
        torch.testing.assert_close(written[name], expected, rtol=1e-6, atol=1e-7)
    # The recipe replays the mask, and the card's command names the rule.
    replayed = _stored(replay(out, tmp_path / "replayed", progress=False))
    assert all(torch.equal(replayed[n], written[n]) for n in written)
    assert "--masks intersection" in (out / "README.md").read_text()


def test_an_intersection_much_sparser_than_its_masks_is_warned_about(tmp_path, caplog):
    import logging

    differing = _pruned_folders(tmp_path / "differing", [1, 2], [0, 5])
    a, b = (load_file(f / MASK_FILE) for f in differing)
    total = sum(m.numel() for m in a.values())
    expected = 1 - sum(int((a[n] & b[n]).sum()) for n in a) / total
    with caplog.at_level(logging.WARNING, logger="hf_soups"):
        SoupBuilder.from_pretrained([str(f) for f in differing], masks="intersection")
    (message,) = [
        r.getMessage() for r in caplog.records if "intersection of 2 masks" in r.getMessage()
    ]
    assert f"{100 * expected:.1f}% sparse, the sparsest of them 60.0%" in message
    caplog.clear()
    same = _pruned_folders(tmp_path / "same", [1, 2], [0, 0])
    with caplog.at_level(logging.WARNING, logger="hf_soups"):
        SoupBuilder.from_pretrained([str(f) for f in same], masks="intersection")
    assert not [r for r in caplog.records if "intersection" in r.getMessage()]
