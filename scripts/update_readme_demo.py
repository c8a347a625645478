"""Put the demo's results table (demo_output/results.md) into README.md between its markers.

bash scripts/demo.sh && .venv/bin/python scripts/update_readme_demo.py [demo_output]
"""

import sys
from pathlib import Path

START, END = "<!-- demo-results:start -->", "<!-- demo-results:end -->"

out = Path(sys.argv[1] if len(sys.argv) > 1 else "demo_output")
readme = Path(__file__).resolve().parent.parent / "README.md"
text = readme.read_text()
before, rest = text.split(START, 1)
_, after = rest.split(END, 1)
table = (out / "results.md").read_text().strip()
readme.write_text(f"{before}{START}\n{table}\n{END}{after}")
print(f"README.md: demo table from {out / 'results.md'}")
