"""Trainer callbacks checked against independent references.

SWA against torch.optim.swa_utils (AveragedModel, SWALR, update_bn) on the recorded training
trajectory; EMA against its recursion written out in float64 with timm ModelEmaV3's decay;
resume against an uninterrupted run; 2-process ``accelerate launch`` against one process with
the same global batch; ingredients against what the Trainer logged and trained.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from launch import ACCELERATE_LAUNCH
from safetensors.torch import load_file
from tiny_training import TinyNet, Vectors, make_args, max_difference
from torch import nn
from torch.optim.swa_utils import SWALR, AveragedModel
from torch.optim.swa_utils import update_bn as torch_update_bn
from transformers import (
    Trainer,
    TrainerCallback,
    ViTForImageClassification,
    ViTImageProcessor,
    get_linear_schedule_with_warmup,
)

from hf_soups.callbacks import EMACallback, IngredientCallback, SWACallback
from hf_soups.callbacks._batchnorm import update_bn
from hf_soups.callbacks._weights import swapped_in
from hf_soups.errors import OutputExistsError
from hf_soups.ingredients import Ingredient

os.environ["HF_HUB_OFFLINE"] = "1"

_spec = importlib.util.spec_from_file_location(
    "distributed_train", Path(__file__).with_name("distributed_train.py")
)
distributed_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(distributed_train)
RandomImages = distributed_train.RandomImages
tiny_vit = distributed_train.tiny_vit


pytestmark = pytest.mark.usefixtures("one_thread")


class Recorder(TrainerCallback):
    """Records, after each optimizer step, the model weights and the watched callback's average."""

    def __init__(self, watch=None) -> None:
        self.watch = watch
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.averages: dict[int, dict[str, torch.Tensor]] = {}
        self.lrs: dict[int, list[float]] = {}
        self.micro_steps = 0

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.lrs[state.global_step + 1] = [g["lr"] for g in optimizer.param_groups]

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        step = state.global_step + 1
        self.weights[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if self.watch is not None:
            self.averages[step] = self.watch.averaged_state_dict()

    def on_substep_end(self, args, state, control, **kwargs):
        self.micro_steps += 1

    def on_step_end(self, args, state, control, **kwargs):
        self.micro_steps += 1


# ---- SWA ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("swa_start", "every", "expected_steps"), [(3, 3, [3, 6, 9]), (0.5, 2, [5, 7, 9])]
)
def test_swa_equals_averaged_model_on_the_same_trajectory(
    tmp_path, swa_start, every, expected_steps
):
    model = tiny_vit()
    swa = SWACallback(swa_start=swa_start, every_n_steps=every, save_dir=tmp_path / "swa")
    recorder = Recorder()
    args = make_args(tmp_path / "run", max_steps=10, gradient_accumulation_steps=2)
    trainer = Trainer(
        model=model, args=args, train_dataset=RandomImages(64), callbacks=[swa, recorder]
    )
    trainer.train()

    # Averaging counts optimizer steps: 10 of them over 20 micro-batches.
    assert sorted(recorder.weights) == list(range(1, 11))
    assert recorder.micro_steps == 20
    reference = AveragedModel(tiny_vit(seed=1))
    holder = tiny_vit(seed=2)
    for step in expected_steps:
        holder.load_state_dict(recorder.weights[step])
        reference.update_parameters(holder)
    assert swa.n_averaged == len(expected_steps)
    expected = {name: p.detach() for name, p in reference.module.named_parameters()}
    averaged = swa.averaged_state_dict()
    assert all(t.dtype == torch.float32 for t in averaged.values())
    assert max_difference(averaged, expected) < 1e-6
    # Not a trivial pass: the average is far from the final training weights.
    assert max_difference(expected, {k: recorder.weights[10][k] for k in expected}) > 1e-3

    # swap_at_end loaded the average into the model; save_dir holds it as a model folder.
    live = {name: p.detach() for name, p in model.named_parameters()}
    assert max_difference(live, expected) < 1e-6
    saved = ViTForImageClassification.from_pretrained(tmp_path / "swa")
    assert max_difference({n: p.detach() for n, p in saved.named_parameters()}, expected) < 1e-6


@pytest.mark.parametrize(("anneal_steps", "strategy"), [(4, "cos"), (3, "linear"), (0, "cos")])
def test_swa_learning_rate_follows_swalr(tmp_path, anneal_steps, strategy):
    swa_start, max_steps, swa_lr = 5, 12, 0.02
    swa = SWACallback(
        swa_start=swa_start, swa_lr=swa_lr, anneal_steps=anneal_steps, anneal_strategy=strategy
    )
    recorder = Recorder()
    args = make_args(tmp_path, max_steps=max_steps, learning_rate=0.1, warmup_steps=2, optim="sgd")
    Trainer(
        model=TinyNet(), args=args, train_dataset=Vectors(48), callbacks=[swa, recorder]
    ).train()

    # Reference: torch's SWALR takes over from the Trainer's schedule after step swa_start.
    groups = [{"params": [nn.Parameter(torch.zeros(1))]} for _ in recorder.lrs[1]]
    optimizer = torch.optim.SGD(groups, lr=0.1)
    schedule = get_linear_schedule_with_warmup(optimizer, 2, max_steps)
    swalr = None
    for step in range(1, max_steps + 1):
        expected = [g["lr"] for g in optimizer.param_groups]
        assert recorder.lrs[step] == pytest.approx(expected, rel=1e-9, abs=1e-12), step
        optimizer.step()
        if step == swa_start:
            swalr = SWALR(
                optimizer, swa_lr=swa_lr, anneal_epochs=anneal_steps, anneal_strategy=strategy
            )
            swalr.step()
        elif step > swa_start:
            swalr.step()
        else:
            schedule.step()
    assert recorder.lrs[max_steps][0] == pytest.approx(swa_lr)


def test_swa_batchnorm_update_equals_torch_update_bn(tmp_path):
    data = Vectors(24)
    model = TinyNet(batch_norm=True)
    swa = SWACallback(swa_start=2, bn_update=True)
    recorder = Recorder()
    args = make_args(tmp_path, max_steps=6, train_sampling_strategy="sequential")
    Trainer(model=model, args=args, train_dataset=data, callbacks=[swa, recorder]).train()

    reference = TinyNet(batch_norm=True, seed=3)
    reference.load_state_dict(swa.averaged_state_dict(), strict=False)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.x), batch_size=4)
    torch_update_bn(loader, reference)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        expected = getattr(reference.bn, name)
        assert torch.allclose(
            getattr(model.bn, name).double(), expected.double(), rtol=1e-5, atol=1e-6
        ), name
    # The statistics did change: training left momentum-averaged ones.
    assert not torch.allclose(
        recorder.weights[6]["bn.running_var"], reference.bn.running_var, atol=1e-3
    )


def test_swapped_in_restores_parameters_and_batchnorm_statistics():
    model = TinyNet(batch_norm=True)
    model.bn.running_mean.fill_(0.25)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    from hf_soups.callbacks import AveragedWeights

    averaged = AveragedWeights(model, include_buffers=False)
    for t in averaged.tensors:
        t.fill_(0.5)
    with swapped_in(averaged, model):
        assert torch.all(model.fc1.weight == 0.5)
        update_bn([{"x": torch.randn(4, 6)}], model)
        assert not torch.allclose(model.bn.running_mean, before["bn.running_mean"])
    assert max_difference(model.state_dict(), before) == 0.0


# ---- EMA ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        dict(decay=0.9, use_warmup=False),
        dict(
            decay=0.95,
            use_warmup=True,
            warmup_gamma=1.0,
            warmup_power=0.75,
            min_decay=0.1,
            update_after_step=1,
        ),
    ],
)
def test_ema_follows_the_reference_recursion_step_by_step(tmp_path, settings):
    ema = EMACallback(**settings)
    recorder = Recorder(watch=ema)
    args = make_args(tmp_path, max_steps=8, gradient_accumulation_steps=2)
    Trainer(
        model=TinyNet(), args=args, train_dataset=Vectors(64), callbacks=[ema, recorder]
    ).train()
    assert recorder.micro_steps == 16

    def timm_decay(update: int) -> float:
        # timm ModelEmaV3.get_decay, as written there.
        step = max(0, update - settings.get("update_after_step", 0) - 1)
        if step <= 0:
            return 0.0
        if settings.get("use_warmup"):
            value = 1 - (1 + step / settings["warmup_gamma"]) ** -settings["warmup_power"]
            return max(min(value, settings["decay"]), settings.get("min_decay", 0.0))
        return settings["decay"]

    reference = None
    for step in range(1, 9):
        weights = {k: v.double() for k, v in recorder.weights[step].items()}
        d = timm_decay(step)
        reference = (
            weights
            if reference is None
            else {k: d * reference[k] + (1 - d) * weights[k] for k in weights}
        )
        assert max_difference(recorder.averages[step], reference) < 1e-6, step
    assert ema.n_averaged == 8


def test_ema_evaluates_on_averaged_weights_and_checkpoints_keep_training_weights(tmp_path):
    ema = EMACallback(decay=0.5, evaluate_with_average=True, swap_at_end=False)
    recorder = Recorder(watch=ema)
    seen_in_eval = []

    class EvalProbe(TrainerCallback):
        def on_prediction_step(self, args, state, control, model=None, **kwargs):
            live = {k: v.detach() for k, v in model.state_dict().items()}
            seen_in_eval.append(
                (state.global_step, max_difference(live, recorder.averages[state.global_step]))
            )

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step:
                live = {k: v.detach() for k, v in model.state_dict().items()}
                assert max_difference(live, recorder.weights[state.global_step]) == 0.0

    eval_data = Vectors(8, seed=5)
    args = make_args(
        tmp_path,
        max_steps=6,
        eval_strategy="steps",
        eval_steps=3,
        save_strategy="steps",
        save_steps=3,
        per_device_eval_batch_size=4,
    )
    trainer = Trainer(
        model=TinyNet(),
        args=args,
        train_dataset=Vectors(24),
        eval_dataset=eval_data,
        callbacks=[ema, recorder, EvalProbe()],
    )
    trainer.train()
    assert [step for step, _ in seen_in_eval] == [3, 3, 6, 6]
    assert all(diff == 0.0 for _, diff in seen_in_eval)

    # The logged eval loss is the averaged model's loss.
    reference = TinyNet(seed=7)
    reference.load_state_dict(recorder.averages[3])
    with torch.no_grad():
        expected_loss = reference(eval_data.x, eval_data.labels)["loss"].item()
    logged = next(
        e["eval_loss"] for e in trainer.state.log_history if e.get("step") == 3 and "eval_loss" in e
    )
    assert logged == pytest.approx(expected_loss, rel=1e-5)
    # Checkpoints hold training weights; the model ends with them too (swap_at_end=False).
    saved = load_file(tmp_path / "checkpoint-3" / "model.safetensors")
    assert max_difference(saved, recorder.weights[3]) == 0.0
    live = {k: v.detach() for k, v in trainer.model.state_dict().items()}
    assert max_difference(live, recorder.weights[6]) == 0.0


# ---- resume ---------------------------------------------------------------------------------


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _resume_run(output_dir, model_seed, extra_callbacks=(), resume=None):
    swa = SWACallback(swa_start=3, every_n_steps=2, swa_lr=0.02, anneal_steps=3)
    # Only one averaging callback may load its weights at the end.
    ema = EMACallback(decay=0.7, swap_at_end=False)
    args = make_args(
        output_dir, max_steps=10, gradient_accumulation_steps=2, save_strategy="steps", save_steps=4
    )
    trainer = Trainer(
        model=TinyNet(seed=model_seed),
        args=args,
        train_dataset=Vectors(40),
        callbacks=[swa, ema, *extra_callbacks],
    )
    trainer.train(resume_from_checkpoint=resume)
    return swa, ema, trainer


def test_resumed_run_continues_the_same_averages(tmp_path):
    swa_a, ema_a, _ = _resume_run(tmp_path / "a", model_seed=0)

    _resume_run(tmp_path / "b", model_seed=0, extra_callbacks=[StopAt(6)])
    checkpoint = tmp_path / "b" / "checkpoint-4"
    record = json.loads((checkpoint / "hf_soups_swa_state.json").read_text())
    assert record["n_averaged"] == 1 and record["global_step"] == 4
    assert json.loads((checkpoint / "hf_soups_ema_state.json").read_text())["n_averaged"] == 4
    # Fresh callbacks and a differently initialised model: everything comes from the checkpoint.
    swa_b, ema_b, _ = _resume_run(tmp_path / "b", model_seed=9, resume=True)

    assert swa_b.n_averaged == swa_a.n_averaged == 4
    assert ema_b.n_averaged == ema_a.n_averaged == 10
    assert max_difference(swa_b.averaged_state_dict(), swa_a.averaged_state_dict()) < 1e-6
    assert max_difference(ema_b.averaged_state_dict(), ema_a.averaged_state_dict()) < 1e-6


# ---- multi-process --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_average_like_one_process_with_the_same_global_batch(tmp_path):
    script = Path(__file__).with_name("distributed_train.py")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("ACCELERATE_USE_CPU", None)
    command = [
        *ACCELERATE_LAUNCH,
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        str(script),
        str(tmp_path / "multi"),
        "--per-device-batch",
        str(distributed_train.GLOBAL_BATCH // 2),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    single = distributed_train.train(tmp_path / "single", distributed_train.GLOBAL_BATCH)

    multi = tmp_path / "multi"
    infos = [json.loads((multi / f"rank{r}-info.json").read_text()) for r in (0, 1)]
    # A silent fallback to one process would fail here.
    assert [i["dist_world_size"] for i in infos] == [2, 2]
    assert all(i["backend"] == "gloo" for i in infos)
    # Only the main process wrote model folders.
    assert len(infos[0]["saves"]) == 2 and infos[1]["saves"] == []
    assert sorted(p.name for p in multi.iterdir() if p.is_dir()) == [
        "ema-model",
        "run",
        "swa-model",
    ]
    for kind in ("swa", "ema"):
        rank0 = load_file(multi / f"rank0-{kind}.safetensors")
        rank1 = load_file(multi / f"rank1-{kind}.safetensors")
        assert max_difference(rank0, rank1) == 0.0
        # Gradients all-reduced over two half batches differ from one full batch's by float32
        # rounding only; over 6 SGD steps that stays below 1e-6 on weights of order 1.
        assert max_difference(rank0, single[kind]) < 1e-6, kind
        saved = ViTForImageClassification.from_pretrained(multi / f"{kind}-model")
        assert (
            max_difference(
                {n: p.detach() for n, p in saved.named_parameters()},
                {n: rank0[n] for n, _ in saved.named_parameters()},
            )
            < 1e-7
        )


# ---- ingredients ----------------------------------------------------------------------------


def test_ingredient_callback_writes_soup_ingredients(tmp_path):
    model = tiny_vit()
    processor = ViTImageProcessor(size={"height": 16, "width": 16})
    callback = IngredientCallback(
        sweep_dir=tmp_path / "sweep",
        name="run-a",
        every_n_steps=2,
        extra_hyperparameters={"augment": "flip"},
    )
    recorder = Recorder()
    args = make_args(
        tmp_path / "run",
        max_steps=4,
        learning_rate=3e-3,
        weight_decay=0.01,
        seed=5,
        label_smoothing_factor=0.1,
        eval_strategy="steps",
        eval_steps=2,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=RandomImages(16),
        eval_dataset=RandomImages(8, seed=3),
        processing_class=processor,
        callbacks=[callback, recorder],
    )
    trainer.train()

    sweep = tmp_path / "sweep"
    assert sorted(p.name for p in sweep.iterdir()) == ["run-a", "run-a-step2", "run-a-step4"]
    logged_eval = {e["step"]: e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e}
    for folder, step in [("run-a-step2", 2), ("run-a-step4", 4), ("run-a", 4)]:
        path = sweep / folder
        assert {
            "config.json",
            "model.safetensors",
            "preprocessor_config.json",
            "ingredient.json",
        } <= {p.name for p in path.iterdir()}
        record = json.loads((path / "ingredient.json").read_text())
        assert record["step"] == step
        assert record["metrics"]["eval_loss"] == pytest.approx(logged_eval[step])
        hp = record["hyperparameters"]
        assert hp["learning_rate"] == 3e-3 and hp["weight_decay"] == 0.01 and hp["seed"] == 5
        assert hp["label_smoothing_factor"] == 0.1 and hp["per_device_train_batch_size"] == 4
        assert hp["num_train_epochs"] == args.num_train_epochs and hp["augment"] == "flip"
        loaded = ViTForImageClassification.from_pretrained(path)
        assert max_difference(loaded.state_dict(), recorder.weights[step]) == 0.0
        assert Ingredient.from_folder(path).metadata == record

    # A second run with the same name refuses to start rather than fail after training.
    again = Trainer(
        model=tiny_vit(),
        args=make_args(tmp_path / "run2", max_steps=1),
        train_dataset=RandomImages(16),
        callbacks=[IngredientCallback(sweep_dir=sweep, name="run-a")],
    )
    with pytest.raises(OutputExistsError, match="run-a"):
        again.train()


# ---- arguments ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: SWACallback(swa_start=0), "swa_start"),
        (lambda: SWACallback(swa_start=1.5), "swa_start"),
        (lambda: SWACallback(every_n_steps=0), "every_n_steps"),
        (lambda: SWACallback(anneal_strategy="step"), "anneal_strategy"),
        (lambda: EMACallback(decay=1.5), "decay"),
        (lambda: EMACallback(decay=0.9, min_decay=0.95), "min_decay"),
        (lambda: IngredientCallback(name="a/b"), "name"),
    ],
)
def test_invalid_arguments_name_the_argument(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


def test_swa_start_fraction_resolves_against_max_steps():
    swa = SWACallback(swa_start=0.75, every_n_steps=2)
    state = type("State", (), {"max_steps": 10})()
    swa._prepare(None, state)
    assert [s for s in range(1, 11) if swa.is_averaging_step(s)] == [7, 9]
