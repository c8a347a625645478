"""Accuracy: the fraction of examples whose predicted class equals the reference class.

Shipped inside hf_soups so that ``evaluate.load(<path to this file>)`` works offline; it
computes the same number as the Hub's ``evaluate-metric/accuracy`` for class labels.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Accuracy is the proportion of correct predictions among all examples:
Accuracy = (number of examples with prediction == reference) / (number of examples).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): Predicted class indices.
    references (`list` of `int`): Ground-truth class indices.
    normalize (`bool`, defaults to `True`): If `False`, return the number of correct
        predictions instead of the fraction.
    sample_weight (`list` of `float`, *optional*): Per-example weights.

Returns:
    accuracy (`float`): In [0, 1] when `normalize` is true, else the (weighted) count.

Examples:
    >>> accuracy = evaluate.load("hf_soups/metrics/accuracy")
    >>> accuracy.compute(predictions=[0, 1, 2, 1], references=[0, 1, 1, 1])
    {'accuracy': 0.75}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        if predictions.shape != references.shape:
            raise ValueError(
                f"accuracy: {predictions.shape[0]} predictions but {references.shape[0]} references"
            )
        correct = (predictions == references).astype(np.float64)
        weights = np.ones_like(correct) if sample_weight is None else np.asarray(sample_weight)
        total = float(np.sum(correct * weights))
        if normalize:
            total /= float(np.sum(weights))
        return {"accuracy": total}
