"""Which tensors a pruner may zero: the weight matrices of Linear and Conv layers.

Biases, normalisation layers, embeddings (and their position ids) are left dense, as in the
papers whose scorers live here; so is the classification head unless asked, since pruning the
last layer removes whole classes' evidence at high sparsity.
"""

from __future__ import annotations

from torch import nn

#: Last component of a module path that names a classification or language-model head.
HEAD_NAMES = frozenset({"classifier", "head", "lm_head", "score"})

_PRUNABLE_TYPES = (nn.Linear, nn.modules.conv._ConvNd)


def _output_head(model: nn.Module) -> nn.Module | None:
    get_output = getattr(model, "get_output_embeddings", None)
    try:
        return get_output() if callable(get_output) else None
    except NotImplementedError:
        return None


def prunable_parameters(
    model: nn.Module, *, include_heads: bool = False
) -> dict[str, nn.Parameter]:
    """The weight matrices to prune, by in-memory parameter name (``model.named_parameters``).

    Args:
        model: any ``nn.Module``.
        include_heads: also prune the head (a module named ``classifier``, ``head``,
            ``lm_head`` or ``score``, or what ``get_output_embeddings`` returns).
    """
    output_head = _output_head(model)
    found: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        if not isinstance(module, _PRUNABLE_TYPES) or module.weight is None:
            continue
        is_head = module is output_head or module_name.rsplit(".", 1)[-1] in HEAD_NAMES
        if is_head and not include_heads:
            continue
        if id(module.weight) in seen:  # a weight tied to another module's is pruned once
            continue
        seen.add(id(module.weight))
        found[f"{module_name}.weight" if module_name else "weight"] = module.weight
    return found
