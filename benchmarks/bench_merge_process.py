"""``hf-soups merge`` timed as a user times it: whole processes, wall time and peak RSS.

For CLIP-sized checkpoints (random float32 weights under the real tensor names and shapes of
transformers' ``CLIPModel``: ``b32`` is CLIP ViT-B/32, 151 M parameters, 605 MB; ``l14`` is
CLIP ViT-L/14, 428 M parameters, 1.71 GB; each one ``model.safetensors``), and each N, it runs
as separate processes, one after the other:

- ``hf-soups merge IN... --out OUT``: the command a user types (``--hf-soups``; with this
  checkout first on ``PYTHONPATH``, so that its code runs), and the same command with another
  checkout's code (``--other-checkout DIR``: the A/B measurement of a change);
- ``naive``: ``python -c`` a short script: ``load_file`` every input, average, ``save_file``;
- ``mergekit-pytorch`` (linear merge, float32) when one is given or on ``PATH``;
- ``cat IN... > /dev/null`` (the read floor) and ``python -c "import torch, safetensors"``.

Wall time and peak RSS are the whole process's, as GNU ``time`` (``/usr/bin/time``) reports them.
The commands take turns, ``--repeats`` times (default 3), each after a ``sync`` (no command pays
for the write-back of another's output); a row is the run of median wall time.
"growth" is that peak minus the peak of the same command merging two tiny checkpoints (the
interpreter and its imports: the baseline). For ``hf_soups`` the in-process figures follow from
``bench_merge.py``'s child (imports and work timed apart; growth measured after imports with
``/proc/self/clear_refs``), and the target bound, twice the largest tensor plus 64 MiB. The
hf_soups and mergekit outputs are compared with the naive one (``identical``: same bytes).

    python benchmarks/bench_merge_process.py --size b32 --n 2 8
    python benchmarks/bench_merge_process.py --size b32 --n 32 --only hf_soups cat
    python benchmarks/bench_merge_process.py --size l14 --n 2 8 --mergekit /venv/bin/mergekit-pytorch
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MiB = 2**20
REPO = Path(__file__).resolve().parent.parent
SIZES = {
    "tiny": dict(
        text_config=dict(
            hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1
        ),
        projection_dim=32,
    ),
    # transformers' CLIPConfig defaults are openai/clip-vit-base-patch32.
    "b32": {},
    # openai/clip-vit-large-patch14.
    "l14": dict(
        text_config=dict(
            hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12
        ),
        vision_config=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_attention_heads=16,
            num_hidden_layers=24,
            patch_size=14,
        ),
        projection_dim=768,
    ),
}
KINDS = [
    "cat",
    "import torch",
    "hf_soups",
    "hf_soups other checkout",
    "hf_soups in-process",
    "naive",
    "mergekit",
]

NAIVE = """
import sys
from pathlib import Path
from safetensors.torch import load_file, save_file
out, inputs = Path(sys.argv[1]), sys.argv[2:]
states = [load_file(Path(folder) / "model.safetensors") for folder in inputs]
weight = 1.0 / len(states)
merged = {}
for name, first in states[0].items():
    total = first.float() * weight
    for state in states[1:]:
        total.add_(state[name].float(), alpha=weight)
    merged[name] = total.to(first.dtype)
out.mkdir(parents=True)
save_file(merged, out / "model.safetensors", metadata={"format": "pt"})
"""


# --- checkpoints -----------------------------------------------------------------------------


def clip_shapes(size: str) -> dict[str, tuple[int, ...]]:
    """The state dict's names and shapes of a ``CLIPModel`` of this size (built on meta)."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    with torch.device("meta"):
        model = CLIPModel(CLIPConfig(**SIZES[size]))
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def make_checkpoints(root: Path, size: str, count: int) -> list[Path]:
    """``count`` folders of random float32 weights (``model.safetensors`` + ``config.json``),
    reused when already there. Values are slices of one ``randn`` pool at random offsets, so
    that writing 32 checkpoints does not cost 32 full ``randn`` draws (tensors of up to 2**26
    elements)."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPConfig

    shapes = clip_shapes(size)
    pool = torch.randn(2**26, generator=torch.Generator().manual_seed(0)).mul_(0.02)
    folders = []
    for index in range(count):
        folder = root / f"{size}-{index}"
        folders.append(folder)
        stamp = folder / "bench.json"
        spec = {"size": size, "index": index, "tensors": len(shapes)}
        if stamp.is_file() and json.loads(stamp.read_text()) == spec:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        generator = torch.Generator().manual_seed(index)
        state = {}
        for name, shape in shapes.items():
            numel = torch.Size(shape).numel()
            start = int(torch.randint(0, pool.numel() - numel + 1, (1,), generator=generator))
            state[name] = pool[start : start + numel].reshape(shape).clone()
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        CLIPConfig(**SIZES[size]).save_pretrained(folder)
        stamp.write_text(json.dumps(spec))
        print(f"  wrote {folder.name}", flush=True)
    return folders


def largest_tensor_bytes(size: str) -> int:
    import math

    return max(math.prod(shape) for shape in clip_shapes(size).values()) * 4


# --- whole-process measurements --------------------------------------------------------------


def run_process(command: list[str], env: dict | None = None) -> dict:
    """Wall time and peak RSS (MiB) of one process, as GNU ``time`` reports them (it forks the
    command from its own small process: a child forked from this one would count this one's
    pages in its peak); its error when it fails."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        timed = ["/usr/bin/time", "-o", report.name, "-f", "%e %M", *command]
        done = subprocess.run(timed, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if done.returncode:
            tail = (done.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
            return {"error": f"exit {done.returncode}: {tail[:160]}"}
        wall, peak_kib = report.read().split()[-2:]
    return {"wall_s": float(wall), "peak_mib": int(peak_kib) / 1024}


def commands(kind: str, inputs: list[Path], out: Path, args) -> tuple[list[str], dict]:
    env = dict(os.environ)
    if args.torch_threads:
        env.update(OMP_NUM_THREADS=str(args.torch_threads))
    if kind in ("hf_soups", "hf_soups other checkout"):
        code = REPO if kind == "hf_soups" else Path(args.other_checkout)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(code), env.get("PYTHONPATH")]))
        env["HF_HUB_OFFLINE"] = "1"
        # The other checkout runs as `python -m hf_soups.cli`, its own entry point: the console
        # script belongs to this checkout's install.
        program = [args.hf_soups] if kind == "hf_soups" else [args.python, "-m", "hf_soups.cli"]
        return [*program, "merge", *map(str, inputs), "--out", str(out)], env
    if kind == "naive":
        return [args.python, "-c", NAIVE, str(out), *map(str, inputs)], env
    if kind == "mergekit":
        config = out.parent / f"{out.name}.yml"
        models = [
            {"model": str(folder / "model.safetensors"), "parameters": {"weight": 1 / len(inputs)}}
            for folder in inputs
        ]
        config.write_text(
            json.dumps({"merge_method": "linear", "dtype": "float32", "models": models})
        )
        return [args.mergekit, str(config), str(out)], env
    if kind == "import torch":
        return [args.python, "-c", "import torch, safetensors.torch"], env
    if kind == "cat":
        return ["cat", *(str(folder / "model.safetensors") for folder in inputs)], env
    raise ValueError(kind)


def in_process(inputs: list[Path], out: Path, args) -> dict:
    """bench_merge.py's child: hf_soups' merge() with imports and work timed apart."""
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    if args.torch_threads:
        env.update(OMP_NUM_THREADS=str(args.torch_threads))
    script = Path(__file__).with_name("bench_merge.py")
    command = [args.python, str(script), "--child", "hf_soups", "--out", str(out), "--inputs"]
    done = subprocess.run([*command, *map(str, inputs)], env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1][:160]}
    return json.loads(lines[-1].removeprefix("RESULT "))


def identical(a: Path, b: Path) -> str:
    files_a = sorted(p.name for p in a.glob("*.safetensors"))
    files_b = sorted(p.name for p in b.glob("*.safetensors"))
    if files_a != files_b or not files_a:
        return f"files differ ({files_a} vs {files_b})"
    same = all(filecmp.cmp(a / name, b / name, shallow=False) for name in files_a)
    return "identical" if same else "different bytes"


def fits_in_memory(inputs: list[Path]) -> bool:
    """Whether holding every input at once (naive, mergekit) leaves a third of memory free."""
    available = int(
        next(
            line.split()[1]
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemAvailable:")
        )
    )
    needed = sum((folder / "model.safetensors").stat().st_size for folder in inputs)
    return needed * 1.5 < available * 1024


# --- the run ---------------------------------------------------------------------------------


def run(args) -> None:
    root = Path(args.out_dir or tempfile.mkdtemp(prefix="hf_soups_process_"))
    root.mkdir(parents=True, exist_ok=True)
    outputs = root / "outputs"
    print(f"Checkpoints in {root}", flush=True)
    folders = make_checkpoints(root / "checkpoints", args.size, max(args.n))
    tiny = make_checkpoints(root / "checkpoints", "tiny", 2)
    bound_mib = 2 * largest_tensor_bytes(args.size) / MiB + 64
    kinds = [k for k in KINDS if k in args.only] if args.only else KINDS
    if not args.other_checkout:
        kinds = [k for k in kinds if k != "hf_soups other checkout"]
    has_mergekit = bool(args.mergekit) and Path(args.mergekit).exists()
    baselines = {}
    for kind in ("hf_soups", "naive", "mergekit"):  # the same command, on two tiny models
        if kind in kinds and (kind != "mergekit" or has_mergekit):
            shutil.rmtree(outputs, ignore_errors=True)
            outputs.mkdir(parents=True)
            command, env = commands(kind, tiny, outputs / "tiny", args)
            baselines[kind] = run_process(command, env).get("peak_mib")
    rows = []
    for n in args.n:
        inputs = folders[:n]
        runs: dict[str, list[dict]] = {kind: [] for kind in kinds}
        checks = {}
        # The commands take turns, repeats times over; each row is the run of median wall time.
        for repeat in range(args.repeats):
            shutil.rmtree(outputs, ignore_errors=True)
            outputs.mkdir(parents=True)
            for kind in kinds:
                out = outputs / kind.replace(" ", "_")
                print(f"N={n}, run {repeat + 1}/{args.repeats}: {kind} ...", flush=True)
                runs[kind].append(measure(kind, inputs, out, args, has_mergekit, baselines))
            for kind in ("hf_soups", "mergekit"):
                if (outputs / kind).is_dir() and (outputs / "naive").is_dir():
                    checks[kind] = identical(outputs / kind, outputs / "naive")
        results = {kind: median_run(measured) for kind, measured in runs.items()}
        for kind, check in checks.items():
            results[kind]["check"] = check
        rows.append((n, results))
        shutil.rmtree(outputs, ignore_errors=True)
    print()
    print(report(args.size, rows, baselines, bound_mib))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "baselines": baselines}, indent=2))
    if not args.out_dir:
        shutil.rmtree(root, ignore_errors=True)


def measure(kind: str, inputs: list[Path], out: Path, args, has_mergekit, baselines) -> dict:
    """One run of one command. Dirty pages are flushed first (``sync``), so that no command
    pays for the write-back of the one before it."""
    if kind == "mergekit" and not has_mergekit:
        return {"skipped": "mergekit-pytorch not given"}
    if kind in ("naive", "mergekit") and not fits_in_memory(inputs):
        return {"skipped": "not run: needs every input in memory at once"}
    os.sync()
    if kind == "hf_soups in-process":
        return in_process(inputs, out, args)
    command, env = commands(kind, inputs, out, args)
    result = run_process(command, env)
    if baselines.get(kind) and "peak_mib" in result:
        result["growth_mib"] = result["peak_mib"] - baselines[kind]
    return result


def median_run(measured: list[dict]) -> dict:
    """The run of median wall time (its own peak RSS with it), and every run's wall time."""
    timed = [run for run in measured if "wall_s" in run or "work_s" in run]
    if len(timed) < len(measured):
        return next(run for run in measured if run not in timed)
    key = "wall_s" if "wall_s" in timed[0] else "work_s"
    ordered = sorted(timed, key=lambda run: run[key])
    return dict(ordered[(len(ordered) - 1) // 2], walls=[run[key] for run in timed])


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def report(size: str, rows, baselines, bound_mib: float) -> str:
    lines = [
        f"{size}: baselines (peak RSS of the same command on two tiny models): "
        + ", ".join(f"{k} {v:.0f} MiB" for k, v in baselines.items() if v)
        + f". RSS bound for hf_soups: 2 x largest tensor + 64 MiB = {bound_mib:.0f} MiB.",
        "",
        "| N | command | wall s | peak RSS MiB | growth MiB | hf_soups wall vs this | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, results in rows:
        ours = results.get("hf_soups", {}).get("wall_s")
        for kind, row in results.items():
            if "error" in row or "skipped" in row:
                lines.append(f"| {n} | {kind} | {row.get('error') or row['skipped']} | | | | |")
                continue
            if kind == "hf_soups in-process":
                growth = row["growth_mib"]
                verdict = "within" if growth <= bound_mib else "OVER"
                lines.append(
                    f"| {n} | {kind} | import {row['import_s']:.2f} + work {row['work_s']:.2f} "
                    f"| | {growth:.0f} | | {verdict} the {bound_mib:.0f} MiB bound |"
                )
                continue
            growth = row.get("growth_mib")
            compared = ("naive", "mergekit", "hf_soups other checkout")
            versus = _ratio(ours, row["wall_s"]) if kind in compared else ""
            notes = [row["check"]] if "check" in row else []
            if len(row.get("walls", [])) > 1:
                notes.append("runs " + ", ".join(f"{wall:.2f}" for wall in row["walls"]))
            lines.append(
                f"| {n} | {kind} | {row['wall_s']:.2f} | {row['peak_mib']:.0f} | "
                f"{'' if growth is None else f'{growth:.0f}'} | {versus} | {'; '.join(notes)} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["b32", "l14"], default="b32")
    parser.add_argument("--n", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--only", nargs="+", choices=KINDS, help="run only these rows")
    parser.add_argument("--out-dir", help="keep (and reuse) checkpoints here; default: temporary")
    parser.add_argument("--python", default=sys.executable, help="interpreter of the naive row")
    parser.add_argument(
        "--hf-soups",
        default=shutil.which("hf-soups") or str(Path(sys.executable).parent / "hf-soups"),
    )
    parser.add_argument("--mergekit", default=shutil.which("mergekit-pytorch"))
    parser.add_argument(
        "--other-checkout",
        help="a checkout of another hf_soups version, timed beside this one (A/B of a change)",
    )
    parser.add_argument("--torch-threads", type=int, help="OMP_NUM_THREADS for every command")
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs of each command, taking turns (median)"
    )
    parser.add_argument("--json", help="also write the raw numbers here")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
