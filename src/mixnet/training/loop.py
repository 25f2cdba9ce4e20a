"""The training loop: ``train(TrainConfig)`` starts a run, ``resume(run_dir)`` continues one.

A run directory's files are described in ``run_dir``; what the data looks like and how every random
draw depends only on (seed, position) in ``sampling``; the process set-up in ``distributed``.
Dropout, drop-path and mixup draw from (seed, optimizer update, rank), so a run resumed from any
checkpoint continues exactly as the uninterrupted run would have (bit-identical on CPU with
``deterministic=True``).

Distributed: launch with ``torchrun --nproc-per-node N -m mixnet train ...`` (multi-node: add
``--nnodes``, ``--node-rank``, ``--rdzv-endpoint`` as usual). ``batch_size`` is per process; the
learning rate, unless given, is ``lr_base * global_batch / lr_base_size``.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import MixNetError
from ..factory import create_model, fill, resolve_config
from ..pretrained.checkpoint import (HUB_CONFIG, HUB_SAFETENSORS, nonfinite_tensors, read_checkpoint,
                                     save_pretrained)
from .config import CHOICES, TrainConfig
from .distributed import (Runtime, all_reduce, any_process, average_buffers, rng_state, set_rng_state,
                          setup_runtime, shutdown)
from .optimizers import LRSchedule, ModelEma, create_optimizer, set_lr
from .run_dir import (BEST, FINAL, LAST, Best, EpochTotals, TrainState, copy_checkpoint, load_checkpoint,
                      save_checkpoint, write_metrics, write_run_config)
from .sampling import build_data, discover_classes, mix_seed, progressive_size, report_resumed_classes


@dataclass
class TrainResult:
    run_dir: Path
    epochs: int  # the run's length
    epochs_done: int
    completed: bool  # False: stopped by max_minutes (resume to continue)
    best_top1: Optional[float]
    best_epoch: Optional[int]
    best_source: Optional[str]  # "raw" or "ema": the weights that scored best_top1
    final_model: Optional[Path]  # the hub folder of the best weights, once the run is complete
    history: List[Dict[str, Any]]  # one row per epoch, as in metrics.csv

    def to_dict(self) -> Dict[str, Any]:
        """The result as JSON values (``mixnet train --json``)."""
        d = dataclasses.asdict(self)
        d.update(run_dir=str(self.run_dir), final_model=self.final_model and str(self.final_model))
        return d


class NonFiniteLoss(MixNetError):
    """The loss became NaN or infinite: training diverged."""

    exit_code = 1  # the run failed; the settings were valid


class Trainer:
    """One run: the model with its optimiser, EMA and data, and where training stands."""

    def __init__(self, config: TrainConfig, runtime: Runtime, state: Optional[TrainState] = None):
        cfg, rt = config, runtime
        self.config, self.runtime = config, runtime
        self.run_dir = Path(cfg.output)
        self.reported_failures: Set[str] = set()
        self.interrupted: Optional[int] = None  # the stop signal received (SIGINT, SIGTERM), if any
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        elif rt.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.class_names = list(state.class_names) if state else discover_classes(cfg, self.log)

        torch.manual_seed(mix_seed(cfg.seed, 0xC0FFEE))  # the same initial weights on every rank
        model = create_model(cfg.model, num_classes=len(self.class_names), drop_rate=cfg.drop_rate,
                             drop_path_rate=cfg.drop_path_rate, **cfg.model_args)
        if cfg.pretrained and state is None:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*classifier not loaded.*")
                fill(model, read_checkpoint(cfg.pretrained))
        self.data = build_data(cfg, rt, self.class_names, model.pretrained_cfg)
        if state is not None:
            report_resumed_classes(self.data, self.class_names, self.log)
        if cfg.sync_bn and rt.distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.model = model.to(rt.device, memory_format=self.memory_format)
        self.ema = ModelEma(model, cfg.ema_decay, cfg.ema_warmup) if cfg.ema else None
        self.global_batch = cfg.batch_size * cfg.accum_steps * rt.world_size
        self.lr = cfg.lr if cfg.lr is not None else cfg.lr_base * self.global_batch / cfg.lr_base_size
        self.optimizer = create_optimizer(cfg.opt, model, self.lr, cfg.weight_decay, cfg.momentum, cfg.opt_eps,
                                          beta2=cfg.opt_beta2)
        self.schedule = LRSchedule(cfg.sched, self.lr, cfg.epochs, cfg.warmup_epochs, cfg.warmup_lr,
                                   cfg.min_lr, cfg.decay_epochs, cfg.decay_rate, cfg.sched_hold)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
        self.ddp = (nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device] if rt.device.type == "cuda" else None) if rt.distributed else model)
        # What a training step calls; evaluation, EMA and checkpoints use the uncompiled model.
        self.train_forward = self.ddp
        if cfg.compile:
            # Static shapes: a shape change (progressive resizing, an earlier compile of the same forward in
            # this process) would otherwise switch dynamo to dynamic-shape kernels, whose other rounding
            # makes a resumed run differ from the uninterrupted one. So each training size compiles once,
            # and dynamo must keep a graph for every size rather than fall back to eager after 8 (one more
            # for a graph this process may already hold for the same forward).
            sizes = {progressive_size(e, cfg.epochs, cfg.min_train_size, cfg.train_size) for e in range(cfg.epochs)}
            limits = torch._dynamo.config
            limits.recompile_limit = max(limits.recompile_limit, len(sizes) + 1)
            self.train_forward = torch.compile(self.ddp, dynamic=False)
        self.mixer = build_mixer(cfg, len(self.class_names))

        # Where training stands: what a checkpoint saves besides the tensors (see TrainState).
        self.epoch, self.update, self.global_update = 0, 0, 0
        self.history: List[Dict[str, Any]] = []
        self.best = Best()
        self.totals = EpochTotals()  # sums over the current epoch's updates
        self.elapsed_before = 0.0  # seconds trained before this process started
        self.started = time.monotonic()
        if state is not None:
            self.restore(state)

    def log(self, message: str) -> None:
        if self.runtime.is_main:
            from tqdm import tqdm

            tqdm.write(message, file=sys.stderr)

    # --- checkpoints

    def checkpoint(self) -> TrainState:
        return TrainState(
            config=self.config.to_dict(), class_names=list(self.class_names),
            state_dict=self.model.state_dict(),
            state_dict_ema=self.ema.module.state_dict() if self.ema is not None else None,
            optimizer=self.optimizer.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler is not None else None,
            rng=rng_state(self.runtime), epoch=self.epoch, update=self.update,
            global_update=self.global_update, history=self.history, best=self.best, partial=self.totals,
            elapsed_seconds=self.elapsed_before + (time.monotonic() - self.started))

    def restore(self, state: TrainState) -> None:
        self.model.load_state_dict(state.state_dict)
        if self.ema is not None and state.state_dict_ema is not None:
            self.ema.module.load_state_dict(state.state_dict_ema)
        self.optimizer.load_state_dict(state.optimizer)
        if self.scaler is not None and state.scaler:
            self.scaler.load_state_dict(state.scaler)
        self.epoch, self.update, self.global_update = state.epoch, state.update, state.global_update
        self.history = list(state.history)
        self.best = dataclasses.replace(state.best)
        self.totals = dataclasses.replace(state.partial)
        self.elapsed_before = state.elapsed_seconds
        set_rng_state(state.rng, self.runtime)

    def save(self, best: bool = False) -> None:
        # An update can leave NaN/infinite weights behind a finite loss (the loss is checked before the
        # update): never let them replace the last good checkpoint. Every rank checks (the same weights).
        if nonfinite_tensors(self.model.state_dict()):
            where = (f"epoch {self.epoch + 1}, update {self.update}" if self.update else
                     f"the end of epoch {self.epoch}")
            raise NonFiniteLoss(
                f"the weights became NaN/infinite by {where}: "
                f"training diverged; {self.run_dir / LAST} keeps the last good state. Try a lower --lr or "
                f"--clip-grad 1.0{' or --amp none' if self.config.amp != 'none' else ''}")
        if not self.runtime.is_main:
            return
        save_checkpoint(self.checkpoint(), self.run_dir / LAST)
        if best:
            copy_checkpoint(self.run_dir / LAST, self.run_dir / BEST)

    # --- the loop

    def run(self) -> TrainResult:
        with self.stop_signals_checkpoint():
            return self._run()

    @contextmanager
    def stop_signals_checkpoint(self):
        """Ctrl-C or SIGTERM (what schedulers and ``timeout`` send) stop the run at the next update with a
        checkpoint, rather than losing the updates since the last one; a second signal stops at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def stop(signum, frame):
            if self.interrupted is not None:
                raise KeyboardInterrupt
            self.interrupted = signum
            self.log(f"{signal.Signals(signum).name}: saving a checkpoint at the next update, then stopping "
                     f"(again to stop at once)")

        previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _run(self) -> TrainResult:
        cfg, rt = self.config, self.runtime
        self.started = time.monotonic()
        deadline = self.started + cfg.max_minutes * 60 if cfg.max_minutes else None
        if rt.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_run_config(self.run_dir, cfg.to_dict(), self.class_names, world_size=rt.world_size,
                             global_batch=self.global_batch, lr=self.lr,
                             updates_per_epoch=self.data.updates_per_epoch)
        if self.epoch == 0 and self.update == 0:
            self.log(f"training {cfg.model} on {len(self.data.train_set)} images of {len(self.class_names)} "
                     f"classes ({len(self.data.val_set)} for validation), {cfg.epochs} epochs of "
                     f"{self.data.updates_per_epoch} updates, global batch {self.global_batch}, lr {self.lr:.3g}, "
                     f"on {rt.world_size} x {rt.device.type}; run directory {self.run_dir}")
            self.save()  # a valid checkpoint exists from the very start
        elif self.epoch >= cfg.epochs:
            self.log(f"{self.run_dir} has already trained all {cfg.epochs} epochs; give --epochs to train "
                     f"longer")
            if rt.is_main and not self.final_is_current():  # stopped after the last checkpoint, before
                write_metrics(self.run_dir, self.history)  # (or while) writing the metrics and final/
                self.export_final()
            return self.result(completed=True)
        else:
            self.log(f"resuming {self.run_dir} at epoch {self.epoch + 1}, update {self.update}")
        while self.epoch < cfg.epochs:
            if not self.train_epoch(deadline):
                return self.result(completed=False)
            self.log(epoch_line(self.finish_epoch(), cfg.epochs))
        if rt.is_main:
            final = self.export_final()
            self.log(f"done: best top-1 {self.best.top1:.2f}% ({self.best.source} weights, epoch "
                     f"{self.best.epoch}); final model in {final}")
        return self.result(completed=True)

    def train_epoch(self, deadline: Optional[float]) -> bool:
        """Train the rest of the current epoch; False if stopped early by the deadline (checkpointed)."""
        from tqdm import tqdm

        cfg, rt, totals = self.config, self.runtime, self.totals
        self.model.train()
        if cfg.freeze_bn:
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        self.data.sampler.set_epoch(self.epoch, self.update * cfg.accum_steps * cfg.batch_size)
        if cfg.min_train_size is not None and self.update == 0:
            self.log(f"epoch {self.epoch + 1}: training at {self.train_size()} px (progressive resizing)")
        batches = iter(self.data.train_loader)
        bar = tqdm(total=self.data.updates_per_epoch * self.global_batch, initial=self.update * self.global_batch,
                   desc=f"epoch {self.epoch + 1}/{cfg.epochs}", unit="img", dynamic_ncols=True,
                   disable=not (cfg.progress and rt.is_main), mininterval=1.0 if sys.stderr.isatty() else 30.0)
        last_save = t0 = time.monotonic()
        try:
            while self.update < self.data.updates_per_epoch:
                lr = self.schedule(self.epoch + (self.update / self.data.updates_per_epoch
                                                 if cfg.sched_per_step else 0.0))
                set_lr(self.optimizer, lr)
                torch.manual_seed(mix_seed(cfg.seed, self.global_update, rt.rank, 0xD40))
                micro = [next(batches) for _ in range(cfg.accum_steps)]
                now = time.monotonic()
                empty, save_due, stop_due, interrupted = any_process(
                    [any(len(b.images) == 0 for b in micro),
                     rt.is_main and cfg.checkpoint_minutes > 0 and now - last_save > cfg.checkpoint_minutes * 60,
                     rt.is_main and deadline is not None and now > deadline, self.interrupted is not None], rt)
                if stop_due or interrupted:
                    totals.train_seconds += time.monotonic() - t0
                    self.save()
                    why = "interrupted" if interrupted else f"stopped after {cfg.max_minutes} minutes"
                    self.log(f"{why} at epoch {self.epoch + 1}, update {self.update} (checkpointed); resume "
                             f"with: mixnet train --resume {self.run_dir}")
                    if interrupted:
                        raise KeyboardInterrupt
                    return False
                for b in micro:  # counted here, after the stop: a resumed run draws a stopped batch again
                    self.report_failures(b.failures)
                    totals.bad_images += len(b.failures)
                if not empty:
                    loss_sum, samples = self.step(micro)
                    totals.loss_sum += loss_sum
                    totals.samples += samples
                self.update += 1
                self.global_update += 1
                bar.update(self.global_batch)
                if totals.samples:
                    bar.set_postfix(loss=f"{totals.loss_sum / totals.samples:.3f}", lr=f"{lr:.2e}", refresh=False)
                if save_due:
                    totals.train_seconds += time.monotonic() - t0
                    self.save()
                    last_save = t0 = time.monotonic()
        finally:
            bar.close()
        totals.train_seconds += time.monotonic() - t0
        return True

    def step(self, micro) -> Tuple[float, int]:
        """One optimizer update over the micro-batches ``micro``; returns (loss sum, samples)."""
        cfg, rt = self.config, self.runtime
        size = self.train_size()
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, samples, nonfinite = 0.0, 0, False
        for i, batch in enumerate(micro):
            images = batch.images.to(rt.device, non_blocking=True)
            if images.shape[-2:] != (size, size):  # progressive resizing: the loader's crops, scaled down
                images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
            images = images.contiguous(memory_format=self.memory_format)
            targets = batch.targets.to(rt.device, non_blocking=True)
            if self.mixer is not None and float(torch.rand(())) < cfg.mix_prob:
                images, targets = self.mixer(images, targets)
            sync = rt.distributed and i < len(micro) - 1
            with (self.ddp.no_sync() if sync else nullcontext()), self.autocast():
                loss = self.loss(self.train_forward(images), targets)
            value = float(loss.detach())
            nonfinite = nonfinite or not math.isfinite(value)
            scaled = loss / len(micro)
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            loss_sum += value * len(images)
            samples += len(images)
        if any_process([nonfinite], rt)[0]:
            raise NonFiniteLoss(
                f"the training loss became NaN/infinite at epoch {self.epoch + 1}, update {self.update + 1}: "
                f"training diverged; {self.run_dir / LAST} keeps the last good state (epoch {self.epoch}). "
                f"Try a lower --lr or --clip-grad 1.0{' or --amp none' if cfg.amp != 'none' else ''}")
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

    def train_size(self) -> int:
        cfg = self.config
        return progressive_size(self.epoch, cfg.epochs, cfg.min_train_size, cfg.train_size)

    def autocast(self):
        if self.config.amp == "none":
            return nullcontext()
        return torch.autocast(self.runtime.device.type,
                              dtype=torch.bfloat16 if self.config.amp == "bf16" else torch.float16)

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Cross-entropy with label smoothing, for class indices or (mixup/cutmix) soft targets."""
        logits, smoothing = logits.float(), self.config.label_smoothing
        if targets.dim() == 1:
            return F.cross_entropy(logits, targets, label_smoothing=smoothing)
        soft = targets * (1.0 - smoothing) + smoothing / logits.shape[1]
        return torch.sum(-soft * F.log_softmax(logits, dim=-1), dim=-1).mean()

    def report_failures(self, failures) -> None:
        for failure in failures:
            if failure.path not in self.reported_failures:
                self.reported_failures.add(failure.path)
                self.log(f"warning: skipped unreadable image {failure.path}: {failure.problem}")

    @torch.no_grad()
    def evaluate(self, model: nn.Module, name: str = "") -> Dict[str, float]:
        from tqdm import tqdm

        rt = self.runtime
        model.eval()
        k = min(5, len(self.class_names))
        loss_sum, top1, top5, count, bad = 0.0, 0.0, 0.0, 0.0, 0.0
        for batch in tqdm(self.data.val_loader, desc=f"validating {name}".strip(), unit="batch", leave=False,
                          dynamic_ncols=True, disable=not (self.config.progress and rt.is_main),
                          mininterval=1.0 if sys.stderr.isatty() else 30.0):
            self.report_failures(batch.failures)
            bad += len(batch.failures)
            if len(batch.images) == 0:
                continue
            images = batch.images.to(rt.device).contiguous(memory_format=self.memory_format)
            targets = batch.targets.to(rt.device)
            logits = model(images).float()
            loss_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
            hits = logits.topk(k, dim=1).indices == targets[:, None]
            top1 += float(hits[:, 0].sum())
            top5 += float(hits.any(dim=1).sum())
            count += len(targets)
        loss_sum, top1, top5, count, bad = all_reduce([loss_sum, top1, top5, count, bad], rt)
        if count == 0:  # scores of nothing (0%) would be recorded, and a "best" model exported
            raise MixNetError(f"{self.data.val_set.root}: none of the {int(bad)} validation images could be "
                              f"read (each is reported above)")
        return dict(loss=loss_sum / count, top1=100.0 * top1 / count, top5=100.0 * top5 / count, bad=bad)

    def finish_epoch(self) -> Dict[str, Any]:
        """Evaluate (raw and EMA weights), record the epoch's row, save the checkpoints and metrics."""
        cfg, rt = self.config, self.runtime
        size = self.train_size()
        loss_sum, samples, bad = all_reduce([self.totals.loss_sum, self.totals.samples, self.totals.bad_images], rt)
        if samples == 0:  # the network did not train: a loss of 0 and an untrained "final" model would follow
            raise MixNetError(f"{self.data.train_set.root}: no training image of epoch {self.epoch + 1} could be "
                              f"read ({int(bad)} unreadable, each reported above)")
        self.epoch += 1
        self.update = 0
        row: Dict[str, Any] = dict(
            epoch=self.epoch, lr=self.optimizer.param_groups[0]["lr"], train_size=size,
            train_loss=loss_sum / max(samples, 1.0),
            train_images_per_s=samples / max(self.totals.train_seconds, 1e-9), bad_images=int(bad))
        eval_started = time.monotonic()
        improved = False
        if self.epoch % cfg.eval_every == 0 or self.epoch == cfg.epochs:
            candidates = []
            for source, model, prefix in (("raw", self.model, "val"),
                                          ("ema", self.ema.module if self.ema else None, "ema_val")):
                if model is None:
                    continue
                average_buffers(model, rt)
                scores = self.evaluate(model, f"{source} weights")
                row.update({f"{prefix}_loss": scores["loss"], f"{prefix}_top1": scores["top1"],
                            f"{prefix}_top5": scores["top5"]})
                if source == "raw":
                    row["bad_images"] += int(scores["bad"])
                candidates.append((source, scores["top1"]))
            source, top1 = max(candidates, key=lambda c: c[1])
            improved = self.best.top1 is None or top1 > self.best.top1
            if improved:
                self.best = Best(top1, self.epoch, source)
        row.update(epoch_time_s=self.totals.train_seconds + time.monotonic() - eval_started,
                   total_time_s=self.elapsed_before + time.monotonic() - self.started)
        row = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}
        self.history.append(row)
        self.totals = EpochTotals()
        self.save(best=improved)
        if rt.is_main:
            write_metrics(self.run_dir, self.history)
        return row

    def export_final(self) -> Path:
        """The best weights (raw or EMA) as a hub folder, with class names and the evaluation size."""
        cfg = self.config
        state = load_checkpoint(self.run_dir / BEST if (self.run_dir / BEST).is_file() else self.run_dir / LAST)
        model = create_model(cfg.model, num_classes=len(self.class_names), **cfg.model_args)
        model.load_state_dict(state.state_dict_ema if self.best.source == "ema" else state.state_dict)
        model.pretrained_cfg = {**self.model.pretrained_cfg, "input_size": (3, cfg.eval_size, cfg.eval_size),
                                "crop_pct": cfg.eval_crop_pct, "interpolation": cfg.interpolation,
                                "num_classes": len(self.class_names), "class_names": list(self.class_names)}
        return save_pretrained(model, self.run_dir / FINAL, class_names=self.class_names)

    def final_is_current(self) -> bool:
        """Whether ``final/`` holds a complete export written after the last checkpoint."""
        files = [self.run_dir / FINAL / name for name in (HUB_SAFETENSORS, HUB_CONFIG)]
        return all(f.is_file() and f.stat().st_mtime >= (self.run_dir / LAST).stat().st_mtime for f in files)

    def result(self, completed: bool) -> TrainResult:
        final = self.run_dir / FINAL
        return TrainResult(self.run_dir, self.config.epochs, self.epoch, completed, self.best.top1, self.best.epoch,
                           self.best.source, final if completed and final.is_dir() else None, self.history)


def build_mixer(config: TrainConfig, num_classes: int):
    """MixUp and/or CutMix (one chosen per batch), or None."""
    if config.mixup <= 0 and config.cutmix <= 0:
        return None
    from torchvision.transforms import v2

    choices = ([v2.MixUp(alpha=config.mixup, num_classes=num_classes)] if config.mixup > 0 else []) + \
              ([v2.CutMix(alpha=config.cutmix, num_classes=num_classes)] if config.cutmix > 0 else [])
    return v2.RandomChoice(choices)


def epoch_line(row: Dict[str, Any], epochs: int) -> str:
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


def check_config(config: TrainConfig) -> None:
    """Refuse settings that cannot work, before any data is read or a run directory is written."""
    from ..models.network import MIN_INPUT_SIZE

    if config.output is None:
        raise MixNetError("no run directory: give --output RUN_DIR")
    if Path(config.output).exists() and not Path(config.output).is_dir():
        raise MixNetError(f"--output {config.output}: is a file, not a run directory")
    for name, allowed in CHOICES.items():
        if getattr(config, name) not in allowed:
            raise MixNetError(f"unknown {name} {getattr(config, name)!r} (use one of {', '.join(allowed)})")
    resolve_config(config.model, **config.model_args)  # an unknown model or argument: a MixNetError
    for name in ("epochs", "batch_size", "accum_steps", "eval_every"):
        if getattr(config, name) < 1:
            raise MixNetError(f"{name} must be >= 1, got {getattr(config, name)}")
    for name in ("train_size", "eval_size"):
        if getattr(config, name) < MIN_INPUT_SIZE:
            raise MixNetError(f"{name} must be >= {MIN_INPUT_SIZE} (MixNet's smallest input), "
                              f"got {getattr(config, name)}")
    if config.min_train_size is not None and not MIN_INPUT_SIZE <= config.min_train_size <= config.train_size:
        raise MixNetError(f"min_train_size must be between {MIN_INPUT_SIZE} and train_size "
                          f"({config.train_size}), got {config.min_train_size}")
    for name, low, high in (("sched_hold", 0, 1), ("opt_beta2", 0, 1), ("label_smoothing", 0, 1)):
        if not low <= getattr(config, name) < high:
            raise MixNetError(f"{name} must be in [{low}, {high}), got {getattr(config, name)}")
    for name, high in (("hflip", 1), ("mix_prob", 1), ("random_erasing", 1), ("randaugment_magnitude", 10)):
        if not 0 <= getattr(config, name) <= high:
            raise MixNetError(f"{name} must be in [0, {high}], got {getattr(config, name)}")
    (low, high), (ratio_low, ratio_high) = config.scale, config.ratio
    if not 0 < low <= high <= 1:
        raise MixNetError(f"scale must be two crop areas 0 < LOW <= HIGH <= 1, got {low} {high}")
    if not 0 < ratio_low <= ratio_high:
        raise MixNetError(f"ratio must be two aspect ratios 0 < LOW <= HIGH, got {ratio_low} {ratio_high}")
    # Values that would crash the run with a traceback (a division by zero, torch's own ValueError) or
    # silently train something else (an EMA that extrapolates, a negative warm-up or crop count).
    for name in ("lr", "lr_base", "warmup_lr", "min_lr", "weight_decay", "momentum", "opt_eps", "warmup_epochs",
                 "randaugment_ops", "randaugment_std", "mixup", "cutmix", "checkpoint_minutes", "max_minutes"):
        value = getattr(config, name)
        if value is not None and not value >= 0:
            raise MixNetError(f"{name} must be >= 0, got {value}")
    for name in ("lr_base_size", "decay_epochs", "decay_rate", "clip_grad"):
        value = getattr(config, name)
        if value is not None and not value > 0:
            raise MixNetError(f"{name} must be > 0, got {value}")
    for name in ("drop_rate", "drop_path_rate"):
        if not 0 <= getattr(config, name) < 1:
            raise MixNetError(f"{name} must be in [0, 1), got {getattr(config, name)}")
    if not 0 <= config.ema_decay <= 1:
        raise MixNetError(f"ema_decay must be in [0, 1], got {config.ema_decay}")
    if config.workers < 0:
        raise MixNetError(f"workers must be >= 0, got {config.workers}")
    if config.threads is not None and config.threads < 1:
        raise MixNetError(f"threads must be >= 1, got {config.threads}")


def check_runtime(config: TrainConfig, runtime: Runtime) -> None:
    """Refuse settings this machine cannot run."""
    if config.amp == "fp16" and runtime.device.type != "cuda":
        raise MixNetError("amp fp16 needs a GPU; on CPU use --amp bf16 or none")
    if config.amp == "bf16" and runtime.device.type == "cpu":
        from ..deploy.runtimes import check_bf16_cpu

        check_bf16_cpu("--amp bf16", instead="--amp none")
    if config.sync_bn and runtime.distributed and runtime.device.type != "cuda":
        raise MixNetError("--sync-bn needs GPUs (torch's SyncBatchNorm is GPU-only); on CPU, BatchNorm "
                          "statistics are averaged over processes before each evaluation instead")


def train(config: TrainConfig) -> TrainResult:
    """Train (or fine-tune) as ``config`` says, writing the run directory ``config.output``.

    Refuses to overwrite a run directory that already holds a checkpoint: use ``resume`` for that.
    """
    check_config(config)
    runtime = setup_runtime(config.device, config.threads)
    check_runtime(config, runtime)
    last = Path(config.output) / LAST
    if last.exists():
        state = load_checkpoint(last)
        if state.epoch > 0 or state.update > 0:
            raise MixNetError(f"{config.output}: already holds a training run; resume it with "
                              f"--resume {config.output}, or choose another --output")
        # It failed before its first update (a setting that broke the first step): nothing to keep.
    return _run(config, runtime, None)


def _run(config: TrainConfig, runtime: Runtime, state: Optional[TrainState]) -> TrainResult:
    try:
        return Trainer(config, runtime, state).run()
    finally:
        shutdown(runtime)


# Settings that may differ on resume without changing the result (others are allowed but warned about).
# ``epochs`` is not among them: a new length recomputes the schedule from the same point (the cosine
# then ends at the new last epoch), so the weights differ from those of the original run.
RESUME_SAFE = {"workers", "progress", "checkpoint_minutes", "max_minutes", "eval_every", "data",
               "train_dir", "val_dir", "output", "device", "threads"}
# Settings the checkpoint's tensors are shaped by: the weights and optimizer state would not load.
RESUME_FIXED = {"model", "model_args", "opt"}


def resume(run_dir: str, **overrides) -> TrainResult:
    """Continue the run in ``run_dir`` from its last checkpoint; ``overrides`` change settings
    (``epochs`` to extend a run, ``max_minutes``, ``workers``...)."""
    run_dir = Path(run_dir)
    state = load_checkpoint(run_dir / LAST)
    values = dict(state.config)
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise MixNetError(f"unknown training setting(s): {', '.join(unknown)}")
    changed = sorted(k for k, v in overrides.items() if values.get(k) != (list(v) if isinstance(v, tuple) else v))
    fixed = [k for k in changed if k in RESUME_FIXED]
    if fixed:
        raise MixNetError(f"{run_dir}: {fixed[0]} cannot change when resuming (the run uses "
                          f"{values.get(fixed[0])!r}); start a new run to train another")
    if overrides.get("epochs", state.epoch) < state.epoch:
        raise MixNetError(f"{run_dir}: --epochs {overrides['epochs']} is fewer than the {state.epoch} "
                          f"epochs already trained")
    if overrides.get("recipe") is not None and overrides["recipe"] != values.get("recipe"):
        raise MixNetError(f"{run_dir}: a recipe cannot change a run being resumed (its settings would not be "
                          f"applied); give single settings instead")
    if "pretrained" in changed:  # it only sets the starting weights: a resumed run starts from its checkpoint
        raise MixNetError(f"{run_dir}: --pretrained only chooses a run's starting weights; a resumed run "
                          f"continues from its checkpoint (start a new run to train from other weights)")
    output = overrides.get("output")
    if output is not None and Path(output).resolve() != run_dir.resolve():
        raise MixNetError(f"--output {output}: a resumed run continues in its own directory ({run_dir}); "
                          f"leave out --output, or copy {run_dir} there and resume the copy")
    values.update(overrides)
    values["output"] = str(run_dir)
    config = TrainConfig.from_dict(values)
    risky = [k for k in changed if k not in RESUME_SAFE]
    if risky:
        warnings.warn(f"resuming {run_dir} with changed settings {', '.join(risky)}: the result will differ "
                      f"from an uninterrupted run", stacklevel=2)
    check_config(config)
    runtime = setup_runtime(config.device, config.threads)
    check_runtime(config, runtime)
    return _run(config, runtime, state)
