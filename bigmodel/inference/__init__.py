"""The Ray-free inference side: load a model folder, preprocess as in training, evaluate, export,
predict on files.

Modules: ``model_folder`` (save/load the folder: ``load_model``), ``preprocess`` (the
``preprocessing.json`` record, slicing volumes as the shard builder did, intensity transform),
``window`` (whole-image outputs with sliding windows), ``forward`` (one pass as training saw its
inputs), ``files`` (reading PNG/NIfTI/DICOM, atomic writes), ``predict`` (``Predictor``,
``bigmodel-predict``), ``evaluate`` (``bigmodel-eval``), ``export`` (``bigmodel-export``),
``dicom_seg`` (DICOM SEG through highdicom).

Kept light on purpose: importing ``bigmodel.inference`` pulls in no onnx, onnxruntime or mlflow;
each submodule imports what it needs.
"""
