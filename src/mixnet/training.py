"""Training and fine-tuning: ``train(TrainConfig)``, named recipes, resumable run directories, DDP.

A run directory holds:

- ``config.json``: the full resolved ``TrainConfig`` plus class names, world size and versions;
- ``metrics.csv`` and ``curves.png``: one row / point per epoch;
- ``last.pth`` and ``best.pth``: training checkpoints (format ``CHECKPOINT_FORMAT``, version
  ``CHECKPOINT_VERSION``): ``state_dict`` (raw weights), ``state_dict_ema``, ``optimizer``, ``scaler``,
  ``rng``, the position (``epoch``, ``update``, ``global_update``), ``history`` and the full ``config``.
  All values are tensors or plain Python types, so ``torch.load(weights_only=True)`` reads them.
  Every file is written atomically: a crash or a full disk leaves the previous one intact;
- ``final/``: the best weights (raw or EMA, whichever scored higher) as a hub folder
  (``weights.save_pretrained``), with class names and the evaluation input size.

Reproducibility: every random draw is a pure function of (seed, position): the data order of an
epoch comes from (seed, epoch), each sample's augmentation from (seed, epoch, sample index), and
dropout, drop-path and mixup from (seed, optimizer update, rank). So a run resumed from any
checkpoint (end of epoch, or mid-epoch every ``checkpoint_minutes``) continues exactly as the
uninterrupted run would have (bit-identical on CPU with ``deterministic=True``).

Distributed: launch with ``torchrun --nproc-per-node N -m mixnet train ...`` (multi-node: add
``--nnodes``, ``--node-rank``, ``--rdzv-endpoint`` as usual). ``batch_size`` is per process; the
learning rate, unless given, is ``lr_base * global_batch / lr_base_size``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import shutil
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from .data import (LabelledImageFolder, build_eval_transform, build_train_transform, collate,
                   folder_classes)
from .errors import MixNetError
from .fileio import atomic_write
from .model import create_model
from .optim import LRSchedule, ModelEma, create_optimizer, set_lr
from .recipes import TrainConfig

CHECKPOINT_FORMAT = "mixnet-train-checkpoint"
CHECKPOINT_VERSION = 1
LAST, BEST, FINAL = "last.pth", "best.pth", "final"
METRICS_COLUMNS = ("epoch", "lr", "train_loss", "train_images_per_s", "val_loss", "val_top1", "val_top5",
                   "ema_val_loss", "ema_val_top1", "ema_val_top5", "bad_images", "epoch_time_s",
                   "total_time_s")


# ---------------------------------------------------------------------------------------------- data


def _mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (a polynomial hash: distinct positions give distinct seeds)."""
    h = 0
    for p in parts:
        h = (h * 1_000_003 + int(p) + 1) % (2 ** 63 - 25)
    return h


class SeededSamples(Dataset):
    """Samples keyed by ``(seed, index)``: the transform draws from a generator seeded with ``seed``,
    so a sample's augmentation depends on its position, not on which worker loaded it or when."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, int]):
        seed, index = key
        if get_worker_info() is None:  # the main process: keep its own random stream untouched
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return self.dataset[index]
        torch.manual_seed(seed)
        return self.dataset[index]


class EpochSampler(Sampler):
    """This rank's share of a per-epoch permutation, as ``(sample seed, index)`` keys for ``SeededSamples``.

    The permutation depends only on (seed, epoch); it is padded (by wrapping) to a multiple of the
    world size so every rank gets the same number of samples. ``set_epoch(epoch, skip)`` drops the
    first ``skip`` samples, to resume mid-epoch.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.per_rank = math.ceil(size / world_size)
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        generator = torch.Generator().manual_seed(_mix_seed(self.seed, self.epoch))
        order = torch.randperm(self.size, generator=generator).tolist()
        padded = (order * math.ceil(self.per_rank * self.world_size / self.size))[:self.per_rank * self.world_size]
        for index in padded[self.rank::self.world_size][self.skip:]:
            yield _mix_seed(self.seed, self.epoch, index), index

    def __len__(self) -> int:
        return self.per_rank - self.skip


def _split_dirs(config: TrainConfig) -> Tuple[Path, Path]:
    if config.train_dir and config.val_dir:
        return Path(config.train_dir), Path(config.val_dir)
    if not config.data:
        raise MixNetError("no data: give --data DIR (with train/ and val/) or --train-dir and --val-dir")
    root = Path(config.data)
    train_dir = Path(config.train_dir) if config.train_dir else root / "train"
    val_dir = Path(config.val_dir) if config.val_dir else root / "val"
    for d in (train_dir, val_dir):
        if not d.is_dir():
            raise MixNetError(f"{d}: no such directory (--data expects {root}/train and {root}/val)")
    return train_dir, val_dir


def discover_classes(config: TrainConfig, log) -> List[str]:
    """The training classes: the train folder's class folders that hold images (empty ones are skipped
    with a warning); val folders without a training class are reported and skipped."""
    train_dir, val_dir = _split_dirs(config)
    found = LabelledImageFolder(train_dir)
    counts = {c: 0 for c in found.classes}
    for _, target in found.samples:
        counts[found.classes[target]] += 1
    empty = [c for c, n in counts.items() if n == 0]
    if empty:
        log(f"warning: {len(empty)} empty class folder(s) in {train_dir} skipped (no images): "
            f"{', '.join(empty[:10])}{' ...' if len(empty) > 10 else ''}")
    classes = [c for c in found.classes if counts[c] > 0]
    if len(classes) < 2:
        raise MixNetError(f"{train_dir}: {len(classes)} class folder(s) with images; training a classifier "
                          f"needs at least 2 ({train_dir}/<class>/<image files>)")
    extra = [c for c in folder_classes(val_dir) if c not in classes]
    if extra:
        log(f"warning: {len(extra)} class folder(s) of {val_dir} have no training images and are not "
            f"evaluated: {', '.join(extra[:10])}{' ...' if len(extra) > 10 else ''}")
    return classes


# ---------------------------------------------------------------------------------------------- process


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _setup_runtime(config: TrainConfig) -> Runtime:
    if config.threads:
        torch.set_num_threads(config.threads)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want = config.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise MixNetError("device cuda requested but no GPU is available")
    device = torch.device(f"cuda:{local_rank}" if want == "cuda" else want)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if world_size > 1 else 0
    return Runtime(device, rank, world_size, local_rank)


def _all_reduce(values: List[float], runtime: Runtime, op=None) -> List[float]:
    if not runtime.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=runtime.device)
    dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


def _average_buffers(model: nn.Module, runtime: Runtime) -> None:
    """Average BatchNorm statistics over ranks (each saw different batches) before evaluation."""
    if not runtime.distributed:
        return
    for b in model.buffers():
        if b.is_floating_point():
            dist.all_reduce(b, op=dist.ReduceOp.SUM)
            b.div_(runtime.world_size)


def _rng_state(runtime: Runtime) -> Dict[str, Any]:
    state: Dict[str, Any] = {"torch": torch.get_rng_state()}
    if runtime.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(runtime.device)
    return state


def _set_rng_state(state: Dict[str, Any], runtime: Runtime) -> None:
    torch.set_rng_state(state["torch"])
    if runtime.device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], runtime.device)


# ---------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(state: Dict[str, Any], path: Path) -> None:
    """Write a checkpoint atomically; on failure (a full disk) the previous file is untouched."""
    try:
        with atomic_write(path) as f:
            torch.save(state, f)
    except OSError as e:
        raise MixNetError(f"{path}: cannot write checkpoint ({e.strerror or e}); the previous "
                          f"checkpoint there is intact") from None


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """A training checkpoint written by ``save_checkpoint``, read without unpickling code."""
    if not path.is_file():
        raise MixNetError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise MixNetError(f"{path}: not a readable training checkpoint ({str(e).splitlines()[0] if str(e) else e})") \
            from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise MixNetError(f"{path}: not a mixnet training checkpoint")
    if state.get("version", 0) > CHECKPOINT_VERSION:
        raise MixNetError(f"{path}: checkpoint version {state['version']} is newer than this mixnet "
                          f"understands ({CHECKPOINT_VERSION}); upgrade mixnet")
    return state


def _copy_atomic(src: Path, dst: Path) -> None:
    try:
        with atomic_write(dst) as f, open(src, "rb") as s:
            shutil.copyfileobj(s, f)
    except OSError as e:
        raise MixNetError(f"{dst}: cannot write checkpoint ({e.strerror or e}); the previous "
                          f"checkpoint there is intact") from None


def _write_json(path: Path, obj: Any) -> None:
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)


def _write_metrics(run_dir: Path, history: List[Dict[str, Any]]) -> None:
    with atomic_write(run_dir / "metrics.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRICS_COLUMNS)
        writer.writeheader()
        for row in history:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in METRICS_COLUMNS})


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
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    with atomic_write(path) as f:
        f.write(buf.getvalue())


# ---------------------------------------------------------------------------------------------- loop


@dataclass
class TrainResult:
    run_dir: Path
    epochs_done: int
    completed: bool  # False: stopped by max_minutes (resume to continue)
    best_top1: Optional[float]
    best_epoch: Optional[int]
    history: List[Dict[str, Any]]


class NonFiniteLoss(MixNetError):
    """The loss became NaN or infinite: training diverged."""


def _check_config(config: TrainConfig, runtime: Runtime) -> None:
    if config.output is None:
        raise MixNetError("no run directory: give --output RUN_DIR")
    if config.amp not in ("none", "bf16", "fp16"):
        raise MixNetError(f"unknown amp mode {config.amp!r} (use none, bf16 or fp16)")
    if config.amp == "fp16" and runtime.device.type != "cuda":
        raise MixNetError("amp fp16 needs a GPU; on CPU use --amp bf16 or none")
    if config.sync_bn and runtime.distributed and runtime.device.type != "cuda":
        raise MixNetError("--sync-bn needs GPUs (torch's SyncBatchNorm is GPU-only); on CPU, BatchNorm "
                          "statistics are averaged over processes before each evaluation instead")
    for name in ("epochs", "batch_size", "accum_steps", "eval_every"):
        if getattr(config, name) < 1:
            raise MixNetError(f"{name} must be >= 1, got {getattr(config, name)}")


class _Trainer:
    def __init__(self, config: TrainConfig, runtime: Runtime, resume_state: Optional[Dict[str, Any]]):
        self.config, self.runtime = config, runtime
        self.run_dir = Path(config.output)
        self.resume_state = resume_state
        self.reported_failures: set = set()

    def log(self, message: str) -> None:
        if self.runtime.is_main:
            from tqdm import tqdm

            tqdm.write(message, file=sys.stderr)

    # --- setup

    def build(self) -> None:
        cfg, rt = self.config, self.runtime
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        elif rt.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        if self.resume_state is not None:
            self.class_names = list(self.resume_state["class_names"])
        else:
            self.class_names = discover_classes(cfg, self.log)
        class_to_idx = {c: i for i, c in enumerate(self.class_names)}
        train_dir, val_dir = _split_dirs(cfg)

        torch.manual_seed(_mix_seed(cfg.seed, 0xC0FFEE))  # the same initial weights on every rank
        model = create_model(cfg.model, num_classes=len(self.class_names), drop_rate=cfg.drop_rate,
                             drop_path_rate=cfg.drop_path_rate, **cfg.model_args)
        if cfg.pretrained and self.resume_state is None:
            from .weights import apply_checkpoint, read_checkpoint

            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*classifier not loaded.*")
                apply_checkpoint(model, read_checkpoint(cfg.pretrained))
        norm = model.pretrained_cfg
        self.train_set = LabelledImageFolder(train_dir, class_to_idx=class_to_idx, transform=build_train_transform(
            cfg.train_size, scale=cfg.scale, ratio=cfg.ratio, hflip=cfg.hflip,
            randaugment_ops=cfg.randaugment_ops, randaugment_magnitude=cfg.randaugment_magnitude,
            randaugment_std=cfg.randaugment_std, random_erasing=cfg.random_erasing,
            interpolation=cfg.interpolation, mean=norm["mean"], std=norm["std"]))
        self.eval_transform = build_eval_transform(norm, input_size=(3, cfg.eval_size, cfg.eval_size),
                                                   crop_pct=cfg.eval_crop_pct, interpolation=cfg.interpolation)
        self.val_set = LabelledImageFolder(val_dir, class_to_idx=class_to_idx, transform=self.eval_transform)
        if len(self.val_set) == 0:
            raise MixNetError(f"{val_dir}: no validation images in the training classes")

        self.sampler = EpochSampler(len(self.train_set), cfg.seed, rt.rank, rt.world_size)
        batches = self.sampler.per_rank // cfg.batch_size
        self.updates_per_epoch = batches // cfg.accum_steps
        if self.updates_per_epoch < 1:
            raise MixNetError(f"{train_dir}: {len(self.train_set)} training images are fewer than one update "
                              f"({cfg.batch_size} x {cfg.accum_steps} accumulation x {rt.world_size} "
                              f"processes); lower --batch-size")
        loader_args = dict(num_workers=cfg.workers, collate_fn=collate, pin_memory=rt.device.type == "cuda",
                           persistent_workers=cfg.workers > 0)
        self.train_loader = DataLoader(SeededSamples(self.train_set), batch_size=cfg.batch_size,
                                       sampler=self.sampler, drop_last=True, **loader_args)
        val_indices = list(range(rt.rank, len(self.val_set), rt.world_size))
        self.val_loader = DataLoader(self.val_set, batch_size=cfg.batch_size, sampler=val_indices, **loader_args)

        if cfg.sync_bn and rt.distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(rt.device)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        model.to(memory_format=self.memory_format)
        self.model = model
        self.ema = ModelEma(model, cfg.ema_decay, cfg.ema_warmup) if cfg.ema else None
        self.global_batch = cfg.batch_size * cfg.accum_steps * rt.world_size
        self.lr = cfg.lr if cfg.lr is not None else cfg.lr_base * self.global_batch / cfg.lr_base_size
        self.optimizer = create_optimizer(cfg.opt, model, self.lr, cfg.weight_decay, cfg.momentum, cfg.opt_eps)
        self.schedule = LRSchedule(cfg.sched, self.lr, cfg.epochs, cfg.warmup_epochs, cfg.warmup_lr,
                                   cfg.min_lr, cfg.decay_epochs, cfg.decay_rate)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
        self.ddp = (nn.parallel.DistributedDataParallel(model, device_ids=[rt.device] if rt.device.type == "cuda"
                                                        else None) if rt.distributed else model)
        self.mixer = self._build_mixer()

        self.epoch, self.update, self.global_update = 0, 0, 0
        self.history: List[Dict[str, Any]] = []
        self.best: Dict[str, Any] = dict(top1=None, epoch=None, source=None)
        self.partial = dict(loss_sum=0.0, samples=0.0, bad_images=0.0, train_seconds=0.0)
        self.elapsed_before = 0.0
        if self.resume_state is not None:
            self._restore(self.resume_state)
            self.resume_state = None

    def _build_mixer(self):
        cfg = self.config
        if cfg.mixup <= 0 and cfg.cutmix <= 0:
            return None
        from torchvision.transforms import v2

        n = len(self.class_names)
        choices = ([v2.MixUp(alpha=cfg.mixup, num_classes=n)] if cfg.mixup > 0 else []) + \
                  ([v2.CutMix(alpha=cfg.cutmix, num_classes=n)] if cfg.cutmix > 0 else [])
        return v2.RandomChoice(choices)

    def _restore(self, state: Dict[str, Any]) -> None:
        self.model.load_state_dict(state["state_dict"])
        if self.ema is not None and state.get("state_dict_ema") is not None:
            self.ema.module.load_state_dict(state["state_dict_ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.update, self.global_update = state["epoch"], state["update"], state["global_update"]
        self.history = list(state["history"])
        self.best = dict(state["best"])
        self.partial = dict(state["partial"])
        self.elapsed_before = float(state["elapsed_seconds"])
        _set_rng_state(state["rng"], self.runtime)

    # --- state

    def state(self) -> Dict[str, Any]:
        return dict(
            format=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION, architecture=self.config.model,
            config=self.config.to_dict(), class_names=list(self.class_names),
            epoch=self.epoch, update=self.update, global_update=self.global_update,
            state_dict=self.model.state_dict(),
            state_dict_ema=self.ema.module.state_dict() if self.ema is not None else None,
            optimizer=self.optimizer.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler is not None else None,
            scheduler=dict(global_update=self.global_update, updates_per_epoch=self.updates_per_epoch),
            rng=_rng_state(self.runtime), history=self.history, best=self.best, partial=self.partial,
            elapsed_seconds=self.elapsed_before + (time.monotonic() - self.started),
        )

    def save(self, best: bool = False) -> None:
        if not self.runtime.is_main:
            return
        save_checkpoint(self.state(), self.run_dir / LAST)
        if best:
            _copy_atomic(self.run_dir / LAST, self.run_dir / BEST)

    def write_run_config(self) -> None:
        if not self.runtime.is_main:
            return
        from . import __version__

        _write_json(self.run_dir / "config.json", dict(
            format="mixnet-train-run", version=CHECKPOINT_VERSION, config=self.config.to_dict(),
            class_names=list(self.class_names), world_size=self.runtime.world_size,
            global_batch=self.global_batch, lr=self.lr, updates_per_epoch=self.updates_per_epoch,
            mixnet_version=__version__, torch_version=torch.__version__))

    # --- one epoch

    def _lr_at(self, update_in_epoch: int) -> float:
        t = self.epoch + (update_in_epoch / self.updates_per_epoch if self.config.sched_per_step else 0.0)
        return self.schedule(t)

    def _autocast(self):
        amp = self.config.amp
        if amp == "none":
            return nullcontext()
        return torch.autocast(self.runtime.device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)

    def _loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        logits = logits.float()
        if targets.dim() == 1:
            return F.cross_entropy(logits, targets, label_smoothing=self.config.label_smoothing)
        n = logits.shape[1]
        soft = targets * (1.0 - self.config.label_smoothing) + self.config.label_smoothing / n
        return torch.sum(-soft * F.log_softmax(logits, dim=-1), dim=-1).mean()

    def _report_failures(self, failures) -> None:
        for failure in failures:
            if failure.path not in self.reported_failures:
                self.reported_failures.add(failure.path)
                from tqdm import tqdm

                tqdm.write(f"warning: skipped unreadable image {failure.path}: {failure.problem}", file=sys.stderr)

    def train_epoch(self, deadline: Optional[float]) -> bool:
        """Train the rest of the current epoch; False if stopped early by the deadline (checkpointed)."""
        from tqdm import tqdm

        cfg, rt = self.config, self.runtime
        self.model.train()
        self.sampler.set_epoch(self.epoch, self.update * cfg.accum_steps * cfg.batch_size)
        batches = iter(self.train_loader)
        images_per_update = self.global_batch
        bar = tqdm(total=self.updates_per_epoch * images_per_update, initial=self.update * images_per_update,
                   desc=f"epoch {self.epoch + 1}/{cfg.epochs}", unit="img", dynamic_ncols=True,
                   disable=not (cfg.progress and rt.is_main), mininterval=1.0 if sys.stderr.isatty() else 30.0)
        last_save = time.monotonic()
        t0 = time.monotonic()
        try:
            while self.update < self.updates_per_epoch:
                lr = self._lr_at(self.update)
                set_lr(self.optimizer, lr)
                torch.manual_seed(_mix_seed(cfg.seed, self.global_update, rt.rank, 0xD40))
                micro = [next(batches) for _ in range(cfg.accum_steps)]
                now = time.monotonic()
                save_due = cfg.checkpoint_minutes > 0 and now - last_save > cfg.checkpoint_minutes * 60
                stop_due = deadline is not None and now > deadline
                bad = sum(len(b.failures) for b in micro)
                for b in micro:
                    self._report_failures(b.failures)
                empty, save_due, stop_due = _all_reduce(
                    [float(any(len(b.images) == 0 for b in micro)), float(save_due and rt.is_main),
                     float(stop_due and rt.is_main)], rt, dist.ReduceOp.MAX)
                self.partial["bad_images"] += bad
                if stop_due:
                    self.partial["train_seconds"] += time.monotonic() - t0
                    self.save()
                    self.log(f"stopped after {cfg.max_minutes} minutes at epoch {self.epoch + 1}, update "
                             f"{self.update}; resume with: mixnet train --resume {self.run_dir}")
                    return False
                if not empty:
                    loss_sum, samples = self._update(micro)
                    self.partial["loss_sum"] += loss_sum
                    self.partial["samples"] += samples
                self.update += 1
                self.global_update += 1
                bar.update(images_per_update)
                if self.partial["samples"]:
                    bar.set_postfix(loss=f"{self.partial['loss_sum'] / self.partial['samples']:.3f}",
                                    lr=f"{lr:.2e}", refresh=False)
                if save_due:
                    self.partial["train_seconds"] += time.monotonic() - t0
                    t0 = time.monotonic()
                    self.save()
                    last_save = time.monotonic()
        finally:
            bar.close()
        self.partial["train_seconds"] += time.monotonic() - t0
        return True

    def _update(self, micro) -> Tuple[float, int]:
        cfg, rt = self.config, self.runtime
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, samples = 0.0, 0
        nonfinite = False
        for i, batch in enumerate(micro):
            images = batch.images.to(rt.device, non_blocking=True).contiguous(memory_format=self.memory_format)
            targets = batch.targets.to(rt.device, non_blocking=True)
            if self.mixer is not None and float(torch.rand(())) < cfg.mix_prob:
                images, targets = self.mixer(images, targets)
            sync = rt.distributed and i < len(micro) - 1
            with (self.ddp.no_sync() if sync else nullcontext()), self._autocast():
                loss = self._loss(self.ddp(images), targets)
            value = float(loss.detach())
            nonfinite = nonfinite or not math.isfinite(value)
            scaled = loss / len(micro)
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            loss_sum += value * len(images)
            samples += len(images)
        if _all_reduce([float(nonfinite)], rt, dist.ReduceOp.MAX)[0]:
            raise NonFiniteLoss(
                f"the training loss became NaN/infinite at epoch {self.epoch + 1}, update {self.update + 1}: "
                f"training diverged; {self.run_dir / LAST} keeps the last good state (epoch {self.epoch}). "
                f"Try a lower --lr, --clip-grad 1.0 or --amp none")
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if cfg.clip_grad:
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model, self.global_update)
        return loss_sum, samples

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> Dict[str, float]:
        rt = self.runtime
        model.eval()
        k = min(5, len(self.class_names))
        loss_sum, top1, top5, count, bad = 0.0, 0.0, 0.0, 0.0, 0.0
        for batch in self.val_loader:
            self._report_failures(batch.failures)
            bad += len(batch.failures)
            if len(batch.images) == 0:
                continue
            images = batch.images.to(rt.device).contiguous(memory_format=self.memory_format)
            targets = batch.targets.to(rt.device)
            logits = model(images).float()
            loss_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
            topk = logits.topk(k, dim=1).indices
            hits = topk == targets[:, None]
            top1 += float(hits[:, 0].sum())
            top5 += float(hits.any(dim=1).sum())
            count += len(targets)
        loss_sum, top1, top5, count, bad = _all_reduce([loss_sum, top1, top5, count, bad], rt)
        count = max(count, 1.0)
        return dict(loss=loss_sum / count, top1=100.0 * top1 / count, top5=100.0 * top5 / count, bad=bad)

    def finish_epoch(self) -> Dict[str, Any]:
        cfg, rt = self.config, self.runtime
        self.epoch += 1
        self.update = 0
        evaluated = self.epoch % cfg.eval_every == 0 or self.epoch == cfg.epochs
        totals = _all_reduce([self.partial["loss_sum"], self.partial["samples"], self.partial["bad_images"]], rt)
        row: Dict[str, Any] = dict(
            epoch=self.epoch, lr=self.optimizer.param_groups[0]["lr"], train_loss=totals[0] / max(totals[1], 1.0),
            train_images_per_s=totals[1] / max(self.partial["train_seconds"], 1e-9), bad_images=totals[2])
        eval_started = time.monotonic()
        if evaluated:
            _average_buffers(self.model, rt)
            raw = self.evaluate(self.model)
            row.update(val_loss=raw["loss"], val_top1=raw["top1"], val_top5=raw["top5"])
            row["bad_images"] += raw["bad"]
            candidates = [("raw", raw["top1"])]
            if self.ema is not None:
                _average_buffers(self.ema.module, rt)
                ema = self.evaluate(self.ema.module)
                row.update(ema_val_loss=ema["loss"], ema_val_top1=ema["top1"], ema_val_top5=ema["top5"])
                candidates.append(("ema", ema["top1"]))
            source, top1 = max(candidates, key=lambda c: c[1])
            improved = self.best["top1"] is None or top1 > self.best["top1"]
            if improved:
                self.best = dict(top1=top1, epoch=self.epoch, source=source)
        else:
            improved = False
        row.update(epoch_time_s=self.partial["train_seconds"] + time.monotonic() - eval_started,
                   total_time_s=self.elapsed_before + time.monotonic() - self.started)
        row = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}
        self.history.append(row)
        self.partial = dict(loss_sum=0.0, samples=0.0, bad_images=0.0, train_seconds=0.0)
        self.save(best=improved)
        if rt.is_main:
            _write_metrics(self.run_dir, self.history)
            write_curves(self.run_dir / "curves.png", self.history)
        return row

    def export_final(self) -> Path:
        """The best weights (raw or EMA) as a hub folder, with class names and the evaluation size."""
        from .weights import save_pretrained

        cfg = self.config
        path = self.run_dir / BEST if (self.run_dir / BEST).is_file() else self.run_dir / LAST
        state = load_checkpoint(path)
        weights = state["state_dict_ema"] if self.best.get("source") == "ema" else state["state_dict"]
        model = create_model(cfg.model, num_classes=len(self.class_names), **cfg.model_args)
        model.load_state_dict(weights)
        model.pretrained_cfg = {**self.model.pretrained_cfg, "input_size": (3, cfg.eval_size, cfg.eval_size),
                                "crop_pct": cfg.eval_crop_pct, "interpolation": cfg.interpolation,
                                "num_classes": len(self.class_names), "class_names": list(self.class_names)}
        return save_pretrained(model, self.run_dir / FINAL, class_names=self.class_names)

    def run(self) -> TrainResult:
        cfg, rt = self.config, self.runtime
        self.started = time.monotonic()
        deadline = self.started + cfg.max_minutes * 60 if cfg.max_minutes else None
        if rt.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.write_run_config()
        if self.epoch == 0 and self.update == 0:
            self.log(f"training {cfg.model} on {len(self.train_set)} images of {len(self.class_names)} classes "
                     f"({len(self.val_set)} for validation), {cfg.epochs} epochs of {self.updates_per_epoch} "
                     f"updates, global batch {self.global_batch}, lr {self.lr:.3g}, on {rt.world_size} x "
                     f"{rt.device.type}; run directory {self.run_dir}")
            self.save()  # a valid checkpoint exists from the very start
        else:
            self.log(f"resuming {self.run_dir} at epoch {self.epoch + 1}, update {self.update}")
        completed = True
        while self.epoch < cfg.epochs:
            if not self.train_epoch(deadline):
                completed = False
                break
            row = self.finish_epoch()
            self.log(_epoch_line(row, cfg.epochs))
        if completed and rt.is_main:
            final = self.export_final()
            self.log(f"done: best top-1 {self.best['top1']:.2f}% ({self.best['source']} weights, epoch "
                     f"{self.best['epoch']}); final model in {final}")
        return TrainResult(self.run_dir, self.epoch, completed, self.best["top1"], self.best["epoch"],
                           self.history)


def _epoch_line(row: Dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {row['epoch']}/{epochs}", f"train loss {row['train_loss']:.4f}",
             f"{row['train_images_per_s']:.1f} img/s"]
    if row.get("val_top1") is not None:
        parts.append(f"val top-1 {row['val_top1']:.2f}% top-5 {row['val_top5']:.2f}%")
    if row.get("ema_val_top1") is not None:
        parts.append(f"EMA top-1 {row['ema_val_top1']:.2f}% top-5 {row['ema_val_top5']:.2f}%")
    parts.append(f"{row['epoch_time_s']:.0f} s")
    if row.get("bad_images"):
        parts.append(f"{int(row['bad_images'])} unreadable images skipped")
    return ", ".join(parts)


def train(config: TrainConfig) -> TrainResult:
    """Train (or fine-tune) as ``config`` says, writing the run directory ``config.output``.

    Refuses to overwrite a run directory that already holds a checkpoint: use ``resume`` for that.
    """
    runtime = _setup_runtime(config)
    _check_config(config, runtime)
    if (Path(config.output) / LAST).exists():
        raise MixNetError(f"{config.output}: already holds a training run; resume it with "
                          f"--resume {config.output}, or choose another --output")
    return _run(config, runtime, None)


def _run(config: TrainConfig, runtime: Runtime, state: Optional[Dict[str, Any]]) -> TrainResult:
    try:
        trainer = _Trainer(config, runtime, state)
        trainer.build()
        return trainer.run()
    finally:
        if runtime.distributed and dist.is_initialized():
            dist.destroy_process_group()


# Settings that may differ on resume without changing the result (others are allowed but warned about).
RESUME_SAFE = {"epochs", "workers", "progress", "checkpoint_minutes", "max_minutes", "eval_every", "data",
               "train_dir", "val_dir", "output", "device", "threads"}


def resume(run_dir: str, **overrides) -> TrainResult:
    """Continue the run in ``run_dir`` from its last checkpoint; ``overrides`` change settings
    (``epochs`` to extend a run, ``max_minutes``, ``workers``...)."""
    run_dir = Path(run_dir)
    state = load_checkpoint(run_dir / LAST)
    values = dict(state["config"])
    changed = sorted(k for k, v in overrides.items() if values.get(k) != (list(v) if isinstance(v, tuple) else v))
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise MixNetError(f"unknown training setting(s): {', '.join(unknown)}")
    values.update(overrides)
    values["output"] = str(run_dir)
    config = TrainConfig.from_dict(values)
    risky = [k for k in changed if k not in RESUME_SAFE]
    if risky:
        warnings.warn(f"resuming {run_dir} with changed settings {', '.join(risky)}: the result will differ "
                      f"from an uninterrupted run", stacklevel=2)
    runtime = _setup_runtime(config)
    _check_config(config, runtime)
    return _run(config, runtime, state)
