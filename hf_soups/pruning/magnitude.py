"""Magnitude pruning: keep the weights of largest absolute value (globally or per layer)."""

from __future__ import annotations

from hf_soups.pruning.scorer import OneShotScorer


class Magnitude(OneShotScorer):
    """Score ``|w|``. With ``scope="global"`` one threshold over all prunable tensors (Frankle &
    Carbin's global variant), with ``scope="layer"`` each tensor keeps the same share."""

    name = "magnitude"

    def scores(self, model, parameters):
        return {name: parameter.detach().abs() for name, parameter in parameters.items()}
