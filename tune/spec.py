"""The sweep file: a typed schema, loaded and checked before any trial starts.

A sweep is the training config (``bigmodel/config.py``) plus a search space over its dotted keys::

    name: cls-lr
    base: configs/classification.yaml        # a path, or the training config inline
    overrides: [train.epochs=10]             # dotted key=value, as on bigmodel-train's line
    metric: val/diagnosis/auroc
    mode: max
    num_samples: 16
    searcher: optuna                         # optuna (TPE) | random | grid
    scheduler: {type: asha, grace_period: 1, reduction_factor: 3}
    space:
      optim.lr: {type: loguniform, low: 1.0e-5, high: 1.0e-2}
      data.batch_size: {type: choice, values: [16, 32, 64]}
    resources: {num_workers: 2, cpus_per_worker: 4, use_gpu: true}

Every check that can fail without a cluster runs in :func:`load_sweep`: an unknown dotted key,
a value the training schema rejects at either end of a range (and inside it, which catches a
float range on an integer field) or in a choice, a distribution with invalid bounds, a metric the
configured heads cannot report. The resource check needs the cluster and lives in ``tune.cli``.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bigmodel.config import Config, ConfigError, apply_overrides, config_from_dict

__all__ = [
    "Choice",
    "Distribution",
    "Grid",
    "LogUniform",
    "QUniform",
    "RandInt",
    "ResourcesSpec",
    "SchedulerSpec",
    "Sweep",
    "SweepError",
    "SweepSpec",
    "load_sweep",
    "reportable_metrics",
    "with_values",
]

# Prefix of command-line overrides that address the sweep file instead of the training config.
SWEEP_PREFIX = "sweep."

# Where inside a continuous range one more value is checked: off the middle, so the value is
# not a whole number and a float range on an integer field is caught.
INTERIOR = 0.37


class SweepError(ConfigError):
    """A sweep that cannot run; the one-line message names the key and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


# --------------------------------------------------------------------------------------------
# distributions (one per Ray Tune sampling function; tune.search builds the Tune objects)


class Uniform(_Strict):
    """A float drawn uniformly from [low, high] (``tune.uniform``)."""

    type: Literal["uniform"] = "uniform"
    low: float
    """Lower end (inclusive)."""
    high: float
    """Upper end."""

    def problem(self) -> str | None:
        return (
            None if self.low < self.high else f"low {self.low:g} must be below high {self.high:g}"
        )

    def probes(self) -> list[Any]:
        return [self.low, self.low + INTERIOR * (self.high - self.low), self.high]


class LogUniform(_Strict):
    """A float whose logarithm is uniform in [log low, log high] (``tune.loguniform``)."""

    type: Literal["loguniform"] = "loguniform"
    low: float
    """Lower end, > 0."""
    high: float
    """Upper end."""

    def problem(self) -> str | None:
        if self.low <= 0:
            return f"low {self.low:g} must be > 0 for a log scale"
        return (
            None if self.low < self.high else f"low {self.low:g} must be below high {self.high:g}"
        )

    def probes(self) -> list[Any]:
        return [self.low, self.low * (self.high / self.low) ** INTERIOR, self.high]


class QUniform(_Strict):
    """A uniform float rounded to a multiple of ``q`` (``tune.quniform``)."""

    type: Literal["quniform"] = "quniform"
    low: float
    """Lower end."""
    high: float
    """Upper end."""
    q: float
    """Step the value is rounded to."""

    def problem(self) -> str | None:
        if self.q <= 0:
            return f"q {self.q:g} must be > 0"
        if self.low >= self.high:
            return f"low {self.low:g} must be below high {self.high:g}"
        if self.q > self.high - self.low:
            return f"q {self.q:g} is wider than the range [{self.low:g}, {self.high:g}]"
        return None

    def probes(self) -> list[Any]:
        return [self.low, self.high]


class RandInt(_Strict):
    """An integer from low (inclusive) to high (exclusive), as ``tune.randint``."""

    type: Literal["randint"] = "randint"
    low: int
    """Lowest value drawn."""
    high: int
    """One past the highest value drawn."""

    def problem(self) -> str | None:
        if self.low >= self.high:
            return f"low {self.low} must be below high {self.high} (high is exclusive)"
        return None

    def probes(self) -> list[Any]:
        return [self.low, self.high - 1]


class Choice(_Strict):
    """One of ``values``, drawn at random or by the model-based searcher (``tune.choice``)."""

    type: Literal["choice"] = "choice"
    values: list[Any]
    """The candidates."""

    def problem(self) -> str | None:
        return None if self.values else "values is empty"

    def probes(self) -> list[Any]:
        return list(self.values)


class Grid(_Strict):
    """Every one of ``values``, each in its own trial (``tune.grid_search``)."""

    type: Literal["grid"] = "grid"
    values: list[Any]
    """The values, all of which run."""

    def problem(self) -> str | None:
        return None if self.values else "values is empty"

    def probes(self) -> list[Any]:
        return list(self.values)


Distribution = Annotated[
    Union[Uniform, LogUniform, QUniform, RandInt, Choice, Grid], Field(discriminator="type")
]


# --------------------------------------------------------------------------------------------
# the sweep


class SchedulerSpec(_Strict):
    """Which trials to stop early (Ray Tune trial schedulers); time counts evaluations.

    A trial's time (``training_iteration``) is the number of reports that carry the metric:
    one per evaluation (every ``train.eval_every`` epochs) for ``val/...`` metrics.
    """

    type: Literal["asha", "median", "hyperband", "pbt", "fifo"] = "asha"
    """``asha`` (default), ``median`` stopping, ``hyperband`` (asynchronous, several brackets),
    ``fifo`` (no early stopping); ``pbt`` is refused (see docs/tune.md)."""
    grace_period: int = Field(1, ge=1)
    """Evaluations every trial runs before it may be stopped."""
    reduction_factor: float = Field(3.0, gt=1.0)
    """ASHA/HyperBand: 1/reduction_factor of the trials move on at each rung."""
    max_t: int | None = Field(None, ge=1)
    """ASHA/HyperBand: evaluations after which a trial is cut at the latest; a full run's count
    (``train.epochs / train.eval_every``, the longest searched) when unset."""
    brackets: int = Field(3, ge=1)
    """HyperBand: number of brackets (ASHA uses one)."""
    min_samples_required: int = Field(3, ge=1)
    """Median stopping: trials that must have reported before any is stopped."""


class ResourcesSpec(_Strict):
    """Resources of one trial: it is one Ray Train run with these workers (``cluster.*``)."""

    num_workers: int | None = Field(None, gt=0)
    """Training workers per trial; ``cluster.num_workers`` of the base config when unset."""
    cpus_per_worker: float | None = Field(None, gt=0)
    """CPUs per worker; ``cluster.cpus_per_worker`` when unset."""
    gpus_per_worker: float | None = Field(None, ge=0)
    """GPUs per worker when use_gpu; ``cluster.gpus_per_worker`` when unset."""
    use_gpu: bool | None = None
    """Give each worker a GPU; ``cluster.use_gpu`` when unset."""


class SweepSpec(_Strict):
    """A whole sweep file."""

    name: str = "sweep"
    """Sweep name; everything goes to ``{output_dir}/{name}``."""
    base: str | dict[str, Any]
    """Training config: a YAML path (relative to the working directory, then to the sweep
    file's folder) or the config inline."""
    overrides: list[str] = Field(default_factory=list)
    """Dotted ``key=value`` overrides of the base config, applied before the search space."""
    space: dict[str, Distribution] = Field(min_length=1)
    """Search space: dotted training-config key -> distribution."""
    metric: str
    """What the sweep optimises: a key every evaluation reports, e.g. ``val/organs/dice_mean``."""
    mode: Literal["min", "max"] = "max"
    """Whether a lower or a higher ``metric`` is better."""
    num_samples: int = Field(8, ge=1)
    """Trials to sample (with grid entries: repeats of the whole grid)."""
    searcher: Literal["optuna", "random", "grid"] = "optuna"
    """``optuna`` (TPE, Ray Tune's OptunaSearch), ``random``, or ``grid`` (every combination)."""
    scheduler: SchedulerSpec = SchedulerSpec()
    """Early stopping."""
    resources: ResourcesSpec = ResourcesSpec()
    """Workers and CPUs/GPUs of each trial."""
    max_concurrent_trials: int | None = Field(None, ge=1)
    """Trials running at once; derived from the cluster's free resources when unset."""
    output_dir: str = "sweeps"
    """Folder of sweep folders."""
    seed: int = 0
    """Seed of the searcher (the trials use the training config's ``seed``)."""


class Sweep:
    """A loaded and checked sweep: the spec, the base training config and where it writes."""

    def __init__(self, spec: SweepSpec, base: dict[str, Any], source: str) -> None:
        self.spec = spec
        self.base = base  # plain training-config dict with overrides and resources applied
        self.source = source
        self.config = config_from_dict(base, source)

    @property
    def sweep_dir(self) -> Path:
        """``{output_dir}/{name}``, absolute."""
        return (Path(self.spec.output_dir).expanduser() / self.spec.name).resolve()

    def max_evaluations(self) -> int:
        """Evaluations of the longest trial (for ASHA's ``max_t``), over the searched epochs."""
        epochs = [self.config.train.epochs]
        if "train.epochs" in self.spec.space:
            epochs += [int(v) for v in self.spec.space["train.epochs"].probes()]
        every = max(self.config.train.eval_every, 1)
        return max(math.ceil(e / every) for e in epochs)


# --------------------------------------------------------------------------------------------
# loading and checking


def _one_line(err: Exception) -> str:
    """A multi-line schema error folded into one line."""
    text = ""
    for line in (line.strip() for line in str(err).splitlines()):
        if line:
            text += line if not text else (" " if text.endswith(":") else "; ") + line
    return text


def with_values(data: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of the config dict ``data`` with each dotted key set to its value."""
    data = copy.deepcopy(data)
    for key, value in values.items():
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return data


def _has_key(data: dict[str, Any], key: str) -> bool:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _read_yaml(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise SweepError(f"{what} {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SweepError(f"{what} {path} is not valid YAML: {_one_line(err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SweepError(f"{what} {path} must hold a mapping at the top level")
    return data


def _base_dict(spec: SweepSpec, sweep_path: Path) -> tuple[dict[str, Any], str]:
    if isinstance(spec.base, dict):
        return spec.base, f"{sweep_path} (inline base)"
    path = Path(spec.base).expanduser()
    if not path.is_file() and not path.is_absolute() and (sweep_path.parent / path).is_file():
        path = sweep_path.parent / path
    if not path.is_file():
        raise SweepError(
            f"{sweep_path}: base config {spec.base} does not exist (relative paths are taken "
            "from the working directory, then from the sweep file's folder)"
        )
    return _read_yaml(path, "base config"), str(path)


def load_sweep(
    path: str | Path, overrides: list[str] | None = None, check_data: bool = True
) -> Sweep:
    """Read, validate and check a sweep file; every problem is a one-line :class:`SweepError`.

    ``overrides`` are command-line ``key=value`` items: ``sweep.KEY=...`` sets a sweep field
    (``sweep.num_samples=4``, ``sweep.scheduler.grace_period=2``), anything else a training
    config key (``train.epochs=3``), applied after the sweep file's own ``overrides``.
    ``check_data=False`` skips reading the shards' manifest (see :func:`reportable_metrics`).
    """
    path = Path(path)
    raw = _read_yaml(path, "sweep file")
    overrides = overrides or []
    sweep_items = [o.removeprefix(SWEEP_PREFIX) for o in overrides if o.startswith(SWEEP_PREFIX)]
    config_items = [o for o in overrides if not o.startswith(SWEEP_PREFIX)]
    try:
        raw = apply_overrides(raw, sweep_items)
        spec = SweepSpec.model_validate(raw)
    except ConfigError as err:
        raise SweepError(f"{path}: {err}") from None
    except ValidationError as err:
        problems = [
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in err.errors()
        ]
        raise SweepError(f"invalid sweep file {path}: " + "; ".join(problems)) from None

    base, source = _base_dict(spec, path)
    resources = {f"cluster.{k}": v for k, v in spec.resources.model_dump().items() if v is not None}
    try:
        base = apply_overrides(base, [*spec.overrides, *config_items])
        base = with_values(base, resources)
        sweep = Sweep(spec, base, source)
    except ConfigError as err:
        raise SweepError(f"{path}: base config: {_one_line(err)}") from None
    _check_space(sweep, path)
    _check_searcher(sweep, path)
    _check_metric(sweep, path, check_data)
    return sweep


def _check_space(sweep: Sweep, path: Path) -> None:
    """Every key exists, every distribution is well formed, every probe value validates."""
    full = sweep.config.to_dict()  # defaults filled in, so any schema field is a known key
    for key, dist in sweep.spec.space.items():
        if not _has_key(full, key) or isinstance(_lookup(full, key), dict):
            raise SweepError(
                f"{path}: space key {key!r} is not a field of the training config (a dotted "
                "path to a value, e.g. optim.lr or model.heads.<head>.loss_weight)"
            )
        problem = dist.problem()
        if problem:
            raise SweepError(f"{path}: space {key} ({dist.type}): {problem}")
        for value in dist.probes():
            try:
                config_from_dict(with_values(sweep.base, {key: value}), f"space {key}={value!r}")
            except ConfigError as err:
                raise SweepError(
                    f"{path}: space {key} ({dist.type}): value {value!r} is rejected by the "
                    f"training config: {_one_line(err)}"
                ) from None


def _lookup(data: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        data = data[part]
    return data


def _check_searcher(sweep: Sweep, path: Path) -> None:
    spec = sweep.spec
    grids = [k for k, d in spec.space.items() if isinstance(d, Grid)]
    if spec.searcher == "optuna" and grids:
        raise SweepError(
            f"{path}: space {grids[0]} is a grid, which Optuna's TPE cannot sample; use "
            "type: choice, or searcher: grid / random"
        )
    if spec.searcher == "grid":
        other = [k for k, d in spec.space.items() if not isinstance(d, Grid)]
        if other:
            raise SweepError(
                f"{path}: searcher grid needs every space entry to be type: grid, but "
                f"{other[0]} is {spec.space[other[0]].type}; use searcher: random to mix them"
            )
    if spec.scheduler.type == "pbt":
        raise SweepError(
            f"{path}: scheduler pbt is refused: population based training copies one trial's "
            "checkpoint into another, and a bigmodel checkpoint (optimizer, LR schedule, ZeRO "
            "shards) is tied to its own trial's hyperparameters and world size; use asha, "
            "median or hyperband"
        )


def reportable_metrics(cfg: Config, check_data: bool = True) -> set[str]:
    """Keys a run of ``cfg`` reports: training losses and, with evaluation on, ``val/`` figures.

    The ``val/`` names come from the real metric set of the configured heads (computed once on
    no data, which gives every name with a NaN value). With ``check_data`` the class counts come
    from the shards' manifest (so per-class names such as ``val/organs/dice_2`` are exact and a
    missing dataset or val split is caught here); without, heads lacking ``num_classes`` get 2.
    """
    from bigmodel.data import load_manifest, resolve_config
    from bigmodel.metrics import build_metrics

    names = {"loss/total", "lr", "step", "epoch"} | {f"loss/{h}" for h in cfg.model.heads}
    if check_data:
        manifest = load_manifest(cfg.data.shards)
        if not cfg.train.eval_every or cfg.data.val_split not in manifest.splits:
            return names
        model = resolve_config(cfg, manifest).model
    else:
        if not cfg.train.eval_every:
            return names
        model = cfg.model.model_copy(deep=True)
        for head in model.heads.values():
            head.num_classes = head.num_classes or 2
    figures = build_metrics(model).compute()
    return names | {f"val/{name}" for name in figures} | {"val/num_samples"}


def _check_metric(sweep: Sweep, path: Path, check_data: bool) -> None:
    cfg = sweep.config
    try:
        names = reportable_metrics(cfg, check_data)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        raise SweepError(f"{path}: base config data: {_one_line(err)}") from None
    if sweep.spec.metric in names:
        return
    why = ""
    if sweep.spec.metric.startswith("val/") and not any(n.startswith("val/") for n in names):
        why = (
            f" (no evaluation runs: train.eval_every={cfg.train.eval_every}, val split "
            f"{cfg.data.val_split!r} in {cfg.data.shards})"
        )
    headline = sorted(n for n in names if not n[-1].isdigit())
    raise SweepError(
        f"{path}: metric {sweep.spec.metric!r} is not reported by heads "
        f"{sorted(cfg.model.heads)}{why}; choose one of {', '.join(headline)}"
    )
