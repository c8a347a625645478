"""Put the demo's tables (demo_output/results.md, demo_output/multitask_results.md) into
README.md between their markers, protocol text included.

bash scripts/demo.sh && .venv/bin/python scripts/update_readme_demo.py [demo_output]
"""

import sys
from pathlib import Path

BLOCKS = {
    "results.md": ("<!-- demo-results:start -->", "<!-- demo-results:end -->"),
    "multitask_results.md": ("<!-- demo-multitask:start -->", "<!-- demo-multitask:end -->"),
}


def replace_block(text: str, start: str, end: str, content: str) -> str:
    """``text`` with what lies between the ``start`` and ``end`` markers replaced."""
    if text.count(start) != 1 or text.count(end) != 1:
        raise SystemExit(f"README.md must hold {start} and {end} exactly once each")
    before, rest = text.split(start, 1)
    _, after = rest.split(end, 1)
    return f"{before}{start}\n{content}\n{end}{after}"


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "demo_output")
    readme = Path(__file__).resolve().parent.parent / "README.md"
    text = readme.read_text()
    for name, (start, end) in BLOCKS.items():
        text = replace_block(text, start, end, (out / name).read_text().strip())
        print(f"README.md: {name} from {out / name}")
    readme.write_text(text)


if __name__ == "__main__":
    main()
