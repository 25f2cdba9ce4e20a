"""The run directory's files, each written atomically (a crash or a full disk leaves the previous one):

- ``config.json``: the resolved ``TrainConfig`` plus class names, world size and versions;
- ``metrics.csv`` and ``curves.png``: one row / point per epoch;
- ``last.pth`` (every epoch end, and mid-epoch every ``checkpoint_minutes``) and ``best.pth`` (the best
  validation top-1 so far): a ``TrainState``, the one definition of what a checkpoint holds;
- ``final/``: the best weights (raw or EMA, whichever scored higher) as a hub folder
  (``pretrained.checkpoint.save_pretrained``), with class names and the evaluation input size.
"""

from __future__ import annotations

import csv
import io
import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..errors import MixNetError, first_line
from ..fileio import atomic_write

CHECKPOINT_FORMAT = "mixnet-train-checkpoint"
CHECKPOINT_VERSION = 1
RUN_FORMAT = "mixnet-train-run"
LAST, BEST, FINAL = "last.pth", "best.pth", "final"
RUN_CONFIG, METRICS, CURVES = "config.json", "metrics.csv", "curves.png"
METRICS_COLUMNS = ("epoch", "lr", "train_size", "train_loss", "train_images_per_s", "val_loss", "val_top1",
                   "val_top5", "ema_val_loss", "ema_val_top1", "ema_val_top5", "bad_images", "epoch_time_s",
                   "total_time_s")


@dataclass
class Best:
    """The best validation top-1 so far, its epoch, and which weights scored it ("raw" or "ema")."""

    top1: Optional[float] = None
    epoch: Optional[int] = None
    source: Optional[str] = None


@dataclass
class EpochTotals:
    """Running sums over the current epoch's updates (kept in checkpoints, so a resumed epoch reports
    the same training loss as an uninterrupted one)."""

    loss_sum: float = 0.0
    samples: float = 0.0
    bad_images: float = 0.0
    train_seconds: float = 0.0


@dataclass
class TrainState:
    """Everything a training checkpoint holds; the field names are the file's keys.

    All values are tensors or plain Python types, so ``torch.load(weights_only=True)`` reads them.
    Reproducibility: with the position (``epoch``, ``update`` within it, ``global_update``) and ``rng``,
    a resumed run continues exactly as the uninterrupted one (see ``sampling``).
    """

    config: Dict[str, Any]  # TrainConfig.to_dict()
    class_names: List[str]
    state_dict: Dict[str, Tensor]  # the raw weights
    state_dict_ema: Optional[Dict[str, Tensor]]
    optimizer: Dict[str, Any]
    scaler: Optional[Dict[str, Any]]  # fp16 gradient scaler
    rng: Dict[str, Any]
    epoch: int = 0  # epochs completed
    update: int = 0  # optimizer updates done within the current epoch
    global_update: int = 0
    history: List[Dict[str, Any]] = field(default_factory=list)  # metrics.csv's rows
    best: Best = field(default_factory=Best)
    partial: EpochTotals = field(default_factory=EpochTotals)
    elapsed_seconds: float = 0.0

    def to_dict(self) -> Dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values.update(best=dataclasses.asdict(self.best), partial=dataclasses.asdict(self.partial))
        return dict(format=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION,
                    architecture=self.config.get("model"), **values)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "TrainState":
        names = {f.name for f in dataclasses.fields(cls)}
        kept = {k: v for k, v in values.items() if k in names}
        kept.update(best=Best(**values.get("best", {})), partial=EpochTotals(**values.get("partial", {})))
        return cls(**kept)


def save_checkpoint(state: TrainState, path: Path) -> None:
    """Write a checkpoint atomically; on failure (a full disk) the previous file is untouched."""
    try:
        with atomic_write(path) as f:
            torch.save(state.to_dict(), f)
    except OSError as e:
        raise MixNetError(f"{path}: cannot write checkpoint ({e.strerror or e}); the previous "
                          f"checkpoint there is intact") from None


def load_checkpoint(path: Path) -> TrainState:
    """A training checkpoint written by ``save_checkpoint``, read without unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise MixNetError(f"{path}: no such checkpoint")
    try:
        values = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise MixNetError(f"{path}: not a readable training checkpoint ({first_line(e)})") from None
    if not isinstance(values, dict) or values.get("format") != CHECKPOINT_FORMAT:
        raise MixNetError(f"{path}: not a mixnet training checkpoint")
    if values.get("version", 0) > CHECKPOINT_VERSION:
        raise MixNetError(f"{path}: checkpoint version {values['version']} is newer than this mixnet "
                          f"understands ({CHECKPOINT_VERSION}); upgrade mixnet")
    return TrainState.from_dict(values)


def copy_checkpoint(src: Path, dst: Path) -> None:
    try:
        with atomic_write(dst) as f, open(src, "rb") as s:
            shutil.copyfileobj(s, f)
    except OSError as e:
        raise MixNetError(f"{dst}: cannot write checkpoint ({e.strerror or e}); the previous "
                          f"checkpoint there is intact") from None


def write_run_config(run_dir: Path, config: Dict[str, Any], class_names: Sequence[str], **facts) -> None:
    """``config.json``: the training configuration and the facts of this run (world size, lr, versions)."""
    from .. import __version__

    record = dict(format=RUN_FORMAT, version=CHECKPOINT_VERSION, config=config, class_names=list(class_names),
                  **facts, mixnet_version=__version__, torch_version=torch.__version__)
    with atomic_write(run_dir / RUN_CONFIG, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)


def write_metrics(run_dir: Path, history: List[Dict[str, Any]]) -> None:
    """``metrics.csv`` and ``curves.png`` from the per-epoch rows."""
    with atomic_write(run_dir / METRICS, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRICS_COLUMNS)
        writer.writeheader()
        for row in history:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in METRICS_COLUMNS})
    write_curves(run_dir / CURVES, history)


def write_curves(path: Path, history: List[Dict[str, Any]], marks: Tuple[float, ...] = ()) -> None:
    """Loss and accuracy against epoch as a PNG; ``marks``: epochs to draw a dashed line at (stage ends)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], label="train")
    for key, label in (("val_loss", "val"), ("ema_val_loss", "val (EMA)")):
        pts = [(r["epoch"], r[key]) for r in history if r.get(key) is not None]
        if pts:
            ax_loss.plot(*zip(*pts), label=label, marker=".")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    for key, label in (("val_top1", "top-1"), ("val_top5", "top-5"), ("ema_val_top1", "top-1 (EMA)"),
                       ("ema_val_top5", "top-5 (EMA)")):
        pts = [(r["epoch"], r[key]) for r in history if r.get(key) is not None]
        if pts:
            ax_acc.plot(*zip(*pts), label=label, marker=".")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="validation accuracy")
    for ax in (ax_loss, ax_acc):
        for epoch in marks:
            ax.axvline(epoch, color="grey", linestyle="--", linewidth=1)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # none while no epoch was evaluated (--eval-every)
            ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    with atomic_write(path) as f:
        f.write(buf.getvalue())
