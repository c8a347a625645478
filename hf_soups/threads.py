"""Run torch on one intra-op thread for a block of work, then restore the setting.

Merges are bound by memory bandwidth and the demo's models are tiny, so a second thread gains
little; on a 2-core machine with any other busy process, torch's default of two OpenMP threads
made a ViT-B/32 merge 5-8x slower and every demo training step 6-12x slower
(benchmarks/README.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_thread() -> Iterator[None]:
    """Set ``torch.set_num_threads(1)`` for the block; the caller's setting comes back after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
