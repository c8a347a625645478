"""Top-k accuracy: the fraction of examples whose reference class is among the k best scores.

Shipped inside hf_soups so that ``evaluate.load(<path to this file>)`` works offline.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Top-k accuracy counts an example as correct when its reference class has one of the k
highest scores. Ties are resolved in the example's favour: an example is a hit when fewer
than k classes score strictly higher than the reference class. With k=1 and no ties this is
ordinary accuracy of the argmax prediction.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): Per-class scores (logits or probabilities),
        one row per example.
    references (`list` of `int`): Ground-truth class indices.
    k (`int`, defaults to 5): How many of the best-scoring classes count as a hit.

Returns:
    top_{k}_accuracy (`float`): In [0, 1]; the key names k, e.g. `top_5_accuracy`.

Examples:
    >>> top_k = evaluate.load("hf_soups/metrics/top_k_accuracy")
    >>> scores = [[0.1, 0.5, 0.4], [0.8, 0.15, 0.05]]
    >>> top_k.compute(predictions=scores, references=[2, 2], k=2)
    {'top_2_accuracy': 0.5}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopKAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, predictions, references, k=5):
        if int(k) < 1:
            raise ValueError(f"top_k_accuracy: k must be at least 1, got {k}")
        scores = np.asarray(predictions, dtype=np.float32)
        references = np.asarray(references, dtype=np.int64)
        if scores.ndim != 2 or scores.shape[0] != references.shape[0]:
            raise ValueError(
                f"top_k_accuracy: expected scores of shape (n, classes) for {references.shape[0]} "
                f"references, got {scores.shape}"
            )
        reference_scores = scores[np.arange(len(references)), references]
        higher = (scores > reference_scores[:, None]).sum(axis=1)
        return {f"top_{int(k)}_accuracy": float(np.mean(higher < int(k)))}
