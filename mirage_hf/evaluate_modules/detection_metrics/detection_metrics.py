"""Local `evaluate` module for MiraGe detection metrics; the math lives in mirage_hf.metrics.

Load it with ``mirage_hf.metrics.load_detection_metric()`` (``evaluate.load`` on this folder), never by a Hub
name: nothing is downloaded, so it works offline. One import per line: evaluate's dependency scanner misreads
``import a, b`` (hf-notes.md section 6).
"""

import datasets
import evaluate

from mirage_hf.metrics import detection_metrics

_DESCRIPTION = """
Metrics for AI-generated image detection (real = 0, fake = 1): accuracy, real accuracy (TNR) and fake accuracy
(TPR) at a decision threshold (fake iff p_fake >= threshold), average precision and ROC AUC with fake as the
positive class, TPR at 5% FPR (conservative: best achievable ROC point with FPR <= 5%, no interpolation), and
expected calibration error (15 equal-width bins over the confidence of the argmax class). AP, AUC and TPR@5%FPR
are NaN when only one class is present.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `float`): probability of fake, in [0, 1].
    references (`list` of `int`): 0 = real, 1 = fake.
    threshold (`float`, default 0.5): predict fake iff the probability is >= threshold.
Returns:
    dict with accuracy, real_accuracy, fake_accuracy, average_precision, roc_auc, tpr_at_5_fpr, ece,
    n, n_real, n_fake.
Example:
    >>> metric = mirage_hf.metrics.load_detection_metric()
    >>> metric.compute(predictions=[0.1, 0.8], references=[0, 1])["accuracy"]
    1.0
"""

_CITATION = """
MiraGe: Shi, Lu, Ye, Zhang, Fang. ACM Multimedia 2025. arXiv:2508.01525.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class DetectionMetrics(evaluate.Metric):
    """Thin adapter: evaluate handles batching / distributed gathering, mirage_hf.metrics computes."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("float64"),
                    "references": datasets.Value("int32"),
                }
            ),
        )

    def _compute(self, predictions, references, threshold=0.5):
        return detection_metrics(references, predictions, threshold)
