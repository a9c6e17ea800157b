"""The config schema: YAML in, dotted overrides, errors that name the field."""

import pytest

from bigmodel.config import ConfigError, apply_overrides, load_config

MINIMAL = """
model:
  backbone: {name: resnet18}
  heads:
    diag: {type: classification}
"""


def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides(tmp_path):
    cfg = load_config(_write(tmp_path, MINIMAL), ["train.epochs=3", "data.batch_size=8"])
    assert cfg.train.epochs == 3
    assert cfg.data.batch_size == 8
    assert cfg.model.heads["diag"].type == "classification"


@pytest.mark.parametrize("cpus,workers", [(1, 0), (2, 0), (4, 2), (16, 8)])
def test_loader_workers_follow_the_cpus_a_worker_reserves(tmp_path, cpus, workers):
    cfg = load_config(_write(tmp_path, MINIMAL), [f"cluster.cpus_per_worker={cpus}"])
    assert cfg.data.loader_workers == workers
    # set explicitly, it is kept, and a saved config reloads the same number
    cfg = load_config(
        _write(tmp_path, MINIMAL), [f"cluster.cpus_per_worker={cpus}", "data.loader_workers=3"]
    )
    assert cfg.data.loader_workers == 3


def test_volumes_get_a_small_shuffle_buffer_unless_set(tmp_path):
    volume = ["model.backbone.name=resenc3d", "model.backbone.spatial_dims=3"]
    assert load_config(_write(tmp_path, MINIMAL)).data.shuffle_buffer == 1000
    cfg = load_config(_write(tmp_path, MINIMAL), volume)
    assert cfg.data.shuffle_buffer == 16 and "shuffle_buffer" not in cfg.data.model_fields_set
    cfg = load_config(_write(tmp_path, MINIMAL), [*volume, "data.shuffle_buffer=64"])
    assert cfg.data.shuffle_buffer == 64


def test_unknown_key_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.epochz"):
        load_config(_write(tmp_path, MINIMAL), ["train.epochz=3"])


def test_wrong_type_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.batch_size"):
        load_config(_write(tmp_path, MINIMAL), ["data.batch_size=many"])


def test_bad_choice_lists_allowed_values(tmp_path):
    with pytest.raises(ConfigError, match=r"distributed\.strategy.*'ddp'"):
        load_config(_write(tmp_path, MINIMAL), ["distributed.strategy=horovod"])


def test_zero_needs_deepspeed(tmp_path):
    with pytest.raises(ConfigError, match="strategy=deepspeed"):
        load_config(_write(tmp_path, MINIMAL), ["distributed.zero_stage=2"])


def test_model_is_required_and_needs_a_head():
    with pytest.raises(ConfigError, match="model: Field required"):
        load_config(None)
    with pytest.raises(ConfigError, match="model.heads is empty"):
        load_config(None, ["model.backbone.name=resnet18", "model.heads={}"])


def test_lr_scaling_and_global_batch(tmp_path):
    cfg = load_config(
        _write(tmp_path, MINIMAL),
        [
            "data.batch_size=64",
            "cluster.num_workers=4",
            "optim.accumulation_steps=2",
            "optim.lr=0.1",
            "optim.reference_batch_size=256",
        ],
    )
    assert cfg.global_batch_size == 512
    assert cfg.optim.lr_scaling == "auto"
    cfg.optim.name = "adamw"  # auto: sqrt for adaptive optimizers, as timm does
    assert cfg.scaled_lr() == pytest.approx(0.1 * 2**0.5)
    cfg.optim.name = "sgd"  # auto: linear for SGD and LARS
    assert cfg.scaled_lr() == pytest.approx(0.2)
    cfg.optim.lr_scaling = "sqrt"
    assert cfg.scaled_lr() == pytest.approx(0.1 * 2**0.5)
    cfg.optim.lr_scaling = "none"
    assert cfg.scaled_lr() == pytest.approx(0.1)


def test_save_roundtrip(tmp_path):
    cfg = load_config(_write(tmp_path, MINIMAL), ["seed=7"])
    cfg.save(tmp_path / "run" / "config.yaml")
    again = load_config(tmp_path / "run" / "config.yaml")
    assert again == cfg


def test_override_into_value_is_an_error():
    with pytest.raises(ConfigError, match="is a value"):
        apply_overrides({"seed": 1}, ["seed.x=2"])
