"""The one module that talks to the Hugging Face Hub: resolving sources and pushing folders."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from hf_soups.errors import IngredientNotFoundError

logger = logging.getLogger(__name__)

# Weights in safetensors plus the small files a merged folder needs (config, processor, tokenizer,
# recipes). Pickles are fetched only when the user opts in.
SAFE_PATTERNS = ["*.safetensors", "*.json", "*.txt", "*.model", "*.jinja"]
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth"]


def parse_source(source: str, revision: str | None = None) -> tuple[str, str | None]:
    """Split ``"org/name@rev"`` into repo id and revision; an explicit ``revision`` wins."""
    repo_id, at, pinned = source.partition("@")
    if at and revision is not None and revision != pinned:
        raise IngredientNotFoundError(
            f"{source}: revision {pinned!r} in the source disagrees with revision={revision!r}"
        )
    return repo_id, revision or (pinned if at else None)


def resolve_source(
    source: str,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    allow_pickle: bool = False,
) -> tuple[Path, str | None]:
    """Return the local folder holding ``source`` and the resolved commit (None for folders).

    A path that exists locally is used as is. Anything else is treated as a Hub repo id and
    fetched with ``snapshot_download`` (``HF_HUB_OFFLINE`` and the Hub cache are honoured).

    Raises:
        IngredientNotFoundError: naming the source, when it is neither a folder nor a reachable
            (or cached) Hub repository.
    """
    local = Path(source).expanduser()
    if local.is_dir():
        return local, None
    if local.exists():
        raise IngredientNotFoundError(f"{source}: is a file; give the checkpoint's folder")
    repo_id, revision = parse_source(source, revision)
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise IngredientNotFoundError(
            f"{source}: no such folder, and not a valid Hub repo id"
        ) from None
    patterns = SAFE_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=patterns,
            token=token,
            cache_dir=cache_dir,
            local_files_only=bool(local_files_only),
        )
    except (RepositoryNotFoundError, GatedRepoError) as error:
        raise IngredientNotFoundError(
            f"{source}: Hub repository not found or not accessible ({type(error).__name__})"
        ) from None
    except RevisionNotFoundError:
        raise IngredientNotFoundError(f"{source}: revision {revision!r} not found") from None
    except IncompleteSnapshotError as error:
        # A subclass of LocalEntryNotFoundError: the snapshot is cached but lacks wanted files.
        raise IngredientNotFoundError(f"{source}: incomplete in the Hub cache ({error})") from None
    except LocalEntryNotFoundError:
        raise IngredientNotFoundError(
            f"{source}: not a local folder, and not in the Hub cache"
            + (f" at revision {revision!r}" if revision else "")
            + " (offline, or the Hub could not be reached)"
        ) from None
    folder = Path(folder)
    # A snapshot folder is named after the commit it holds.
    return folder, folder.name
