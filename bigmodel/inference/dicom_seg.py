"""Segmentations of a DICOM series as a DICOM Segmentation object (highdicom).

A PACS or viewer shows a DICOM SEG over the series it references: each structure is a segment
(label, SNOMED-CT category/type, the algorithm that made it), frames are tied to the source
slices by their SOP Instance UIDs and geometry. highdicom builds and validates it; we only map
our label volume (slices in the series' order) onto its segments.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bigmodel import __version__
from bigmodel.inference.files import Study, atomic_write

__all__ = ["write_dicom_seg"]


def write_dicom_seg(
    path: Path, labels_zyx: np.ndarray, study: Study, classes: list[str], model_name: str = ""
) -> Path:
    """Write ``labels_zyx`` (``[slices, rows, cols]``, series order) as a DICOM SEG at ``path``.

    Class 0 is background and gets no segment; classes 1..K-1 become segments 1..K-1.
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    sources = [pydicom.dcmread(f) for f in study.dicom_files]
    if labels_zyx.shape[0] != len(sources):
        raise ValueError(
            f"{study.path}: {labels_zyx.shape[0]} label slices for {len(sources)} DICOM files"
        )
    algorithm = hd.AlgorithmIdentificationSequence(
        name=model_name or "bigmodel",
        version=__version__,
        family=codes.cid7162.ArtificialIntelligence,
    )
    segments = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=name[:64],
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for number, name in enumerate(classes[1:], start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=sources,
        # A label map: pixel value k marks segment k (highdicom splits it into binary frames).
        pixel_array=np.ascontiguousarray(labels_zyx.astype(np.uint8)),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=hd.UID(),
        series_number=900,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="bigmodel",
        manufacturer_model_name=(model_name or "bigmodel")[:64],
        software_versions=__version__,
        device_serial_number="0",
        omit_empty_frames=False,
    )
    return atomic_write(path, lambda tmp: seg.save_as(str(tmp)))
