"""WiSEFTCallback checked against what the test keeps itself.

A tiny ViT, pre-trained on upright and inverted digits (scikit-learn's), is fine-tuned on upright
ones with the real ``Trainer``. The test writes the starting weights before training and the
final ones when training ends (a callback listed before WiSE-FT) and scores them with its own
Evaluators. It compares the sweep's endpoint rows with those scores, the chosen ``alpha`` with
the selection rule worked out by hand, and the written folder and the swapped-in weights with
``(1 - alpha) * start + alpha * final`` in float64 from those files. A run interrupted and
resumed from a checkpoint must still interpolate with the weights training started from. Under
``accelerate launch`` with 2 CPU processes, both must end with the weights the main process
alone wrote, and the gathered scores must equal one process's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
from functools import cache
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset
from transformers import (
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)

from hf_soups.callbacks import WiSEFTCallback
from hf_soups.callbacks.wise_ft import STATE_FILE
from hf_soups.errors import HfSoupsError, OutputExistsError
from hf_soups.evaluation import Evaluator

os.environ["HF_HUB_OFFLINE"] = "1"

N_TRAIN, N_EVAL = 320, 160


pytestmark = pytest.mark.usefixtures("one_thread")


@cache
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits as 3x16x16 images in [-1, 1], and their labels."""
    x, y = load_digits(return_X_y=True)
    images = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 8 - 1
    images = F.interpolate(images, size=16, mode="nearest").repeat(1, 3, 1, 1)
    return images, torch.tensor(y)


class Digits(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.images[i], "labels": self.labels[i]}


def train_set() -> Digits:
    images, labels = digits()
    return Digits(images[:N_TRAIN], labels[:N_TRAIN])


def eval_sets(accelerator: Accelerator | None) -> dict[str, Evaluator]:
    """Held-out digits (ID) and the same digits inverted (a shift fine-tuning does not see)."""
    images, labels = digits()
    held_out = slice(N_TRAIN, N_TRAIN + N_EVAL)
    data = {"id": images[held_out], "inverted": -images[held_out]}
    return {
        name: Evaluator(
            DataLoader(TensorDataset(x, labels[held_out]), batch_size=64),
            accelerator=accelerator,
            progress=False,
            n_resamples=0,
        )
        for name, x in data.items()
    }


@pytest.fixture
def accelerator() -> Accelerator:
    # Per test: building TrainingArguments resets Accelerate's shared state, which a new
    # Accelerator (or the Trainer's) sets up again.
    return Accelerator(cpu=True)


def tiny_vit(seed: int) -> ViTForImageClassification:
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=16,
        patch_size=8,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        num_labels=10,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return ViTForImageClassification(config)


@cache
def pretrained_weights() -> dict[str, torch.Tensor]:
    """A start that knows both upright and inverted digits, as a zero-shot model would know
    shifts that fine-tuning on upright digits alone makes it forget."""
    model = tiny_vit(seed=0)
    images, labels = digits()
    images = torch.cat([images[:N_TRAIN], -images[:N_TRAIN]])
    labels = torch.cat([labels[:N_TRAIN], labels[:N_TRAIN]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(150):
        batch = torch.randint(0, len(labels), (32,), generator=generator)
        loss = model(pixel_values=images[batch], labels=labels[batch]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def pretrained_vit() -> ViTForImageClassification:
    model = tiny_vit(seed=0)
    model.load_state_dict(pretrained_weights())
    return model


def make_args(output_dir: Path, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        per_device_train_batch_size=32,
        max_steps=30,
        learning_rate=3e-3,
        save_strategy="no",
        report_to=[],
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


class SaveFinal(TrainerCallback):
    """Writes the model at the end of training, before the callbacks listed after it run."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_end(self, args, state, control, model=None, **kwargs):
        model.save_pretrained(self.folder)


class Interrupt(TrainerCallback):
    """Aborts training after a given step, as a crash would: no on_train_end."""

    class Stop(Exception):
        pass

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Interrupt.Stop


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """A folder's tensors by on-disk name, read with safetensors only."""
    return load_file(Path(folder) / "model.safetensors")


def reference(start: Path, final: Path, alpha: float) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * start + alpha * final`` in float64, from the two folders' files."""
    theta_0, theta_1 = weights(start), weights(final)
    return {k: (1 - alpha) * theta_0[k].double() + alpha * theta_1[k].double() for k in theta_0}


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def in_memory(folder_weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """On-disk tensors turned into a ViT's in-memory state dict (the names differ)."""
    model = ViTForImageClassification.from_pretrained(
        None, config=tiny_vit(0).config, state_dict=folder_weights
    )
    return model.state_dict()


def test_sweep_choice_written_folder_and_swap(tmp_path, accelerator):
    model = pretrained_vit()
    processor = ViTImageProcessor(size={"height": 16, "width": 16})
    start, final = tmp_path / "start", tmp_path / "final"
    model.save_pretrained(start)
    callback = WiSEFTCallback(
        {"id": eval_sets(accelerator)["id"]},
        {"inverted": eval_sets(accelerator)["inverted"]},
        alphas=[0, 0.5, 1],
        save_dir=tmp_path / "chosen",
    )
    trainer = Trainer(
        model=model,
        args=make_args(tmp_path / "run"),
        train_dataset=train_set(),
        processing_class=processor,
        callbacks=[SaveFinal(final), callback],
    )
    trainer.train()
    result = callback.result

    # The endpoint rows are the scores of the models the test kept, by its own Evaluators.
    mine = eval_sets(accelerator)
    for alpha, folder in ((0.0, start), (1.0, final)):
        kept = ViTForImageClassification.from_pretrained(folder)
        row = result.sweep.alphas.index(alpha)
        for name, evaluator in mine.items():
            expected = evaluator.evaluate(kept)
            swept = result.sweep.results[name][row]
            assert swept.metrics == expected.metrics, (name, alpha)
            assert (swept.predictions == expected.predictions).all(), (name, alpha)
    scores = result.sweep.scores
    # Not a vacuous sweep: fine-tuning raised the ID score and lost much of the shifted one.
    assert scores["id"][2] > scores["id"][0] + 0.05
    assert scores["inverted"][2] < scores["inverted"][0] - 0.2

    # WiSE-FT's rule by hand: the mean of the ID and shifted scores, ties to the smallest alpha.
    objective = [(scores["id"][i] + scores["inverted"][i]) / 2 for i in range(3)]
    best = max(objective)
    expected_alpha = min(a for a, o in zip([0.0, 0.5, 1.0], objective) if o >= best - 1e-12)
    assert result.alpha == expected_alpha

    # The written folder holds (1 - alpha) * start + alpha * final, its recipe and plot.
    expected = reference(start, final, result.alpha)
    chosen = tmp_path / "chosen"
    assert max_difference(weights(chosen), expected) < 1e-6
    recipe = json.loads((chosen / "soup.json").read_text())
    assert recipe["patch"]["chosen_alpha"] == result.alpha
    assert recipe["patch"]["sweep"]["scores"] == scores
    assert (chosen / "wise_ft_sweep.png").stat().st_size > 0
    assert (chosen / "preprocessor_config.json").is_file()
    # The two ends are the weights the run started from and ended with, bit for bit.
    assert max_difference(weights(callback.zero_shot_dir), weights(start)) == 0.0
    assert max_difference(weights(result.fine_tuned.path), weights(final)) == 0.0

    # swap_at_end: the trainer's model now holds the chosen weights.
    live = {k: v.detach() for k, v in trainer.model.state_dict().items()}
    assert max_difference(live, in_memory({k: v.float() for k, v in expected.items()})) < 1e-6
    assert max_difference(live, in_memory(weights(final))) > 1e-3 or result.alpha == 1.0


def test_resume_interpolates_with_the_weights_training_started_from(tmp_path, accelerator):
    start, final = tmp_path / "start", tmp_path / "final"
    args = make_args(tmp_path / "run", max_steps=8, save_strategy="steps", save_steps=3)
    model = pretrained_vit()
    model.save_pretrained(start)
    first = WiSEFTCallback(eval_sets(accelerator), alphas=[0.3])
    trainer = Trainer(
        model=model, args=args, train_dataset=train_set(), callbacks=[first, Interrupt(4)]
    )
    with pytest.raises(Interrupt.Stop):
        trainer.train()
    record = json.loads((tmp_path / "run" / "checkpoint-3" / STATE_FILE).read_text())
    assert Path(record["zero_shot"]) == first.zero_shot_dir.resolve()

    # A fresh callback, and the model as resuming leaves it: with the checkpoint's weights. (Read
    # with from_pretrained: the Trainer's own checkpoint loading, a load_state_dict of on-disk
    # names, misses ViT's renamed encoder tensors under transformers 5.)
    resumed = WiSEFTCallback(eval_sets(accelerator), alphas=[0.3], save_dir=tmp_path / "chosen")
    checkpoint = tmp_path / "run" / "checkpoint-3"
    trainer = Trainer(
        model=ViTForImageClassification.from_pretrained(checkpoint),
        args=args,
        train_dataset=train_set(),
        callbacks=[SaveFinal(final), resumed],
    )
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 8
    assert max_difference(weights(resumed.result.zero_shot.path), weights(start)) == 0.0
    assert max_difference(weights(checkpoint), weights(start)) > 1e-3
    expected = reference(start, final, 0.3)
    assert max_difference(weights(tmp_path / "chosen"), expected) < 1e-6
    live = {k: v.detach() for k, v in trainer.model.state_dict().items()}
    assert max_difference(live, in_memory({k: v.float() for k, v in expected.items()})) < 1e-6
    # Not a trivial pass: the interpolation is far from either end.
    assert max_difference(expected, weights(start)) > 1e-3
    assert max_difference(expected, weights(final)) > 1e-3

    # Without the starting weights a resumed run refuses to guess them.
    shutil.rmtree(resumed.zero_shot_dir)
    lost = WiSEFTCallback(eval_sets(accelerator), alphas=[0.3])
    trainer = Trainer(
        model=tiny_vit(seed=9), args=args, train_dataset=train_set(), callbacks=[lost]
    )
    with pytest.raises(HfSoupsError, match="zero_shot"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-6"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(in_distribution={}), "in_distribution"),
        (dict(in_distribution={"a": len}, shifted={"a": len}), "'a'"),
        (dict(in_distribution={"a": len}, alphas=[]), "alphas"),
        (dict(in_distribution={"a": len}, alphas=[0.5, 0.5]), "duplicates"),
        (dict(in_distribution={"a": len}, max_shifted_drop=-0.1), "max_shifted_drop"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WiSEFTCallback(**kwargs)


def test_refuses_before_training_what_it_could_not_finish(tmp_path):
    args = make_args(tmp_path / "run")
    state, control = TrainerState(), TrainerControl()
    callback = WiSEFTCallback({"a": len})
    with pytest.raises(HfSoupsError, match="Linear"):
        callback.on_train_begin(args, state, control, model=torch.nn.Linear(2, 2))
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "file").write_text("x")
    callback = WiSEFTCallback({"a": len}, save_dir=occupied)
    with pytest.raises(OutputExistsError, match="occupied"):
        callback.on_train_begin(args, state, control, model=tiny_vit(0))


# ---- two processes ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_on_this_rank(out: Path, start: Path) -> None:
    """Run under ``accelerate launch``: fine-tune from ``start`` with WiSE-FT, then record what
    this rank ends with (its weights, the choice, the folders it wrote)."""
    model = ViTForImageClassification.from_pretrained(start)
    # The Evaluators create their Accelerator under the launch's process group: each rank
    # scores its shard of the data and gathers the rest.
    callback = WiSEFTCallback(
        {"id": eval_sets(None)["id"]},
        {"inverted": eval_sets(None)["inverted"]},
        alphas=[0, 0.5, 1],
        save_dir=out / "chosen",
        endpoints_dir=out / "endpoints",
    )
    args = make_args(out / "run", max_steps=6, per_device_train_batch_size=16)
    trainer = Trainer(model=model, args=args, train_dataset=train_set(), callbacks=[callback])
    saves = []
    save_pretrained = model.save_pretrained

    def recording_save_pretrained(directory, *a, **k):
        saves.append(Path(directory).name)
        return save_pretrained(directory, *a, **k)

    model.save_pretrained = recording_save_pretrained
    trainer.train()
    rank = args.process_index
    live = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(live, out / f"rank{rank}.safetensors")
    info = {
        "world_size": torch.distributed.get_world_size(),
        "backend": torch.distributed.get_backend(),
        "alpha": callback.result.alpha,
        "scores": callback.result.sweep.scores,
        "should_save": args.should_save,
        "saves": saves,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(info))


@pytest.mark.skipif(
    shutil.which("accelerate") is None, reason="the accelerate CLI is not installed"
)
def test_two_processes_end_with_the_main_process_choice(tmp_path, accelerator):
    start = tmp_path / "start"
    pretrained_vit().save_pretrained(start)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    command = [
        shutil.which("accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
        __file__, str(tmp_path), str(start),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]

    infos = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # A silent fallback to one process would fail here.
    assert [(i["world_size"], i["backend"]) for i in infos] == [(2, "gloo")] * 2
    assert [i["should_save"] for i in infos] == [True, False]
    # Only the main process wrote the two ends (the chosen model is merged from their files).
    assert [len(i["saves"]) for i in infos] == [2, 0]
    assert infos[0]["alpha"] == infos[1]["alpha"]
    assert infos[0]["scores"] == infos[1]["scores"]
    # The gathered scores of the two ends are one process's scores of the same folders.
    endpoints = tmp_path / "endpoints"
    for row, folder in ((0, endpoints / "zero_shot"), (2, endpoints / "fine_tuned")):
        kept = ViTForImageClassification.from_pretrained(folder)
        for name, evaluator in eval_sets(accelerator).items():
            assert infos[0]["scores"][name][row] == evaluator.evaluate(kept).score, (name, row)
    assert max_difference(weights(endpoints / "zero_shot"), weights(start)) == 0.0
    # Both ranks hold the weights the main process wrote, (1 - a) * start + a * fine-tuned.
    alpha = infos[0]["alpha"]
    expected = reference(start, endpoints / "fine_tuned", alpha)
    assert max_difference(weights(tmp_path / "chosen"), expected) < 1e-6
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    assert max_difference(ranks[0], ranks[1]) == 0.0
    assert max_difference(ranks[0], in_memory({k: v.float() for k, v in expected.items()})) < 1e-6


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one rank of the two-process WiSE-FT test")
    parser.add_argument("out", type=Path)
    parser.add_argument("start", type=Path)
    cli = parser.parse_args()
    torch.set_num_threads(1)
    train_on_this_rank(cli.out, cli.start)
