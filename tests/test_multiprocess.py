"""Soups, WiSE-FT, saves and pushes under a real `accelerate launch` of 2 CPU processes (gloo).

tests/distributed_soup.py runs the README quick start (greedy soup, save, push to a stand-in Hub)
and a WiSE-FT sweep with `choose_wise_ft`; it is run once launched on 2 processes and once as a
plain single process, and both must write the same folders and push one commit each. A launch
whose main process fails to save must end every process with that error, not hang.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch
from launch import ACCELERATE_CONFIG, ACCELERATE_LAUNCH, free_port
from safetensors.torch import load_file, save_file
from test_push import TOKEN, StandInHub
from tiny import assert_matches_reference, load_weights, make_vit_folder, weighted_reference
from transformers import ViTForImageClassification

from hf_soups.distributed import (
    check_agreement,
    is_main_process,
    main_process_only,
    on_main_process,
)
from hf_soups.errors import OutputExistsError

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "distributed_soup.py"
EXAMPLES = 41  # held-out examples: 21 and 20 on the two processes, batches of 4 with a remainder
NOISE = 0.3  # of each tensor's std: the fine-tunes' spread around their start


def start(tmp_path: Path, processes: int, tail: list[str], hub_url: str = "", **env: str):
    """Start ``python *tail`` alone (``processes=1``) or under ``accelerate launch``."""
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "0" if hub_url else "1",
        "HF_ENDPOINT": hub_url,
        "HF_HUB_DISABLE_XET": "1",
        "HF_TOKEN": TOKEN,
        "HF_TOKEN_PATH": str(tmp_path / "no-token"),
        **env,
    }
    command = [sys.executable, *tail]
    if processes > 1:
        config = tmp_path / "accelerate.yaml"
        config.write_text(ACCELERATE_CONFIG)
        command = [
            *ACCELERATE_LAUNCH, "--config_file", str(config), "--multi_gpu",
            "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(free_port()), *tail,
        ]  # fmt: skip
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(process: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    """The exit code, stdout and stderr of a started run; fails the test after ``timeout``."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"no exit within {timeout} s:\n{err[-3000:]}")
    return process.returncode, out, err


def make_pool(root: Path, count: int = 4, noise: float = NOISE) -> list[str]:
    """Fine-tunes of one start (its weights plus noise), and held-out sets labelled by the start,
    so that averaging away the noise raises accuracy and greedy keeps more than one."""
    start = make_vit_folder(root / "start", seed=0, initializer_range=0.5)
    folders = []
    for i in range(count):
        folder = make_vit_folder(root / f"ft{i}", seed=0, initializer_range=0.5)
        generator = torch.Generator().manual_seed(100 + i)
        weights = load_file(folder / "model.safetensors")
        noisy = {
            name: tensor + noise * tensor.std() * torch.randn(tensor.shape, generator=generator)
            if tensor.is_floating_point() and tensor.numel() > 1
            else tensor
            for name, tensor in weights.items()
        }
        save_file(noisy, folder / "model.safetensors", metadata={"format": "pt"})
        folders.append(str(folder))
    teacher = ViTForImageClassification.from_pretrained(start).eval()
    for name, seed in (("validation", 1), ("shifted", 2)):
        images = torch.randn(EXAMPLES, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
        with torch.inference_mode():
            labels = teacher(pixel_values=images).logits.argmax(-1)
        data = {"pixel_values": images.numpy(), "labels": labels.numpy()}
        datasets.Dataset.from_dict(data).save_to_disk(root / name)
    return folders


def folder_files(folder: Path, run_dir: Path) -> dict[str, object]:
    """Every file's bytes; ``soup.json`` parsed, its environment dropped and the run's own
    folder (where the WiSE-FT end, the soup, was saved) named ``<out>``."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            files[path.relative_to(folder).as_posix()] = path.read_bytes()
    return with_comparable_recipe(files, str(run_dir))


def with_comparable_recipe(files: dict, run_dir: str) -> dict:
    recipe = json.loads(files["soup.json"].decode().replace(run_dir, "<out>"))
    recipe.pop("environment")
    return {**files, "soup.json": recipe}


@pytest.mark.timeout(400)
def test_quick_start_and_wise_ft_on_two_processes_equal_one_process(tmp_path):
    ingredients = make_pool(tmp_path / "pool")
    hubs = {1: StandInHub(), 2: StandInHub()}
    try:
        runs = {}
        for processes, hub in hubs.items():
            out = tmp_path / f"out{processes}"
            args = [str(SCRIPT), "--mode", "soups", "--ingredients", *ingredients]
            args += ["--out", str(out)]
            args += ["--data", str(tmp_path / "pool")]
            runs[processes] = (start(tmp_path, processes, args, hub.url), out)
        started = time.monotonic()
        for processes, (process, _) in runs.items():
            code, _, err = finish(process, timeout=360)
            assert code == 0, f"{processes} process(es):\n{err[-4000:]}"
        print(f"both runs: {time.monotonic() - started:.1f} s")
        seen = {
            processes: [
                json.loads((out / f"process{i}.json").read_text()) for i in range(processes)
            ]
            for processes, (_, out) in runs.items()
        }
        commits = {processes: hub.commits for processes, hub in hubs.items()}
    finally:
        for hub in hubs.values():
            hub.close()

    single, (rank0, rank1) = seen[1][0], seen[2]
    assert single["num_processes"] == 1 and rank0["num_processes"] == rank1["num_processes"] == 2
    # Every process got the main process's path and commit, and took the same decisions.
    for key in ("kept", "saved", "commit", "alpha", "wise_ft_saved"):
        assert rank0[key] == rank1[key], key
    assert rank0["kept"] == single["kept"] and rank0["alpha"] == single["alpha"]
    # One commit per run (not one per process), holding the same files.
    assert [len(commits[1]), len(commits[2])] == [1, 1]
    assert commits[2][0]["revision"] == "main" and rank0["commit"] != ""
    pushed = {
        processes: with_comparable_recipe(dict(commits[processes][0]["files"]), "<none>")
        for processes in (1, 2)
    }
    assert "README.md" in pushed[2] and "model.safetensors" in pushed[2]
    assert pushed[2] == pushed[1]
    # The same folders, byte for byte (the recipe apart from its environment).
    out1, out2 = runs[1][1], runs[2][1]
    for name in ("greedy-soup", "wise-ft"):
        assert folder_files(out2 / name, out2) == folder_files(out1 / name, out1), name
    assert pushed[2]["model.safetensors"] == (out2 / "greedy-soup/model.safetensors").read_bytes()
    # And the soup is the plain average of the ingredients greedy kept.
    kept = [folder for folder in ingredients if any(folder.endswith(k) for k in rank0["kept"])]
    assert len(kept) == len(rank0["kept"]) >= 2  # a real average (3 of 4 on this pool)
    reference = weighted_reference(kept, [1 / len(kept)] * len(kept))
    assert_matches_reference(load_weights(out2 / "greedy-soup"), reference)
    # Nothing left beside the outputs (no second process's temporary folder).
    assert sorted(p.name for p in out2.iterdir()) == [
        "greedy-soup",
        "process0.json",
        "process1.json",
        "wise-ft",
    ]


@pytest.mark.timeout(200)
def test_a_failed_save_on_the_main_process_ends_every_process_with_its_error(tmp_path):
    ingredients = make_pool(tmp_path / "pool", count=2)
    out = tmp_path / "out"
    out.mkdir()
    args = [str(SCRIPT), "--mode", "fail", "--ingredients", *ingredients, "--out", str(out)]
    started = time.monotonic()
    code, out_text, err = finish(start(tmp_path, 2, args), timeout=150)
    output = out_text + err
    print(f"failing launch: {time.monotonic() - started:.1f} s")

    assert code != 0
    message = f"{out}: already exists and is not empty"
    for rank in (0, 1):
        assert f"process {rank} raised OutputExistsError: {message}" in output, output[-4000:]
        # A disagreement is found by every process, and names every process's value.
        seen = json.loads((out / f"process{rank}.json").read_text())
        assert seen["disagreement"] == (
            "ProcessesDisagreeError: processes disagree on a test decision: process 0: "
            '{"alpha": 0.0}; process 1: {"alpha": 0.5}'
        )
        # An error outside hf_soups' own: as it is on the main process, named on the others.
        assert seen["foreign_error"] == (
            "ValueError: invalid literal for int() with base 10: 'not a number'"
            if rank == 0
            else "MainProcessError: the main process raised ValueError: invalid literal for "
            "int() with base 10: 'not a number'"
        )
    assert sorted(p.name for p in out.iterdir()) == ["process0.json", "process1.json"]
    assert not list(tmp_path.glob(".out.tmp-*"))


@pytest.mark.timeout(200)
def test_processes_that_accelerate_runs_alone_refuse_to_write(tmp_path):
    (ingredient,) = make_pool(tmp_path / "pool", count=1)
    out = tmp_path / "out"
    args = [str(SCRIPT), "--mode", "alone", "--ingredients", ingredient, "--out", str(out)]
    started = time.monotonic()
    code, _, err = finish(start(tmp_path, 2, args), timeout=150)
    print(f"launch run alone: {time.monotonic() - started:.1f} s")

    assert code != 0
    for rank in (0, 1):
        assert (
            f"process {rank} raised HfSoupsError: 2 processes were launched but Accelerate runs "
            "this one alone"
        ) in err, err[-4000:]
    assert not out.exists()


EVAL_RECIPE = """\
eval_sets:
  id: {dataset: validation, batch_size: 4}
  shifted: {dataset: shifted, batch_size: 4}
select: {target: [id], preserve: [shifted]}
"""


@pytest.mark.timeout(200)
def test_the_wise_ft_command_on_two_cpu_processes_writes_and_prints_once(tmp_path):
    zero_shot, fine_tuned = make_pool(tmp_path / "pool", count=2)
    recipe = tmp_path / "pool" / "eval.yaml"
    recipe.write_text(EVAL_RECIPE)
    out = tmp_path / "wise-ft"
    command = ["-m", "hf_soups.cli", "wise-ft", zero_shot, fine_tuned, "--sweep", "0,0.5,1"]
    command += ["--recipe", str(recipe), "--out", str(out)]
    started = time.monotonic()
    # The command's Evaluators make their own Accelerator: the environment puts it on CPU.
    code, printed, err = finish(start(tmp_path, 2, command, ACCELERATE_USE_CPU="1"), timeout=150)
    print(f"wise-ft command: {time.monotonic() - started:.1f} s")

    assert code == 0, err[-4000:]
    # The table, the choice and the last line, printed by the main process only.
    assert printed.count("alpha ") == 1 and printed.count("Wrote WiSE-FT alpha=") == 1
    assert printed.count("maximises the mean of the scores on id and on shifted") == 1
    recipe = json.loads((out / "soup.json").read_text())
    assert recipe["method"] == "wise_ft" and recipe["patch"]["sweep"]["alphas"] == [0, 0.5, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accelerate.yaml", "pool", "wise-ft"]


def test_in_a_single_process_the_helpers_are_plain_calls(monkeypatch):
    for variable in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(variable, raising=False)
    unpicklable = lambda: None  # noqa: E731 - nothing is sent anywhere, so anything goes
    assert on_main_process(lambda a, b=0: (a + b, unpicklable), 1, b=2) == (3, unpicklable)
    error = OutputExistsError("out: already exists")

    @main_process_only
    def save(path: str) -> str:
        """Write something."""
        raise error

    with pytest.raises(OutputExistsError) as caught:
        save("out")
    assert caught.value is error  # the error itself, not a copy
    assert save.__name__ == "save" and save.__doc__ == "Write something."
    assert check_agreement({"kept": ["a", "b"]}, "the kept set") is None
    assert is_main_process()
    assert not torch.distributed.is_initialized()
