"""Source-format readers (nnU-Net/MSD, NIfTI+CSV, DICOM, image folders, CSV, COCO, npz)."""
