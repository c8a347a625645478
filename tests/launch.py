"""How the multi-process tests start `accelerate launch`.

Through this interpreter's `accelerate` package rather than an `accelerate` script looked up on
PATH: a plain `python -m pytest` (venv not activated) then runs the multi-process tests instead
of skipping them, and a broken launcher fails them.
"""

import sys

ACCELERATE_LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]
