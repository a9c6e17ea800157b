"""An exported ``model.onnx`` behind the interface the whole-image code calls (ONNX Runtime).

Also the int8 graph: :class:`OnnxModel` runs ``model.int8.onnx`` the same way (``file=``), and
:func:`quantize_static_int8` makes it (``bigmodel-export --int8`` chooses the calibration
windows and checks the result against fp32).

``bigmodel-export`` writes graphs that take ``[N, C, S, S]`` windows (``S`` = training size).
:class:`OnnxModel` looks like a ``MultiTaskModel`` to ``bigmodel.models.window`` (``head_configs``
and ``model(images)["outputs"]``), so sliding windows, fitting and every writer work unchanged;
images smaller than a window are padded with 0 (the normalised mean) and each head's task cuts
its output back (``Task.crop``). On CPU ONNX Runtime runs these convolutional graphs several times faster than eager
PyTorch (see ``benchmarks/bench_predict.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bigmodel.model_folder import LoadedModel, ModelFolderError
from bigmodel.tasks import TASKS

__all__ = ["INT8_FILE", "ONNX_FILE", "OnnxModel", "quantize_static_int8"]

ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"


class OnnxModel(nn.Module):
    """``model.onnx`` (or ``file``) of a model folder, run by ONNX Runtime (CUDA when available)."""

    def __init__(self, loaded: LoadedModel, device: torch.device, file: str = ONNX_FILE) -> None:
        super().__init__()
        import onnxruntime as ort

        path = Path(loaded.path) / file
        if not path.is_file():
            how = "--int8 --calibration-shards SHARDS" if file == INT8_FILE else "--format onnx"
            raise ModelFolderError(
                f"{path}: missing; write it with bigmodel-export {loaded.path} --out DIR {how} "
                f"and predict with DIR"
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


class _Windows:
    """``onnxruntime.quantization.CalibrationDataReader`` over calibration windows, in batches."""

    def __init__(self, windows: np.ndarray, name: str, batch: int = 8) -> None:
        self.batches = iter([{name: windows[i : i + batch]} for i in range(0, len(windows), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def _head_nodes(model: Any, heads: Sequence[str]) -> list[str]:
    """Names of the graph nodes the dynamo exporter traced inside ``heads.<name>``."""
    scopes = {f"heads.{h}" for h in heads}
    names = []
    for node in model.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        if any(f"'{s}'" in meta.get("pkg.torch.onnx.name_scopes", "") for s in scopes):
            names.append(node.name)
    return names


def quantize_static_int8(
    fp32: Path,
    out: Path,
    windows: np.ndarray,
    per_channel: bool = True,
    exclude_heads: Sequence[str] = (),
) -> dict:
    """``quant_pre_process`` then ``quantize_static`` of ``fp32`` into ``out``.

    QDQ format (QuantizeLinear/DequantizeLinear pairs that ORT's CPU provider fuses into integer
    kernels), int8 weights (per output channel unless ``per_channel`` is off), uint8 activations
    with ranges from running ``windows`` (normalised ``[N, C, S, S]``) through the graph (MinMax),
    as ORT recommends for x86 CPUs (U8S8). Nodes of ``exclude_heads`` stay fp32.
    """
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_name(out.name + ".pre.onnx")
    try:
        try:
            quant_pre_process(str(fp32), str(pre))
            symbolic = True
        except Exception:  # noqa: BLE001 - ORT's symbolic shapes fail on some Expand graphs
            # (the retrieval head's norm); ONNX's own shape inference still runs.
            quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
            symbolic = False
        model = onnx.load(str(pre))
        excluded = _head_nodes(model, exclude_heads)
        quantize_static(
            str(pre),
            str(out),
            _Windows(windows, model.graph.input[0].name),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=excluded,
        )
    finally:
        pre.unlink(missing_ok=True)
    return {"symbolic_shapes": symbolic, "nodes_kept_fp32": len(excluded)}
