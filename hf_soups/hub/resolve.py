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
from hf_soups.models.families.base import CONFIG_FILES

logger = logging.getLogger(__name__)

# The small files a merged folder needs (config, processor, tokenizer, recipes). Weights are
# fetched per layout: the safetensors of the checkpoint's family only (never tf_model.h5 nor
# flax_model.msgpack, nor the other format of a repo holding two), its pickles only on opt-in.
SMALL_FILE_PATTERNS = ["*.json", "*.txt", "*.model", "*.jinja"]
SAFE_PATTERNS = ["*.safetensors", *SMALL_FILE_PATTERNS]
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
    weights_format: str | None = None,
) -> tuple[Path, str | None]:
    """Return the local folder holding ``source`` and the resolved commit (None for folders).

    A path that exists locally is used as is. Anything else is treated as a Hub repo id and
    fetched with ``snapshot_download`` (``HF_HUB_OFFLINE`` and the Hub cache are honoured):
    first its config files, which tell the model family (``weights_format`` chooses between
    the two formats of a repo holding both), then, at the same commit, the small files and that
    family's weights.

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

    # First the config files, which tell the family, then the files that family needs.
    def download(patterns: list[str], at: str | None) -> Path:
        return Path(
            snapshot_download(
                repo_id,
                revision=at,
                allow_patterns=patterns,
                token=token,
                cache_dir=cache_dir,
                local_files_only=bool(local_files_only),
            )
        )

    try:
        configs = download(list(CONFIG_FILES), revision)
        folder = download(_weight_patterns(configs, weights_format, allow_pickle), revision)
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
    # A snapshot folder is named after the commit it holds.
    if folder.name != configs.name:
        raise IngredientNotFoundError(
            f"{source}: moved from commit {configs.name} to {folder.name} while being fetched"
        )
    return folder, folder.name


def _weight_patterns(folder: Path, weights_format: str | None, pickles: bool) -> list[str]:
    """What to fetch of a repo whose config files are in `folder`: small files plus the weights
    of its family (and its pickles too, when `pickles`), and a pruned model's mask file.

    The mask is named exactly, not by a glob: offline, a cached snapshot must hold every listed
    file the patterns match, so a wider pattern would ask for the other format's weights."""
    from hf_soups.models.families import CheckpointFiles, family_of
    from hf_soups.pruning.mask_file import MASK_FILE

    family = family_of(CheckpointFiles.read(folder), weights_format)
    if family is None:  # no config: weights of any name, as the folder is read
        return SAFE_PATTERNS + (PICKLE_PATTERNS if pickles else [])
    pickle_files = family.pickle_files if pickles else ()
    return [*SMALL_FILE_PATTERNS, *family.weight_patterns(), MASK_FILE, *pickle_files]
