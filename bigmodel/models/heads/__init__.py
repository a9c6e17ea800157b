"""Task heads. Each is a plain module taking the backbone's list of feature maps."""

from bigmodel.models.heads.classification import ClassificationHead
from bigmodel.models.heads.detection import DetectionHead
from bigmodel.models.heads.retrieval import RetrievalHead, RetrievalIndex
from bigmodel.models.heads.segmentation import SegmentationHead

__all__ = [
    "ClassificationHead",
    "DetectionHead",
    "RetrievalHead",
    "RetrievalIndex",
    "SegmentationHead",
]
