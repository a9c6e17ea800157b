"""Run logs: per-step figures reduced across ranks, TensorBoard, CSV and a learning-curve PNG.

Figures are accumulated locally between log steps and reduced across ranks with one all-reduce
per log step, so logging costs no synchronisation on the other steps. Files are written by
rank 0 only: ``metrics.csv`` (long format ``step,epoch,name,value``, so training and evaluation
rows with different figures share one file and a resumed run simply appends), ``tb/`` and, at
the end, ``curves.png``.
"""

from __future__ import annotations

import contextlib
import csv
import re
import resource
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from sharding.helpers import atomic_write

__all__ = ["PHASES", "RunLogger", "StepTimer"]

PHASES = ("loop", "data_wait", "eval", "checkpoint_write", "report")
"""The loop's timed phases; ``loop`` is the whole loop, the others are parts of it."""


class StepTimer:
    """Wall time of an interval, split into waiting for data and the rest."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.data_wait = 0.0
        self.samples = 0
        self._mark = 0.0

    def data_started(self) -> None:
        self._mark = time.perf_counter()

    def data_done(self, samples: int) -> None:
        self.data_wait += time.perf_counter() - self._mark
        self.samples += samples

    def elapsed(self) -> float:
        return max(time.perf_counter() - self.start, 1e-9)


def _memory_mb(device: torch.device) -> float:
    """Peak memory of this worker: CUDA allocations on GPU, the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class RunLogger:
    """Collects per-step figures and writes them (rank 0) to CSV and TensorBoard."""

    def __init__(
        self,
        run_dir: Path,
        rank: int,
        world_size: int,
        device: torch.device,
        resume_step: int = 0,
    ) -> None:
        """``resume_step``: the step the run continues from (0 for a fresh start).

        Rows and TensorBoard events after it were logged by an attempt that crashed after its
        last checkpoint; they are dropped, so the resumed run does not log those steps twice.
        """
        self.run_dir = run_dir
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self._sums: dict[str, float] = defaultdict(float)
        self._count = 0
        self.timer = StepTimer()
        self.phase_s: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        """Wall seconds per phase of the loop (:meth:`phase`), written once by
        :meth:`write_phases` as ``time/*`` rows (the e2e benchmark says where a run's time goes)."""
        self._writer = None
        self._csv = None
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            run_dir.mkdir(parents=True, exist_ok=True)
            # purge_step: TensorBoard hides the crashed attempt's events from this step on
            self._writer = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step + 1)
            path = run_dir / "metrics.csv"
            _truncate_csv(path, resume_step)
            new = not path.exists()
            self._csv_file = path.open("a", newline="")
            self._csv = csv.writer(self._csv_file)
            if new:
                self._csv.writerow(["step", "epoch", "name", "value"])

    def add_losses(self, losses: dict[str, torch.Tensor], total: torch.Tensor) -> None:
        """Accumulate one micro-batch's losses (detached; no device sync here)."""
        for name, value in losses.items():
            self._sums[f"loss/{name}"] += value.detach().float()
        self._sums["loss/total"] += total.detach().float()
        self._count += 1

    def step_figures(self, lr: float, grad_norm: float | None) -> dict[str, float]:
        """Figures since the last call, averaged (losses) or summed (samples/s) over ranks.

        Collective: every rank must call it at the same step.
        """
        elapsed = self.timer.elapsed()
        names = sorted(self._sums)
        values = [self._sums[n] for n in names] + [self._count, self.timer.samples / elapsed]
        local = torch.stack(
            [torch.as_tensor(v, dtype=torch.float64, device=self.device) for v in values]
        )
        if dist.is_initialized() and self.world_size > 1:
            dist.all_reduce(local)  # syncs all ranks, once per log step
        count = max(float(local[-2]), 1.0)
        figures = {n: float(v) / count for n, v in zip(names, local[:-2].tolist(), strict=True)}
        figures["lr"] = lr
        figures["samples_per_s"] = self.timer.samples / elapsed
        figures["samples_per_s_total"] = float(local[-1])
        figures["data_wait_fraction"] = self.timer.data_wait / elapsed
        figures["memory_mb"] = _memory_mb(self.device)
        if grad_norm is not None:
            figures["grad_norm"] = grad_norm
        self._sums.clear()
        self._count = 0
        self.timer = StepTimer()
        return figures

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Add the wall time of the block to phase ``name`` (one of :data:`PHASES`)."""
        tick = time.perf_counter()
        try:
            yield
        finally:
            self.phase_s[name] += time.perf_counter() - tick

    def write_phases(self, step: int, epoch: int) -> None:
        """The phases' seconds as ``time/*`` rows (rank 0)."""
        self.write(step, epoch, self.phase_s, prefix="time/")

    def write(self, step: int, epoch: int, figures: dict[str, float], prefix: str = "") -> None:
        """Append figures to CSV and TensorBoard (rank 0 only)."""
        if self.rank != 0:
            return
        for name, value in figures.items():
            self._csv.writerow([step, epoch, prefix + name, f"{value:.8g}"])
            self._writer.add_scalar(prefix + name, value, step)
        self._csv_file.flush()

    def close(self) -> None:
        """Flush files and draw ``curves.png`` (rank 0 only)."""
        if self.rank != 0:
            return
        self._csv_file.close()
        self._writer.close()
        plot_curves(self.run_dir / "metrics.csv", self.run_dir / "curves.png")


def _truncate_csv(path: Path, last_step: int) -> None:
    """Keep the rows of ``metrics.csv`` up to ``last_step`` (temporary file, then rename)."""
    if not path.exists():
        return
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    kept = rows[:1] + [r for r in rows[1:] if r and int(r[0]) <= last_step]
    if len(kept) == len(rows):
        return

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            csv.writer(f).writerows(kept)

    atomic_write(path, write)


def _is_headline_figure(name: str) -> bool:
    """A validation figure worth a curve: a score in [0, 1], not a count or a per-class entry.

    ``val/seg/count`` would squash every score to a flat line at 0, and per-class figures
    (``dice_2``, ``auroc_0``) turn the legend into a wall; ``metrics.csv`` keeps them all.
    """
    if not name.startswith("val/"):
        return False
    figure = name.rsplit("/", 1)[-1]
    return figure not in ("count", "num_samples") and not re.search(r"_\d+$", figure)


def plot_curves(csv_path: Path, png_path: Path) -> None:
    """Learning curves from ``metrics.csv``: training losses, LR, and evaluation figures."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    series: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
    with csv_path.open(newline="") as f:
        for row in csv.DictReader(f):
            xs, ys = series[row["name"]]
            xs.append(int(row["step"]))
            ys.append(float(row["value"]))
    panels = [
        ("training loss", [n for n in series if n.startswith("loss/")]),
        ("learning rate", [n for n in series if n == "lr"]),
        ("evaluation", [n for n in series if _is_headline_figure(n)]),
    ]
    panels = [(title, names) for title, names in panels if names]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5 * max(len(panels), 1), 4))
    axes = axes if hasattr(axes, "__len__") else [axes]
    for ax, (title, names) in zip(axes, panels, strict=False):
        for name in sorted(names):
            xs, ys = series[name]
            ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=name)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(png_path, lambda tmp: fig.savefig(tmp, dpi=100))
    plt.close(fig)
