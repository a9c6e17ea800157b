"""The MLflow side of a finished model: tracking runs and the MLflow Model Registry.

This module will hold the MLflow tracking and Model Registry code (register, promote, roll back,
lineage, and ``resolve_model_uri`` for ``models:/name@alias``). The model folder itself
(``save_model``, weights, model card) lives in ``bigmodel.inference.model_folder``.
"""
