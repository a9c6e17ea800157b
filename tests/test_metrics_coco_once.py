"""Detection mAP over two gloo ranks: COCOeval runs once, on rank 0, and every rank gets its figures.

The images are split unevenly (rank 1 holds one of seven), so a gather that assumed equal
shares would fail. The count of COCOeval runs per process comes from wrapping
``COCOeval.evaluate`` with a counter that still calls the real method.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _engine_tiny import free_port, set_dist_env
from pycocotools.cocoeval import COCOeval

from bigmodel.config import DetectionHeadConfig
from bigmodel.metrics import DetectionMetrics

K = 3
SPLIT = 6  # rank 0 holds images [0, 6), rank 1 the rest


def _images(n: int = 7, seed: int = 0) -> list[tuple[dict, dict]]:
    """(detections, target) per image: jittered ground truth, some misses, some false alarms."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        xy = rng.uniform(0, 40, (4, 2))
        gt = np.concatenate([xy, xy + rng.uniform(6, 20, (4, 2))], axis=1).astype(np.float32)
        labels = rng.integers(0, K, 4)
        det = gt[:3] + rng.normal(0, 1.5, (3, 4)).astype(np.float32)
        det = np.concatenate([det, rng.uniform(0, 50, (1, 4)).astype(np.float32) + [0, 0, 8, 8]])
        images.append(
            (
                {
                    "boxes": torch.from_numpy(det),
                    "scores": torch.from_numpy(rng.uniform(0.1, 1, 4).astype(np.float32)),
                    "labels": torch.from_numpy(np.append(labels[:3], 0)).long(),
                },
                {"boxes": torch.from_numpy(gt), "labels": torch.from_numpy(labels).long()},
            )
        )
    return images


def _figures(images: list[tuple[dict, dict]]) -> dict[str, float]:
    metric = DetectionMetrics("det", DetectionHeadConfig(num_classes=K))
    for det, target in images:
        metric.update([det], {"boxes": [target]})
    return metric.compute()


def _count_coco_runs() -> list[int]:
    runs = [0]
    evaluate = COCOeval.evaluate

    def counted(self):
        runs[0] += 1
        return evaluate(self)

    COCOeval.evaluate = counted
    return runs


def _rank_main(rank: int, world_size: int, port: int, out_dir: str) -> None:
    set_dist_env(rank, world_size, port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        runs = _count_coco_runs()
        images = _images()
        figures = _figures(images[:SPLIT] if rank == 0 else images[SPLIT:])
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"figures": figures, "coco_runs": runs[0]}, f)
    finally:
        dist.destroy_process_group()


def test_coco_eval_runs_once_on_rank_0_and_matches_one_process(tmp_path):
    mp.spawn(_rank_main, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    whole = _figures(_images())
    assert whole["count"] == 7 and 0 < whole["map_50"] < 1  # a figure a wrong gather would move
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["coco_runs"] for r in results] == [1, 0]
    for rank, result in enumerate(results):
        assert result["figures"].keys() == whole.keys()
        for name, value in whole.items():
            assert result["figures"][name] == pytest.approx(value, abs=1e-9), (rank, name)
