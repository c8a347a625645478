"""Cold start of the command line, timed as a user sees it: whole processes.

Runs each command ``--repeat`` times (default 10) after one untimed warm-up run, hyperfine
style, and prints the median, min and max wall time of the whole process, beside
``python -c pass`` (the interpreter's own start) and ``python -c "import torch"`` (what a
command that needs torch pays before any work). Also reports which heavy libraries each
command imported (``-X importtime``), so a regression names its culprit.

    python benchmarks/bench_cli.py
    python benchmarks/bench_cli.py --repeat 20 --hf-soups /path/to/venv/bin/hf-soups
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HEAVY = ("torch", "transformers", "open_clip", "datasets", "accelerate", "matplotlib")


def time_command(command: list[str], repeat: int) -> list[float]:
    subprocess.run(command, capture_output=True, check=True)  # warm-up: page cache, .pyc files
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(command, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return times


def heavy_imports(args: list[str]) -> list[str]:
    """Heavy top-level packages ``hf-soups ARGS`` imports (from ``-X importtime``)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "hf_soups.cli", *args],
        capture_output=True,
        text=True,
    )
    imported = {
        line.rsplit("|", 1)[-1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:")
    }
    return [name for name in HEAVY if name in imported]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument(
        "--hf-soups",
        default=shutil.which("hf-soups") or str(Path(sys.executable).with_name("hf-soups")),
        help="the console script to time (default: the one on PATH)",
    )
    args = parser.parse_args()
    cases = {
        "python -c pass": [sys.executable, "-c", "pass"],
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
        "hf-soups --help": [args.hf_soups, "--help"],
        "hf-soups merge --help": [args.hf_soups, "merge", "--help"],
        "hf-soups soup --help": [args.hf_soups, "soup", "--help"],
    }
    print(f"{args.repeat} runs each after one warm-up; whole-process wall time in seconds\n")
    print("| command | median | min | max | heavy imports |")
    print("|---|---|---|---|---|")
    for label, command in cases.items():
        times = time_command(command, args.repeat)
        heavy = heavy_imports(command[1:]) if command[0] == args.hf_soups else []
        print(
            f"| `{label}` | {statistics.median(times):.3f} | {min(times):.3f} | "
            f"{max(times):.3f} | {', '.join(heavy) or '-'} |"
        )


if __name__ == "__main__":
    main()
