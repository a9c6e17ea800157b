"""The task table: every head type builds end to end from it, and its checks run at config load."""

from __future__ import annotations

import subprocess
import sys
import typing

import pytest
import torch

from bigmodel.config import ConfigError, HeadConfig, config_from_dict, load_config
from bigmodel.metrics import build_metrics
from bigmodel.models import build_model
from bigmodel.tasks import TASKS
from sharding.format import TASK_MEMBERS

pytestmark = pytest.mark.usefixtures("one_thread")

B, SIZE, K = 4, 64, 3

# The smallest head of each type, with its target and class count as resolve_config leaves them.
TINY_HEADS = {
    "classification": {"num_classes": K},
    "segmentation": {"num_classes": K, "decoder_channels": 16},
    "detection": {"num_classes": K, "fpn_channels": 16},
    "retrieval": {"embed_dim": 8, "target": "group"},
    "contrastive": {"projection_dim": 8},
}


def _config(kind: str, **head):
    head = {"type": kind, **TINY_HEADS[kind], **head}
    return config_from_dict(
        {"model": {"backbone": {"name": "test_resnet", "in_chans": 1}, "heads": {"h": head}}}
    )


def _batch() -> dict:
    g = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[8.0, 8.0, 40.0, 40.0]])
    return {
        "image": torch.randn(B, 1, SIZE, SIZE, generator=g),
        "cls": torch.tensor([0, 1, 2, 1]),
        "mask": torch.randint(0, K, (B, SIZE, SIZE), generator=g),
        "boxes": [{"boxes": boxes, "labels": torch.tensor([i % K])} for i in range(B)],
        "group": ["p1", "p1", "p2", "p2"],
        "has": {f: torch.ones(B, dtype=torch.bool) for f in ("cls", "mask", "boxes")},
    }


def test_table_covers_the_config_schema_and_names_real_classes():
    config_types = {
        typing.get_args(cls.model_fields["type"].annotation)[0]
        for cls in typing.get_args(typing.get_args(HeadConfig)[0])
    }
    assert set(TASKS) == config_types
    for kind, task in TASKS.items():
        for member in (task.head, task.loss, task.metrics):
            assert isinstance(member, type), (kind, member)
        # every target is a manifest task (sharding/format.py) or the patient group
        assert set(task.targets) <= {*TASK_MEMBERS, "group"}, kind


@pytest.mark.parametrize("kind", sorted(TASKS))
def test_every_task_builds_trains_and_scores_from_the_table(kind):
    """config -> model -> loss -> backward -> eval outputs -> metrics, for each table entry."""
    cfg = _config(kind)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    assert type(model.heads["h"]) is TASKS[kind].head
    assert type(model.criteria["h"]) is TASKS[kind].loss
    batch = _batch()
    out = model(batch["image"], batch)
    loss = out["losses"]["h"]
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    grads = [p.grad for p in model.heads["h"].parameters() if p.requires_grad]
    assert any(g is not None and torch.count_nonzero(g) for g in grads)
    model.eval()
    with torch.no_grad():
        outputs = model(batch["image"])["outputs"]
    metrics = build_metrics(cfg.model)
    assert type(metrics.groups["h"]) is TASKS[kind].metrics
    metrics.update(outputs, batch)
    figures = metrics.compute()
    assert figures["h/count"] > 0


@pytest.mark.parametrize(
    "kind,head,match",
    [
        ("segmentation", {"target": "cls"}, r"model\.heads\.h\.target='cls'.*allowed: mask"),
        ("classification", {"target": "boxes"}, r"model\.heads\.h\.target='boxes'.*allowed: cls"),
        ("segmentation", {"num_classes": 1}, r"model\.heads\.h\.num_classes=1.*at least 2"),
        (
            "classification",
            {"class_weights": [1.0, 2.0]},
            r"model\.heads\.h\.class_weights has 2 entries for num_classes=3",
        ),
    ],
)
def test_head_checks_run_when_the_config_is_loaded(tmp_path, kind, head, match):
    with pytest.raises(ConfigError, match=match):
        _config(kind, **head)
    path = tmp_path / "run.yaml"
    path.write_text(f"model:\n  heads:\n    h: {{type: {kind}}}\n")
    override = [f"model.heads.h.{k}={v}" for k, v in head.items()]
    with pytest.raises(ConfigError, match=match) as err:
        load_config(
            path, override + ["model.heads.h.num_classes=" + str(head.get("num_classes", 3))]
        )
    assert str(path) in str(err.value)


def test_num_classes_may_wait_for_the_manifest_until_the_model_is_built():
    cfg = config_from_dict({"model": {"heads": {"h": {"type": "classification"}}}})
    with pytest.raises(ConfigError, match=r"model\.heads\.h\.num_classes is not set"):
        build_model(cfg.model)


def test_loading_a_config_imports_no_torch():
    """Light CLIs load configs: the table's heavy members stay unimported until used."""
    code = (
        "import sys; from bigmodel.config import load_config; from bigmodel.config import HEAD_CONFIGS as TASKS; "
        "assert TASKS['segmentation'].min_classes == 2; "
        "print(sorted(m for m in ('torch', 'timm', 'torchmetrics') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_each_task_says_what_its_prediction_means_in_one_line():
    classification = {"probabilities": {"normal": 0.25, "abnormal": 0.75}, "predicted": "abnormal"}
    assert TASKS["classification"].one_line("diag", classification) == "diag=abnormal (p 0.75)"
    assert TASKS["retrieval"].one_line("patient", {"embedding": [0.1] * 32}) == (
        "patient: 32-d embedding"
    )
    volumes = {"volumes_ml": {"tissue": 12.34}}
    assert TASKS["segmentation"].one_line("organs", volumes) == "organs: tissue 12.3 mL"
