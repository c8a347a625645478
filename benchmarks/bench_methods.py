"""Wall time and peak memory of every merge method, at N = 2 and N = 8 ingredients.

Each method runs in its own subprocess (so peaks do not mix) that imports hf_soups, records its
resident memory, merges, and reports its peak resident memory (``ru_maxrss``) and wall time. A
method streams as plain averaging does when its peak does not grow with N.

    python benchmarks/bench_methods.py                    # generated checkpoints, ~32 MB each
    python benchmarks/bench_methods.py --megabytes 600    # the big version

The merge benchmark can call :func:`run_method_rows` on its own checkpoints.
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
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# name -> parameters; weights of the plain average are filled in per N.
DEFAULT_METHODS: dict[str, dict] = {
    "weighted_average": {},
    "task_arithmetic": {"scaling": 0.5},
    "ties": {"density": 0.2},
    "dare_linear": {"drop_rate": 0.9, "scaling": 0.5},
    "dare_ties": {"drop_rate": 0.9},
    "model_stock": {},
    "fisher": {},
}
_NEEDS_NO_BASE = {"weighted_average", "fisher"}


def _mib(nbytes: float) -> float:
    return round(nbytes / 2**20, 1)


def make_checkpoints(
    root: Path, num_ingredients: int, *, megabytes: float = 32, seed: int = 0
) -> tuple[Path, list[Path]]:
    """A base and ``num_ingredients`` fine-tunes (base + small noise) of about ``megabytes``
    each, as float32 matrices of 1024 columns in one ``model.safetensors``."""
    generator = torch.Generator().manual_seed(seed)
    rows = 256
    count = max(1, round(megabytes * 2**20 / (rows * 1024 * 4)))
    base = {
        f"layers.{i}.weight": torch.randn(rows, 1024, generator=generator) for i in range(count)
    }
    folders = []
    for index in range(num_ingredients + 1):
        folder = root / ("base" if index == 0 else f"ingredient{index}")
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"model_type": "bench"}))
        state = (
            base
            if index == 0
            else {
                name: tensor + 0.01 * torch.randn(tensor.shape, generator=generator)
                for name, tensor in base.items()
            }
        )
        save_file(state, folder / "model.safetensors")
        folders.append(folder)
    return folders[0], folders[1:]


def make_fisher_dirs(ingredient_dirs: Sequence[Path], root: Path, *, seed: int = 0) -> list[Path]:
    """Stand-in Fisher folders (positive random values of the ingredients' tensor names and
    shapes): the merge's cost does not depend on what the Fisher values are."""
    generator = torch.Generator().manual_seed(seed)
    folders = []
    for index, ingredient in enumerate(ingredient_dirs):
        folder = root / f"fisher{index}"
        folder.mkdir(parents=True)
        state = {}
        for file in sorted(Path(ingredient).glob("*.safetensors")):
            for name, tensor in load_file(file).items():
                state[name] = torch.rand(tensor.shape, generator=generator)
        save_file(state, folder / "model.safetensors")
        folders.append(folder)
    return folders


def _memory(field: str) -> int:
    # /proc rather than getrusage: ru_maxrss survives exec, so a child started by a big parent
    # would report the parent's peak.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _child(spec: dict) -> None:
    from hf_soups.merge import merge
    from hf_soups.methods import get_method

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    import_rss = _memory("VmRSS")
    method = get_method(spec["method"], **spec["params"])
    start = time.perf_counter()
    merge(spec["ingredients"], spec["out"], method=method, base=spec["base"], progress=False)
    wall = time.perf_counter() - start
    peak_rss = _memory("VmHWM")
    print(json.dumps({"wall_s": wall, "peak_rss": peak_rss, "import_rss": import_rss}))


def run_method_rows(
    ingredient_dirs: Sequence[str | os.PathLike],
    base_dir: str | os.PathLike,
    out_root: str | os.PathLike,
    methods: dict[str, dict] | None = None,
    *,
    threads: int | None = None,
) -> list[dict]:
    """Merge ``ingredient_dirs`` once per method, each in a fresh subprocess; return one row per
    method: ``method``, ``n_ingredients``, ``input_mib`` (one ingredient's weights),
    ``wall_s`` (the merge alone), ``import_rss_mib`` (after importing hf_soups),
    ``peak_rss_mib`` (the whole process) and ``merge_growth_mib`` (the difference).

    ``methods`` maps method names to their parameters (default :data:`DEFAULT_METHODS`); Fisher
    folders for ``"fisher"`` are generated under ``out_root``. ``threads`` sets torch's thread
    count in the children (on a loaded machine, 1 avoids threads waiting on each other). Outputs
    are deleted after each run.
    """
    ingredient_dirs = [str(d) for d in ingredient_dirs]
    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    n = len(ingredient_dirs)
    input_bytes = sum(f.stat().st_size for f in Path(ingredient_dirs[0]).glob("*.safetensors"))
    rows = []
    for name, params in (methods or DEFAULT_METHODS).items():
        params = dict(params)
        if name == "weighted_average":
            params.setdefault("weights", [1 / n] * n)
        if name == "fisher" and "fisher_dirs" not in params:
            fisher_root = out_root / f"fisher-values-n{n}"
            if not fisher_root.exists():
                make_fisher_dirs([Path(d) for d in ingredient_dirs], fisher_root)
            params["fisher_dirs"] = [str(fisher_root / f"fisher{i}") for i in range(n)]
        out = out_root / f"{name}-n{n}"
        spec = {
            "method": name,
            "params": params,
            "ingredients": ingredient_dirs,
            "base": None if name in _NEEDS_NO_BASE else str(base_dir),
            "out": str(out),
            "threads": threads,
        }
        result = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(spec)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{name} (N={n}) failed:\n{result.stderr[-3000:]}")
        measured = json.loads(result.stdout.strip().splitlines()[-1])
        shutil.rmtree(out, ignore_errors=True)
        rows.append(
            {
                "method": name,
                "n_ingredients": n,
                "input_mib": _mib(input_bytes),
                "wall_s": round(measured["wall_s"], 2),
                "import_rss_mib": _mib(measured["import_rss"]),
                "peak_rss_mib": _mib(measured["peak_rss"]),
                "merge_growth_mib": _mib(measured["peak_rss"] - measured["import_rss"]),
            }
        )
    return rows


def _table(rows: list[dict]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 8], help="values of N")
    parser.add_argument("--megabytes", type=float, default=32, help="size of each checkpoint")
    parser.add_argument("--root", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--threads", type=int, help="torch threads per merge (default: torch's)")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args()
    if args.child:
        _child(json.loads(args.child))
        return
    root = args.root or Path(tempfile.mkdtemp(prefix="bench-methods-"))
    try:
        base, ingredients = make_checkpoints(
            root / "checkpoints", max(args.sizes), megabytes=args.megabytes
        )
        rows = []
        for n in args.sizes:
            rows += run_method_rows(ingredients[:n], base, root / "runs", threads=args.threads)
    finally:
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)
    print(_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
