"""Streaming merge vs. loading every state dict vs. mergekit, and the I/O floor.

Generates its own checkpoints (random weights of a transformers ``CLIPModel``; the default
``full`` size is CLIP ViT-B/32, ~605 MB in float32; every other one is saved sharded), then for
each N merges N of them uniformly and prints one markdown table with, side by side:

- ``hf_soups``: :func:`hf_soups.merge.merge` (streaming, float32 accumulation);
- ``naive``: ``safetensors.torch.load_file`` of every ingredient, average, ``save_file``;
- ``mergekit``: ``mergekit-pytorch``'s linear merge when ``mergekit`` is importable (by this
  interpreter or the one given with ``--mergekit-python``); it reads one file per model, so
  sharded ingredients are consolidated into one file for it before timing;
- ``read floor`` / ``write floor``: reading the same input files into a reused buffer, and
  writing as many bytes as the merged model has.

Every measurement runs in its own subprocess. The child imports what it needs (timed and shown
as "import s"), then records its resident memory as the baseline, resets the kernel's peak-RSS
counter (``/proc/self/clear_refs``), does the work (timed: "work s") and reads the peak back:
"peak RSS growth" is that peak minus the baseline, i.e. what the work itself added. The parent
times the whole subprocess too ("start-up s" = total - import - work). Inputs are read from a
warm page cache (the checkpoints were just written, and the read floor runs first).

    python benchmarks/bench_merge.py                      # ViT-B/32-sized, N = 2 4 8
    python benchmarks/bench_merge.py --sizes small        # ~40 MB checkpoints, a quick check
    python benchmarks/bench_merge.py --n 2 8 --out-dir /data/bench   # keeps checkpoints there
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 2**20
SIZES = {
    # transformers' CLIPConfig defaults are CLIP ViT-B/32 (openai/clip-vit-base-patch32).
    "full": {"text_config": {}, "vision_config": {}, "shard": "200MB"},
    "small": {
        "text_config": dict(
            vocab_size=8192,
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=4,
            num_attention_heads=4,
        ),
        "vision_config": dict(
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=4,
            num_attention_heads=4,
        ),
        "projection_dim": 256,
        "shard": "10MB",
    },
}
ROWS = ["read floor", "hf_soups", "naive", "mergekit"]


# --- checkpoints -----------------------------------------------------------------------------


def _clip_config(size: str):
    from transformers import CLIPConfig

    spec = {k: v for k, v in SIZES[size].items() if k != "shard"}
    return CLIPConfig(**spec)


def make_checkpoints(root: Path, size: str, count: int) -> list[Path]:
    """``count`` CLIPModel folders with random weights; odd-numbered ones saved sharded.

    Reuses folders already in ``root`` when they were written for the same size.
    """
    import torch
    from huggingface_hub import save_torch_state_dict
    from safetensors.torch import save_file
    from transformers import CLIPModel

    config = _clip_config(size)
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in CLIPModel(config).state_dict().items()}
    folders = []
    for i in range(count):
        folder = root / f"{size}-{i}"
        stamp = folder / "bench.json"
        spec = {"size": size, "index": i, "tensors": len(shapes)}
        folders.append(folder)
        if stamp.is_file() and json.loads(stamp.read_text()) == spec:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        generator = torch.Generator().manual_seed(i)
        state = {
            name: torch.randn(shape, generator=generator).mul_(0.02)
            for name, shape in shapes.items()
        }
        if i % 2:
            save_torch_state_dict(state, folder, max_shard_size=SIZES[size]["shard"])
        else:
            save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        del state
        config.save_pretrained(folder)
        stamp.write_text(json.dumps(spec))
        print(f"  wrote {folder.name}: {_folder_bytes(folder) / MiB:.0f} MiB", flush=True)
    return folders


def _weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in _weight_files(folder))


def consolidated(folder: Path) -> Path:
    """One safetensors file holding the folder's weights (mergekit-pytorch reads one per model)."""
    files = _weight_files(folder)
    if len(files) == 1:
        return files[0]
    single = folder.parent / f"{folder.name}.single.safetensors"
    if not single.is_file():
        from safetensors.torch import load_file, save_file

        state = {}
        for file in files:
            state.update(load_file(file))
        save_file(state, single, metadata={"format": "pt"})
    return single


# --- children: one measurement each ----------------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _work_hf_soups(inputs, out):
    import hf_soups.hub  # noqa: F401 - imported lazily by the first Ingredient; time it here
    from hf_soups.merge import merge

    return lambda: merge(inputs, out, progress=False)


def _work_naive(inputs, out):
    from safetensors.torch import load_file, save_file

    def run():
        states = []
        for folder in inputs:
            state = {}
            for file in _weight_files(Path(folder)):
                state.update(load_file(file))
            states.append(state)
        weight = 1.0 / len(states)
        merged = {}
        for name, first in states[0].items():
            total = first.float() * weight
            for state in states[1:]:
                total.add_(state[name].float(), alpha=weight)
            merged[name] = total.to(first.dtype)
        Path(out).mkdir(parents=True)
        save_file(merged, Path(out) / "model.safetensors", metadata={"format": "pt"})

    return run


def _work_mergekit(inputs, out):
    import yaml
    from mergekit.scripts.merge_raw_pytorch import main

    config = Path(out).with_suffix(".yml")
    config.write_text(
        yaml.safe_dump(
            {
                "merge_method": "linear",
                "dtype": "float32",
                "models": [
                    {"model": str(file), "parameters": {"weight": 1.0 / len(inputs)}}
                    for file in inputs
                ],
            }
        )
    )
    return lambda: main([str(config), str(out)], standalone_mode=False)


def _work_floor(inputs, out):
    buffer = bytearray(64 * MiB)
    view = memoryview(buffer)
    files = [f for folder in inputs for f in _weight_files(Path(folder))]
    output_bytes = _folder_bytes(Path(inputs[0]))

    def run():
        start = time.perf_counter()
        for file in files:
            with open(file, "rb", buffering=0) as handle:
                while handle.readinto(view):
                    pass
        read_s = time.perf_counter() - start
        Path(out).mkdir(parents=True)
        start = time.perf_counter()
        with open(Path(out) / "model.safetensors", "wb", buffering=0) as handle:
            left = output_bytes
            while left:
                left -= handle.write(view[: min(left, len(view))])
        return {"read_s": read_s, "write_s": time.perf_counter() - start}

    return run


WORK = {
    "hf_soups": _work_hf_soups,
    "naive": _work_naive,
    "mergekit": _work_mergekit,
    "read floor": _work_floor,
}


def child(kind: str, inputs: list[str], out: str) -> None:
    start = time.perf_counter()
    work = WORK[kind](inputs, out)
    import_s = time.perf_counter() - start
    import gc

    gc.collect()
    baseline = _status_kib("VmRSS")
    exact = _reset_peak()
    start = time.perf_counter()
    extra = work()
    work_s = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    if not exact:  # without clear_refs, the lifetime peak (imports included) is all there is
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {
        "import_s": import_s,
        "work_s": work_s,
        "baseline_mib": baseline / 1024,
        "growth_mib": (peak - baseline) / 1024,
        "exact_peak": exact,
    }
    if isinstance(extra, dict):
        result.update(extra)
    print("RESULT " + json.dumps(result), flush=True)


def measure(kind: str, inputs: list[Path], out: Path, python: str) -> dict:
    """Run one measurement in a fresh interpreter; return its numbers or its failure."""
    shutil.rmtree(out, ignore_errors=True)
    command = [python, __file__, "--child", kind, "--out", str(out), "--inputs", *map(str, inputs)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    total = time.perf_counter() - start
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {done.returncode}: {tail[:120]}"}
    result = json.loads(lines[-1].removeprefix("RESULT "))
    result["startup_s"] = total - result["import_s"] - result["work_s"]
    return result


# --- checks and report -----------------------------------------------------------------------


def max_difference(a: Path, b: Path) -> float:
    """Largest absolute difference between two merged folders, one tensor in memory at a time."""
    from safetensors import safe_open

    def index(folder):
        where = {}
        for file in _weight_files(folder):
            with safe_open(file, "pt") as handle:
                where.update(dict.fromkeys(handle.keys(), file))
        return where

    where_a, where_b = index(a), index(b)
    if where_a.keys() != where_b.keys():
        return float("inf")
    worst = 0.0
    for name, file in where_a.items():
        with safe_open(file, "pt") as ha, safe_open(where_b[name], "pt") as hb:
            diff = (ha.get_tensor(name).double() - hb.get_tensor(name).double()).abs().max()
        worst = max(worst, float(diff))
    return worst


def _mergekit_available(python: str) -> bool:
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('mergekit') is None)"
    return subprocess.run([python, "-c", probe], capture_output=True).returncode == 0


def _fmt(value, digits=2):
    return "-" if value is None else f"{value:.{digits}f}"


def report(size: str, n_values, results, input_mib: float) -> str:
    lines = [
        f"Checkpoints: CLIPModel ({size}), {input_mib:.0f} MiB each (float32), every other "
        "one sharded. Times in seconds, memory in MiB above the process's baseline.",
        "",
        "| N | method | work s | peak RSS growth MiB | import s | start-up s | "
        "vs naive | vs floor (read+write) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in n_values:
        rows = results[n]
        floor = rows.get("read floor", {})
        floor_s = floor.get("read_s", 0) + floor.get("write_s", 0) if "work_s" in floor else None
        naive_s = rows.get("naive", {}).get("work_s")
        for kind in ROWS:
            row = rows.get(kind)
            if row is None:
                continue
            if "error" in row or "skipped" in row:
                lines.append(f"| {n} | {kind} | {row.get('error') or row['skipped']} |||||||")
                continue
            work = row["work_s"]
            if kind == "read floor":
                label = f"read {row['read_s']:.2f} + write {row['write_s']:.2f}"
                lines.append(
                    f"| {n} | I/O floor | {label} | {_fmt(row['growth_mib'], 0)} | "
                    f"{_fmt(row['import_s'])} | {_fmt(row['startup_s'])} | | |"
                )
                continue
            vs_naive = f"{work / naive_s:.2f}x" if naive_s else "-"
            vs_floor = f"{work / floor_s:.2f}x" if floor_s else "-"
            lines.append(
                f"| {n} | {kind} | {work:.2f} | {row['growth_mib']:.0f} | {row['import_s']:.2f} "
                f"| {row['startup_s']:.2f} | {vs_naive} | {vs_floor} |"
            )
    growth = {n: results[n].get("hf_soups", {}).get("growth_mib") for n in n_values}
    known = [g for g in growth.values() if g is not None]
    if len(known) > 1 and min(known) > 0:
        lines += [
            "",
            "hf_soups peak RSS growth over N: "
            + ", ".join(f"N={n}: {g:.0f} MiB" for n, g in growth.items() if g is not None)
            + f" (max/min {max(known) / min(known):.2f})",
        ]
    for kind in ("hf_soups", "mergekit"):
        checks = {n: results[n].get("check", {}).get(kind) for n in n_values}
        checks = {n: d for n, d in checks.items() if d is not None}
        if checks:
            lines.append(
                f"{kind} vs naive output, max abs difference: "
                + ", ".join(f"N={n}: {d:.2e}" for n, d in checks.items())
            )
    return "\n".join(lines)


def _best(runs: list[dict]) -> dict:
    """The fastest of repeated runs, with the largest memory growth any of them showed."""
    good = [run for run in runs if "error" not in run]
    if not good:
        return runs[0]
    best = dict(min(good, key=lambda run: run["work_s"]))
    best["growth_mib"] = max(run["growth_mib"] for run in good)
    return best


def run_benchmark(args) -> None:
    if args.torch_threads:  # inherited by every measurement's subprocess
        os.environ.update(
            OMP_NUM_THREADS=str(args.torch_threads), MKL_NUM_THREADS=str(args.torch_threads)
        )
    own_root = args.out_dir is None
    root = Path(args.out_dir or tempfile.mkdtemp(prefix="hf_soups_bench_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        print(f"Checkpoints in {root}", flush=True)
        # One more checkpoint than the largest N: the base of the methods that need one.
        folders = make_checkpoints(
            root / "checkpoints", args.sizes, max(args.n) + (1 if args.methods else 0)
        )
        base = folders[-1] if args.methods else None
        folders = folders[: max(args.n)]
        input_mib = _folder_bytes(folders[0]) / MiB
        mergekit_python = args.mergekit_python or sys.executable
        has_mergekit = _mergekit_available(mergekit_python)
        results = {}
        for n in args.n:
            inputs = folders[:n]
            rows = results.setdefault(n, {})
            for kind in ROWS:
                out = root / "outputs" / f"n{n}-{kind.replace(' ', '_')}"
                if kind == "mergekit" and not has_mergekit:
                    rows[kind] = {"skipped": "not installed"}
                    continue
                print(f"N={n}: {kind} ...", flush=True)
                given = [consolidated(f) for f in inputs] if kind == "mergekit" else inputs
                python = mergekit_python if kind == "mergekit" else sys.executable
                runs = [measure(kind, given, out, python) for _ in range(args.repeat)]
                rows[kind] = _best(runs)
            naive_out = root / "outputs" / f"n{n}-naive"
            for kind in ("hf_soups", "mergekit"):
                out = root / "outputs" / f"n{n}-{kind}"
                if out.is_dir() and naive_out.is_dir():
                    rows.setdefault("check", {})[kind] = max_difference(out, naive_out)
            shutil.rmtree(root / "outputs", ignore_errors=True)
        table = report(args.sizes, args.n, results, input_mib)
        print()
        print(table)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        if args.methods:
            _method_rows(folders, base, args, root)
    finally:
        if own_root:
            shutil.rmtree(root, ignore_errors=True)


def _method_rows(folders: list[Path], base: Path, args, root: Path) -> None:
    """Rows for the other merge methods, from benchmarks/bench_methods.py when it is there."""
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        from bench_methods import run_method_rows
    except ImportError:
        print("\n(method rows: benchmarks/bench_methods.py not found)")
        return
    rows = []
    for n in args.n:
        print(f"N={n}: merge methods ...", flush=True)
        rows += run_method_rows(folders[:n], base, root / "methods")
    columns = list(rows[0])
    print(
        "\nMerge methods on the same checkpoints (base: one more of them); "
        "peak RSS is the whole process's:\n"
    )
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", choices=sorted(SIZES), default="full")
    parser.add_argument("--n", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument(
        "--out-dir", help="keep checkpoints here (reused by later runs); default: a temp folder"
    )
    parser.add_argument("--mergekit-python", help="interpreter that has mergekit installed")
    parser.add_argument("--json", help="also write the raw numbers to this file")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs per measurement; the fastest is shown (default 1)",
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        help="OMP_NUM_THREADS for every measurement (default: torch's own choice)",
    )
    parser.add_argument(
        "--no-methods",
        dest="methods",
        action="store_false",
        help="skip the rows of the other merge methods",
    )
    parser.add_argument("--child", choices=sorted(WORK), help=argparse.SUPPRESS)
    parser.add_argument("--inputs", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.inputs, args.out)
    else:
        run_benchmark(args)


if __name__ == "__main__":
    main()
