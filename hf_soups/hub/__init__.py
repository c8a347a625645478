"""Everything that talks to the Hugging Face Hub: resolving sources (:mod:`.resolve`) and
pushing model folders (:mod:`.push`).

Pushing pulls in the model cards and the merge engine (and so torch); it is imported on first
use, so resolving a source, or the command line's ``--help``, does not wait for it.
"""

import importlib
from typing import TYPE_CHECKING

from hf_soups.hub.resolve import (
    PICKLE_PATTERNS,
    SAFE_PATTERNS,
    parse_source,
    resolve_source,
)

_LAZY = {
    "HubPushError": "hf_soups.hub.push",
    "check_push_access": "hf_soups.hub.push",
    "push_folder": "hf_soups.hub.push",
}

if TYPE_CHECKING:
    from hf_soups.hub.push import HubPushError, check_push_access, push_folder


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hf_soups.hub' has no attribute {name!r}")


__all__ = [
    "PICKLE_PATTERNS",
    "SAFE_PATTERNS",
    "HubPushError",
    "check_push_access",
    "parse_source",
    "push_folder",
    "resolve_source",
]
