"""An exported ``model.onnx`` behind the interface the whole-image code calls (ONNX Runtime).

``bigmodel-export`` writes graphs that take ``[N, C, S, S]`` windows (``S`` = training size).
:class:`OnnxModel` looks like a ``MultiTaskModel`` to ``bigmodel.models.window`` (``head_configs``
and ``model(images)["outputs"]``), so sliding windows, fitting and every writer work unchanged;
images smaller than a window are padded with 0 (the normalised mean) and each head's task cuts
its output back (``Task.crop``). On CPU ONNX Runtime runs these convolutional graphs several times faster than eager
PyTorch (see ``benchmarks/bench_predict.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bigmodel.model_folder import LoadedModel, ModelFolderError
from bigmodel.tasks import TASKS

__all__ = ["ONNX_FILE", "OnnxModel"]

ONNX_FILE = "model.onnx"


class OnnxModel(nn.Module):
    """``model.onnx`` of a model folder, run by ONNX Runtime (CUDA when available, else CPU)."""

    def __init__(self, loaded: LoadedModel, device: torch.device) -> None:
        super().__init__()
        import onnxruntime as ort

        path = Path(loaded.path) / ONNX_FILE
        if not path.is_file():
            raise ModelFolderError(
                f"{path}: missing; write it with bigmodel-export {loaded.path} --out DIR "
                f"--format safetensors,onnx and predict with DIR"
            )
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(path), providers=providers)
        self.names = [output.name for output in self.session.get_outputs()]
        self.input = self.session.get_inputs()[0].name
        self.size = loaded.preprocessing.image_size
        self.tasks = {name: TASKS[loaded.preprocessing.head_types[name]] for name in self.names}
        self.head_configs = {name: loaded.config.model.heads[name] for name in self.names}

    def forward(self, images: torch.Tensor, batch: Any = None) -> dict[str, Any]:
        height, width = images.shape[-2:]
        pad_h, pad_w = max(0, self.size - height), max(0, self.size - width)
        top, left = pad_h // 2, pad_w // 2
        if pad_h or pad_w:
            images = F.pad(images, (left, pad_w - left, top, pad_h - top), value=0.0)
        feed = {self.input: images.detach().float().cpu().contiguous().numpy()}
        outputs = {}
        for name, value in zip(self.names, self.session.run(None, feed), strict=True):
            outputs[name] = self.tasks[name].crop(
                torch.from_numpy(value), (top, left), (height, width)
            )
        return {"outputs": outputs}
