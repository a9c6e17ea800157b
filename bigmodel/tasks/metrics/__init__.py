"""The metric group of each task type (torchmetrics underneath; ``bigmodel.metrics`` joins them).

Each group reads one head's outputs and the batch (``update(output, batch)``) and reports its
figures (``compute() -> {figure: value}``); see :mod:`bigmodel.metrics` for the names.
"""

from bigmodel.tasks.metrics._classification import ClassificationMetrics
from bigmodel.tasks.metrics._contrastive import ContrastiveMetrics
from bigmodel.tasks.metrics._detection import DetectionMetrics
from bigmodel.tasks.metrics._retrieval import RetrievalMetrics
from bigmodel.tasks.metrics._segmentation import SegmentationMetrics

__all__ = [
    "ClassificationMetrics",
    "ContrastiveMetrics",
    "DetectionMetrics",
    "RetrievalMetrics",
    "SegmentationMetrics",
]
