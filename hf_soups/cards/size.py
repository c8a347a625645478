"""A card's "Model size" part: parameters and forward FLOPs of one example, counted from the
folder's ``config.json`` (:func:`hf_soups.pruning.flops.folder_counts`), and for a sparse model
the parameters its pruning mask leaves nonzero.

Architectures the counts do not cover (open_clip folders, other configs) get no such part.
"""

from __future__ import annotations

from pathlib import Path

from hf_soups.cards.sparsity import MaskCount


def flops_note(text_tokens: int | None, *, images: bool) -> str:
    """The FLOP convention, said once, with the text length a CLIP text tower was counted at
    (``images``: the model has an image tower)."""
    from hf_soups.pruning.flops import FLOPS_CONVENTION

    if text_tokens is None:
        length = ""
    elif images:
        length = f" of {text_tokens} tokens"  # the convention ends on "one image and one text"
    else:
        length = f"; a text model's example is one text of {text_tokens} tokens"
    return f"FLOPs: {FLOPS_CONVENTION}{length}."


def size_section(folder: Path, masks: dict[str, MaskCount] | None = None) -> str | None:
    """The markdown of the card's "Model size" section, or ``None`` when the folder's
    architecture is not counted.

    Args:
        folder: the model folder (its ``config.json`` is read).
        masks: :func:`~hf_soups.cards.sparsity.mask_counts` of the folder, for a sparse model.
    """
    # Imported here: importing hf_soups.cards must not import torch (test_cards checks it).
    from hf_soups.pruning.flops import folder_counts

    counts = folder_counts(folder)
    if counts is None:
        return None
    parameters, flops = counts["parameters"], counts["flops"]
    if masks is None:
        table = [
            "| Parameters | Forward FLOPs per example |",
            "|---|---|",
            f"| {parameters:,} | {flops:,} |",
        ]
        sparse = ""
    else:
        nonzero = parameters - sum(m.total - m.kept for m in masks.values())
        table = [
            "| Parameters | Kept (nonzero) parameters | Forward FLOPs per example |",
            "|---|---|---|",
            f"| {parameters:,} | {nonzero:,} ({nonzero / parameters:.1%}) | {flops:,} |",
        ]
        sparse = (
            " Kept parameters: all but those the pruning mask zeroes (the weights it keeps, and "
            "the biases, norms and embeddings it leaves dense). Dense kernels multiply the zeros "
            "too: the FLOPs are the dense model's."
        )
    note = flops_note(counts.get("text_tokens"), images="image_tokens" in counts)
    source = f"Counted from `config.json` (`{counts['architecture']}`)."
    return "\n".join([*table, "", f"{source}{sparse} {note}"])
