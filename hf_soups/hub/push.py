"""Pushing a model folder to the Hugging Face Hub: one repository, one commit.

Only ``huggingface_hub`` talks to the Hub. The folder (weights, config, processor files, the
README model card, the recipe, plots) goes up in a single :meth:`HfApi.create_commit`, so a
reader of the repository never sees half a model. (``HfApi.upload_folder`` would do the same for
small folders, but with ``hf_xet`` installed it streams large folders in several commits.)

The token comes from the usual places: the ``token`` argument, ``HF_TOKEN``, or the cached
``hf auth login``. It is never logged, and it is kept out of error messages and of the uploaded
files: a folder whose files contain the token is refused before anything is sent.

The recipe goes up as :meth:`~hf_soups.recipe.Recipe.public` writes it, local sources named by
their folder names only, as the card names them. Nothing in the folder changes before the Hub
has accepted the push: a missing model card is rendered in memory, committed with the files, and
written into the folder only afterwards.
:func:`check_push_access` lets a caller that builds the folder first (a soup recipe with
``push_to_hub``) find an unreachable Hub or a refused token before any merging.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, constants
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import (
    DEFAULT_IGNORE_PATTERNS,
    filter_repo_objects,
    get_token,
    validate_repo_id,
)

from hf_soups.cards import CARD_FILE, render_card, write_card
from hf_soups.errors import HubPushError
from hf_soups.recipe.schema import RECIPE_FILE, Recipe

logger = logging.getLogger(__name__)

__all__ = ["HubPushError", "check_push_access", "push_folder"]

_REDACTED = "<token>"
# Files are scanned for the token in blocks; the overlap catches a token across two blocks.
_SCAN_BLOCK = 1 << 20
_MAX_HEADER_BYTES = 100_000_000
# What a failed Hub call raises: HfHubHTTPError and OfflineModeIsEnabled are OSErrors, but a
# transport failure (connection refused, DNS, timeout) is an error of the HTTP library
# huggingface_hub is built on, which HfHubHTTPError also derives from; taken from there, so this
# follows huggingface_hub's choice of library.
_HUB_ERRORS = (OSError, ValueError, *HfHubHTTPError.__bases__)


def _redact(text: str, token: str | None) -> str:
    return text.replace(token, _REDACTED) if token else text


def _one_line(error: BaseException, token: str | None) -> str:
    """``Type: message`` on one line (Hub errors span several), the token scrubbed."""
    return _redact(" ".join(f"{type(error).__name__}: {error}".split()), token)


def _resolve_token(token: str | bool | None) -> str | None:
    if token is False:
        return None
    if isinstance(token, str):
        return token
    return get_token()


def _folder_files(folder: Path) -> list[str]:
    """The files to upload; a symlink leading out of the folder is refused, as it would
    publish whatever it points to."""
    paths = sorted(
        path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()
    )
    files = list(filter_repo_objects(paths, ignore_patterns=DEFAULT_IGNORE_PATTERNS))
    root = folder.resolve()
    outside = [name for name in files if root not in (folder / name).resolve().parents]
    if outside:
        raise HubPushError(
            f"{folder}: refusing to push, {', '.join(outside)} link(s) to files outside the "
            "folder; copy what should be published into it"
        )
    return files


def _contains(file: Path, needle: bytes) -> bool:
    overlap = len(needle) - 1
    tail = b""
    with open(file, "rb") as handle:
        if file.suffix == ".safetensors":
            # Only the JSON header of a safetensors file holds text; the rest is tensor data.
            length = int.from_bytes(handle.read(8), "little")
            return needle in handle.read(min(length, _MAX_HEADER_BYTES))
        while block := handle.read(_SCAN_BLOCK):
            if needle in tail + block:
                return True
            tail = block[-overlap:] if overlap else b""
    return False


def _check_no_token(
    folder: Path, files: list[str], token: str | None, card: str | None = None
) -> None:
    """Refuse to upload a folder whose files contain the token (a recipe that captured an
    environment, a log, ...). Every file is read, but only the headers of safetensors files;
    ``card`` is a card rendered in memory, to be uploaded as ``README.md``."""
    if not token:
        return
    leaking = [name for name in files if _contains(folder / name, token.encode())]
    if card is not None and token in card:
        leaking.append(CARD_FILE)
    if leaking:
        raise HubPushError(
            f"{folder}: refusing to push, the Hub token appears in {', '.join(leaking)}; "
            "remove it from these files first"
        )


def _default_commit_message(recipe: Recipe | None) -> str:
    if recipe is None:
        return "Upload model with hf_soups"
    what = f"{recipe.soup.method} soup" if recipe.soup else recipe.method
    return f"Upload {what} made with {recipe.library or 'hf_soups'}"


def _public_recipe(recipe: Recipe | None) -> bytes | None:
    """``soup.json`` as published, when it differs from the folder's: local sources reduced to
    their folder names (:meth:`Recipe.public`)."""
    if recipe is None:
        return None
    public = recipe.public()
    return None if public == recipe else (json.dumps(public.to_dict(), indent=2) + "\n").encode()


def _card_names(repo_id: str) -> dict[str, str]:
    return {"model_name": repo_id.split("/")[-1], "repo_id": repo_id}


def _needs_branch(revision: str | None) -> bool:
    return (
        bool(revision)
        and revision != constants.DEFAULT_REVISION
        and not revision.startswith("refs/pr/")
    )


def _check_repo_id(repo_id: str) -> None:
    """The checks that need no network: a valid repo id, and online mode."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise HubPushError(f"repo_id {repo_id!r} is not a valid Hub repo id ({error})") from None
    if constants.is_offline_mode():
        raise HubPushError(
            f"cannot push to {repo_id}: offline mode is on (HF_HUB_OFFLINE); unset it"
        )


def check_push_access(
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
) -> None:
    """Make sure a push to ``repo_id`` can happen: the Hub is reachable, the token is accepted,
    and the repository (and branch ``revision``) exist, created if missing.

    Called by :func:`push_folder` before it sends any file; call it yourself before building a
    folder you mean to push, so that an unreachable Hub costs no merging.

    Raises:
        HubPushError: invalid repo id, offline mode, or a network or Hub error, in one line that
            never contains the token.
    """
    _check_repo_id(repo_id)
    api = HfApi()
    step = "create the repository"
    try:
        api.create_repo(repo_id, token=token, private=private, exist_ok=True)
        if _needs_branch(revision):
            step = f"create the branch {revision!r}"
            api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
    except _HUB_ERRORS as error:
        # The original exception (whose request may carry the token) is not chained.
        message = _one_line(error, _resolve_token(token))
        raise HubPushError(f"could not {step} for {repo_id}: {message}") from None


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    write_missing_card: bool = True,
) -> CommitInfo:
    """Upload a model folder to a Hub model repository in one commit.

    Creates the repository if needed (``create_repo(exist_ok=True)``) and the branch
    ``revision`` if it is missing, then commits every file of the folder at once.

    Args:
        folder: the model folder (weights, config, ``soup.json``, ``README.md``, plots...).
        repo_id: ``"user/name"`` or ``"org/name"``.
        private: visibility of a repository created by this call (an existing repository keeps
            its own). ``None``: the account's default.
        token: a Hub token; default ``HF_TOKEN`` or the cached login. ``False``: anonymous.
        commit_message: the commit's title; default names the method and hf_soups' version.
        revision: the branch to commit to (created from ``main`` if missing); default ``main``.
        write_missing_card: when the folder has a recipe and no card, render ``README.md`` from
            ``soup.json``, upload it with the files, and write it into the folder once the
            commit is made.

    Returns:
        The commit's :class:`~huggingface_hub.CommitInfo` (``.commit_url``, ``.oid``).

    Raises:
        FileNotFoundError: ``folder`` is not a folder.
        HubPushError: invalid repo id, offline mode, the token inside a file, or a network or
            Hub error (one line that never contains the token). Nothing in ``folder`` changes
            when the push fails.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such model folder to push")
    _check_repo_id(repo_id)
    recipe = Recipe.load(folder) if (folder / RECIPE_FILE).exists() else None
    card = None
    if write_missing_card and not (folder / CARD_FILE).exists() and recipe is not None:
        card = str(render_card(folder, recipe=recipe, **_card_names(repo_id)))
    public_recipe = _public_recipe(recipe)
    files = _folder_files(folder)
    if not files:
        raise HubPushError(f"{folder}: nothing to push, the folder is empty")
    secret = _resolve_token(token)
    _check_no_token(folder, files, secret, card)
    commit_message = commit_message or _default_commit_message(recipe)
    size = sum((folder / name).stat().st_size for name in files)
    logger.info(
        "Pushing %d files (%.1f MB) from %s to %s%s",
        len(files) + (card is not None),
        size / 1e6,
        folder,
        repo_id,
        f"@{revision}" if revision else "",
    )
    check_push_access(repo_id, private=private, token=token, revision=revision)
    operations = [
        CommitOperationAdd(
            path_in_repo=name,
            path_or_fileobj=public_recipe
            if name == RECIPE_FILE and public_recipe is not None
            else folder / name,
        )
        for name in files
    ]
    if card is not None:
        operations.append(CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=card.encode()))
    try:
        commit = HfApi().create_commit(
            repo_id, operations, commit_message=commit_message, token=token, revision=revision
        )
    except _HUB_ERRORS as error:
        # The server's message is kept but the token is scrubbed, and the original exception
        # (whose request may carry the token) is not chained.
        message = _one_line(error, secret)
        raise HubPushError(
            f"could not commit the folder to {repo_id} from {folder}: {message}"
        ) from None
    if card is not None:
        # The folder now matches the repository; written only once the Hub took the commit.
        write_card(folder, **_card_names(repo_id))
    logger.info("Pushed %s to %s", folder, commit.commit_url)
    return commit
