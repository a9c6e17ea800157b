"""The Ray-free inference side: load a model folder, preprocess as in training, evaluate, export,
predict on files.

Kept light on purpose: importing ``bigmodel.inference`` pulls in no onnx, onnxruntime or mlflow;
each submodule imports what it needs.
"""
