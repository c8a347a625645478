"""Per-step overhead of the EMA and SWA callbacks on a small ViT trained with ``Trainer``.

Runs the same training (same model init, data and seed) with no callback, with EMACallback
and with SWACallback (averaging every step, its most expensive setting), interleaving the
variants over repeats so that drifts in machine load hit all of them alike. A step is timed
from one ``on_step_end`` to the next (forward, backward, optimizer, every callback, data
loading); the first steps of each run are discarded as warm-up. Prints a markdown table of
median step times and their ratios to the run without a callback.

Run-level ratios carry the noise of a shared machine, so two finer measures follow: runs in
which the callback averages on every other step only, compared step by step (update steps
against the steps between them, which share the same load), and one averaging update timed
alone.

    python benchmarks/bench_callbacks.py            # ~1-2 minutes on 2 CPU cores
    python benchmarks/bench_callbacks.py --steps 20 --repeats 5
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import statistics
import tempfile
import time

import torch
from transformers import (
    Trainer,
    TrainerCallback,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
)
from transformers.utils import logging as hf_logging

from hf_soups.callbacks import AveragedWeights, EMACallback, SWACallback


class StepTimer(TrainerCallback):
    """Wall time between consecutive step ends; placed last so it sees every callback's work."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._last: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = None

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available() and not args.use_cpu:
            torch.cuda.synchronize()  # CUDA kernels run asynchronously; time their completion
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now


class EveryOtherStepEMA(EMACallback):
    """EMA that updates on even optimizer steps only, to compare adjacent steps."""

    def on_optimizer_step(self, args, state, control, **kwargs):
        if (state.global_step + 1) % 2 == 0:
            super().on_optimizer_step(args, state, control, **kwargs)


class Images(torch.utils.data.Dataset):
    def __init__(self, n: int, image_size: int, num_labels: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.pixel_values = torch.randn(n, 3, image_size, image_size, generator=generator)
        self.labels = torch.randint(0, num_labels, (n,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixel_values[i], "labels": self.labels[i]}


def small_vit(image_size: int) -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=image_size,
        patch_size=4,
        hidden_size=192,
        num_hidden_layers=6,
        num_attention_heads=3,
        intermediate_size=768,
        num_labels=10,
    )
    return ViTForImageClassification(config)


def make_callback(variant: str) -> list[TrainerCallback]:
    if variant == "ema":
        return [EMACallback(decay=0.999, swap_at_end=False)]
    if variant == "swa":
        return [SWACallback(swa_start=1, every_n_steps=1, swap_at_end=False)]
    if variant == "ema-every-other":
        return [EveryOtherStepEMA(decay=0.999, swap_at_end=False)]
    if variant == "swa-every-other":
        return [SWACallback(swa_start=2, every_n_steps=2, swap_at_end=False)]
    return []


def paired_ratio(times: list[float], warmup: int) -> tuple[float, int]:
    """Median over pairs of (even step time / preceding odd step time), and the pair count.

    ``times[i]`` is the duration of optimizer step ``i + 2`` (the first step has no start mark).
    """
    ratios = [
        times[i] / times[i - 1]
        for i in range(1, len(times))
        if (i + 2) % 2 == 0 and i - 1 >= warmup
    ]
    return statistics.median(ratios), len(ratios)


def run(
    variant: str,
    steps: int,
    batch_size: int,
    image_size: int,
    output_dir: str,
    use_cpu: bool = True,
) -> list[float]:
    timer = StepTimer()
    args = TrainingArguments(
        output_dir=output_dir,
        use_cpu=use_cpu,
        per_device_train_batch_size=batch_size,
        max_steps=steps,
        learning_rate=1e-4,
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = Trainer(
        model=small_vit(image_size),
        args=args,
        train_dataset=Images(batch_size * steps, image_size, 10),
        callbacks=[*make_callback(variant), timer],
    )
    trainer.train()
    return timer.times


def update_alone(image_size: int, device: str, repeats: int = 50) -> tuple[float, int]:
    """Median seconds of one EMA update (one fused lerp over all parameters), and the parameter count."""
    model = small_vit(image_size).to(device)
    averaged = AveragedWeights(model, include_buffers=True)
    averaged.copy_from_model()
    for _ in range(5):
        averaged.lerp_toward_model(0.001)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        averaged.lerp_toward_model(0.001)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    parser.add_argument("--paired-steps", type=int, default=24, help="steps of the paired runs")
    parser.add_argument("--warmup", type=int, default=3, help="steps discarded per run")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats per variant")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is steadiest on shared cores)"
    )
    parser.add_argument("--gpu", action="store_true", help="train on the GPU instead of the CPU")
    cli = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hf_logging.set_verbosity_error()
    logging.getLogger("hf_soups").setLevel(logging.WARNING)
    torch.set_num_threads(cli.threads)
    use_cpu = not cli.gpu
    variants = ["none", "ema", "swa"]
    medians: dict[str, list[float]] = {v: [] for v in variants}
    # Load from other work only ever adds time, so the fastest step is the least disturbed one.
    fastest: dict[str, float] = dict.fromkeys(variants, float("inf"))
    order_rng = random.Random(0)
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(cli.repeats):
            order = variants[:]
            order_rng.shuffle(order)
            for variant in order:
                times = run(
                    variant,
                    cli.steps,
                    cli.batch_size,
                    cli.image_size,
                    os.path.join(scratch, variant),
                    use_cpu,
                )
                medians[variant].append(statistics.median(times[cli.warmup :]))
                fastest[variant] = min(fastest[variant], *times[cli.warmup :])
            print(
                f"repeat {repeat + 1}/{cli.repeats}: "
                + ", ".join(f"{v} {medians[v][-1] * 1e3:.1f} ms" for v in variants),
                flush=True,
            )
        paired = {}
        # "none" is the control: the same even/odd comparison with no update on either step.
        for variant in ("none", "ema-every-other", "swa-every-other"):
            times = run(
                variant,
                cli.paired_steps,
                cli.batch_size,
                cli.image_size,
                os.path.join(scratch, variant),
                use_cpu,
            )
            paired[variant] = paired_ratio(times, cli.warmup)
    update_time, n_params = update_alone(cli.image_size, "cpu" if use_cpu else "cuda")

    base = statistics.median(medians["none"])
    print()
    print(
        f"Small ViT (hidden 192, 6 layers, {cli.image_size}x{cli.image_size} images, patch 4, "
        f"{n_params / 1e6:.2f}M parameters), batch {cli.batch_size}, "
        f"{'GPU' if cli.gpu else f'CPU, {cli.threads} torch thread(s)'}, "
        f"{cli.steps} steps per run ({cli.warmup} warm-up), {cli.repeats} interleaved repeats"
    )
    print()
    print(
        "| callback | median step (ms) | ratio to no callback | per-repeat ratios "
        "| fastest step (ms) | fastest-step ratio |"
    )
    print("|---|---|---|---|---|---|")
    for variant in variants:
        step = statistics.median(medians[variant])
        per_repeat = [m / b for m, b in zip(medians[variant], medians["none"], strict=True)]
        spread = ", ".join(f"{r:.3f}" for r in per_repeat)
        print(
            f"| {variant} | {step * 1e3:.1f} | {step / base:.3f} | {spread} "
            f"| {fastest[variant] * 1e3:.1f} | {fastest[variant] / fastest['none']:.3f} |"
        )
    print()
    print("| paired, same run | median ratio, update step / preceding step | pairs |")
    print("|---|---|---|")
    for variant, (ratio, pairs) in paired.items():
        label = "none (control)" if variant == "none" else variant.removesuffix("-every-other")
        print(f"| {label} | {ratio:.3f} | {pairs} |")
    print()
    print(
        f"One averaging update alone (fused foreach lerp over all tensors): {update_time * 1e3:.2f} ms "
        f"= {update_time / base * 100:.1f}% of a step without callback"
    )


if __name__ == "__main__":
    main()
