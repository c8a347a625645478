"""How a card names the models a recipe records: Hub ids with links, local folders by name."""

from __future__ import annotations

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from hf_soups.recipe.schema import Source

HUB = "https://huggingface.co"


def hub_id(source: Source | None) -> str | None:
    """The Hub repo id of a source resolved from the Hub (it has a revision), else ``None``."""
    if source is None or not source.is_hub:
        return None
    repo_id = source.source.partition("@")[0]
    return repo_id if is_repo_id(repo_id) else None


def is_repo_id(name: str) -> bool:
    """Whether ``name`` is a valid Hub repo id, and not a path (``./data``, ``/data``, ``~``)."""
    if name.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def link(source: Source | None) -> str | None:
    """The Hub page of a Hub source."""
    repo_id = hub_id(source)
    return f"{HUB}/{repo_id}" if repo_id else None


def pinned(source: Source) -> str:
    """What the command line takes to fetch the same weights: ``org/name@commit`` for a Hub
    source, the (published) folder name for a local one."""
    repo_id = hub_id(source)
    return f"{repo_id}@{source.revision}" if repo_id else source.source


def revision_text(source: Source) -> str:
    return source.revision or "local folder"
