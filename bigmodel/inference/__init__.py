"""The Ray-free inference side: load a model folder, preprocess as in training, evaluate, export,
predict on files.

Modules: ``loading`` (``load_model``: a model folder or a ``models:/`` reference), ``forward``
(one pass as training saw its inputs), ``files`` (reading PNG/NIfTI/DICOM, atomic writes),
``predict`` (``Predictor``, ``bigmodel-predict``), ``evaluate`` (``bigmodel-eval``), ``export``
(``bigmodel-export``), ``dicom_seg`` (DICOM SEG through highdicom). What they build on lies below
them, shared with the engine: the model folder (``bigmodel.model_folder``), its preprocessing
record (``bigmodel.preprocessing``), the sliding window (``bigmodel.models.window``), and the
tasks (``bigmodel.tasks``), which say what is done with each head's outputs: these modules ask
the task and never compare type names.

Kept light on purpose: importing ``bigmodel.inference`` pulls in no onnx, onnxruntime or mlflow;
each submodule imports what it needs.
"""
