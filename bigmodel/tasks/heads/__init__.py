"""Task heads. Each is a plain module taking the backbone's list of feature maps."""

from bigmodel.tasks.heads.classification import ClassificationHead
from bigmodel.tasks.heads.contrastive import ContrastiveHead
from bigmodel.tasks.heads.detection import DetectionHead
from bigmodel.tasks.heads.retrieval import RetrievalHead, RetrievalIndex
from bigmodel.tasks.heads.segmentation import SegmentationHead

__all__ = [
    "ClassificationHead",
    "ContrastiveHead",
    "DetectionHead",
    "RetrievalHead",
    "RetrievalIndex",
    "SegmentationHead",
]
