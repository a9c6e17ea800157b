"""Reading shards into batches for every task (see sharding/format.py for the format).

``load_manifest`` reads a shard folder's ``dataset.json``; ``resolve_config`` fills the model's
input channels and class counts from it (and refuses intensity schemes and resizes that do not
fit the data); ``make_train_loader`` / ``make_eval_loader`` yield batches that follow the batch
contract in docs/contracts.md. ``intensity_spec`` / ``apply_intensity`` are the intensity
preprocessing that training and prediction share.
"""

from bigmodel.data._augment import collate
from bigmodel.data._decode import SampleError
from bigmodel.data._integrity import DamagedShardError
from bigmodel.data.intensity import IntensitySpec, apply_intensity, intensity_spec
from bigmodel.data.manifest import (
    Manifest,
    ManifestError,
    data_intensity,
    load_manifest,
    resolve_config,
    validation_note,
)
from bigmodel.data.pipeline import (
    EvalLoader,
    SplitSamples,
    TrainLoader,
    make_eval_loader,
    make_train_loader,
    train_batches_per_epoch,
)

__all__ = [
    "DamagedShardError",
    "EvalLoader",
    "IntensitySpec",
    "Manifest",
    "ManifestError",
    "SampleError",
    "SplitSamples",
    "TrainLoader",
    "apply_intensity",
    "collate",
    "data_intensity",
    "intensity_spec",
    "load_manifest",
    "make_eval_loader",
    "make_train_loader",
    "resolve_config",
    "train_batches_per_epoch",
    "validation_note",
]
