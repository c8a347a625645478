"""Merge methods: rules combining the ingredients' tensors of one name into one tensor.

Every method is a :class:`MergeMethod` run tensor by tensor by the streaming engine
(:func:`hf_soups.merge.merge`), so all of them share its sharding, dtype handling, atomic output
and bounded memory. :data:`METHODS` names them for recipes and the command line;
:func:`get_method` builds one from its name and parameters, which is how a recipe replays:
``get_method(recipe.method, **recipe.parameters)`` rebuilds the method that made a folder.
"""

from __future__ import annotations

import inspect

from hf_soups.methods.base import MergeMethod, TensorLoader, WeightedAverage, check_method_inputs
from hf_soups.methods.dare import DARETIES, DARELinear
from hf_soups.methods.fisher import FisherAverage, compute_fisher
from hf_soups.methods.model_stock import ModelStock
from hf_soups.methods.per_tensor import PerTensorWeights
from hf_soups.methods.task_arithmetic import TaskArithmetic
from hf_soups.methods.ties import TIES
from hf_soups.methods.wise_ft import Interpolation

METHODS: dict[str, type[MergeMethod]] = {
    method.name: method
    for method in (
        WeightedAverage,
        PerTensorWeights,
        Interpolation,
        TaskArithmetic,
        TIES,
        DARELinear,
        DARETIES,
        ModelStock,
        FisherAverage,
    )
}


def get_method(name: str, **params) -> MergeMethod:
    """Build the method registered as ``name`` (a key of :data:`METHODS`) with ``params``.

    Raises:
        ValueError: the name is unknown, or a parameter is not one the method takes (the message
            lists the ones it does).
    """
    try:
        method = METHODS[name]
    except KeyError:
        raise ValueError(
            f"unknown merge method {name!r}; choose one of {', '.join(sorted(METHODS))}"
        ) from None
    signature = inspect.signature(method)
    try:
        signature.bind(**params)
    except TypeError as error:
        accepted = ", ".join(signature.parameters) or "none"
        raise ValueError(f"method {name!r}: {error} (its parameters: {accepted})") from None
    return method(**params)


__all__ = [
    "DARELinear",
    "DARETIES",
    "METHODS",
    "FisherAverage",
    "Interpolation",
    "MergeMethod",
    "ModelStock",
    "PerTensorWeights",
    "TIES",
    "TaskArithmetic",
    "TensorLoader",
    "WeightedAverage",
    "check_method_inputs",
    "compute_fisher",
    "get_method",
]
