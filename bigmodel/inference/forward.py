"""One forward pass as training saw its inputs: whole images, at native or ``fit`` resolution.

* ``data.resize=none`` (the model trained on ``image_size`` crops at native resolution):
  :func:`bigmodel.models.window.whole_image_outputs`, sliding windows where an image is larger.
* ``data.resize=fit`` (the model trained on images scaled so the longer side is ``image_size``,
  padded to a square): the image is fitted the same way (``window.fit_to_size``), the model runs
  once, and each head's task maps its output back to the input's pixels (``Task.to_pixels``:
  padding cut off, logits resized bilinearly; boxes shifted and scaled), so labels and volumes
  are in the input's own grid.

Used by ``Predictor`` and ``bigmodel-eval`` alike, so both see the same outputs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from bigmodel.models.window import fit_to_size, whole_image_outputs
from bigmodel.preprocessing import Preprocessing
from bigmodel.tasks import TASKS

__all__ = ["forward"]


def _fitted_geometry(height: int, width: int, size: int) -> tuple[float, int, int, int, int]:
    """Scale and the (top, left, new_h, new_w) placement ``fit_to_size`` uses."""
    scale = min(size / height, size / width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    return scale, (size - new_h) // 2, (size - new_w) // 2, new_h, new_w


@torch.inference_mode()
def forward(model: nn.Module, images: Tensor, prep: Preprocessing) -> dict[str, Any]:
    """``{head: output}`` for normalised whole images ``[B, C, H, W]`` in the input's pixels."""
    if prep.resize != "fit":
        return whole_image_outputs(model, images, prep.image_size)
    height, width = int(images.shape[-2]), int(images.shape[-1])
    size = prep.image_size
    scale, top, left, new_h, new_w = _fitted_geometry(height, width, size)
    outputs = model(fit_to_size(images, size))["outputs"]
    return {
        name: TASKS[prep.head_types[name]].to_pixels(
            out, (top, left), (new_h, new_w), (height, width), scale
        )
        for name, out in outputs.items()
    }
