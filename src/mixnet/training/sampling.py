"""What a run trains on: the class folders, the datasets and loaders, and a sampling order that
depends only on (seed, position).

Every random draw of the data is a pure function of the seed and where training stands: the order of
an epoch comes from (seed, epoch), each sample's augmentation from (seed, epoch, sample index). So a run
resumed mid-epoch sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import math
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Mapping, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from ..data.images import (LabelledImageFolder, build_eval_transform, build_train_transform, collate,
                           folder_classes)
from ..errors import MixNetError
from .config import TrainConfig
from .distributed import Runtime


def mix_seed(*parts: int) -> int:
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
        generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        order = torch.randperm(self.size, generator=generator).tolist()
        padded = (order * math.ceil(self.per_rank * self.world_size / self.size))[:self.per_rank * self.world_size]
        for index in padded[self.rank::self.world_size][self.skip:]:
            yield mix_seed(self.seed, self.epoch, index), index

    def __len__(self) -> int:
        return self.per_rank - self.skip


def progressive_size(epoch: int, epochs: int, start: Optional[int], final: int) -> int:
    """The training image size of ``epoch`` (0-based) under progressive resizing from ``start`` to
    ``final`` px: ``start`` for the first quarter of the run, then growing linearly over the middle half,
    ``final`` for the last quarter (in steps of 8 px, so that few shapes occur). Low-resolution epochs
    cost fewer pixels, and a full-size end leaves the network matched to the evaluation size.
    """
    if start is None or start >= final or epoch >= epochs - 1:
        return final
    t = min(max(((epoch + 0.5) / epochs - 0.25) / 0.5, 0.0), 1.0)
    if t >= 1.0:
        return final
    return max(start, min(final, 8 * round((start + (final - start) * t) / 8)))


def split_dirs(config: TrainConfig) -> Tuple[Path, Path]:
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


def discover_classes(config: TrainConfig, log: Callable[[str], None]) -> List[str]:
    """The training classes: the train folder's class folders that hold images (empty ones are skipped
    with a warning); val folders without a training class are reported and skipped."""
    train_dir, val_dir = split_dirs(config)
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
    val_classes = folder_classes(val_dir)
    extra = [c for c in val_classes if c not in classes]
    if extra:
        log(f"warning: {len(extra)} class folder(s) of {val_dir} have no training images and are not "
            f"evaluated: {', '.join(extra[:10])}{' ...' if len(extra) > 10 else ''}")
    missing = [c for c in classes if c not in val_classes]
    if missing:
        log(f"warning: {len(missing)} training class(es) have no folder in {val_dir}, so validation "
            f"scores the other classes only: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    return classes


def _holds_anything(folder: Path) -> bool:
    with os.scandir(folder) as entries:
        return any(True for _ in entries)


def report_resumed_classes(data: TrainData, class_names: List[str], log: Callable[[str], None]) -> None:
    """A resumed run keeps the classes it was started with, whatever folder it is now given (``--data``
    may change, e.g. to where the dataset moved): warn about a folder that no longer matches them."""
    for name, dataset in (("training", data.train_set), ("validation", data.val_set)):
        root = Path(dataset.root)
        present = set(dataset.targets)
        missing = [c for i, c in enumerate(class_names) if i not in present]
        if missing:
            log(f"warning: {len(missing)} of the run's classes have no {name} images in {root}: "
                f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
        known = set(class_names)
        extra = [c for c in folder_classes(root) if c not in known and _holds_anything(root / c)]
        if extra:
            log(f"warning: {len(extra)} class folder(s) of {root} are not among the run's classes and are "
                f"ignored (a resumed run keeps its classes): {', '.join(extra[:10])}"
                f"{' ...' if len(extra) > 10 else ''}")


@dataclass
class TrainData:
    """The datasets and loaders of a run, and the sampler that positions it within an epoch."""

    train_set: LabelledImageFolder
    val_set: LabelledImageFolder
    sampler: EpochSampler
    train_loader: DataLoader
    val_loader: DataLoader  # this process's share of the validation images
    updates_per_epoch: int


def ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave Ctrl-C and SIGTERM to the trainer, which checkpoints before it stops (a
    worker that died of the signal would fail the batches drawn meanwhile); they end with it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def build_data(config: TrainConfig, runtime: Runtime, class_names: List[str],
               normalization: Mapping) -> TrainData:
    """Datasets for ``class_names`` (in that order), normalised with the model's ``mean``/``std``."""
    cfg = config
    train_dir, val_dir = split_dirs(cfg)
    class_to_idx = {c: i for i, c in enumerate(class_names)}
    train_set = LabelledImageFolder(train_dir, class_to_idx=class_to_idx, transform=build_train_transform(
        cfg.train_size, scale=cfg.scale, ratio=cfg.ratio, hflip=cfg.hflip,
        randaugment_ops=cfg.randaugment_ops, randaugment_magnitude=cfg.randaugment_magnitude,
        randaugment_std=cfg.randaugment_std, random_erasing=cfg.random_erasing,
        interpolation=cfg.interpolation, mean=normalization["mean"], std=normalization["std"]))
    eval_transform = build_eval_transform(normalization, image_size=cfg.eval_size,
                                          crop_pct=cfg.eval_crop_pct, interpolation=cfg.interpolation)
    val_set = LabelledImageFolder(val_dir, class_to_idx=class_to_idx, transform=eval_transform)
    if len(val_set) == 0:
        raise MixNetError(f"{val_dir}: no validation images in the training classes")

    sampler = EpochSampler(len(train_set), cfg.seed, runtime.rank, runtime.world_size)
    updates_per_epoch = sampler.per_rank // cfg.batch_size // cfg.accum_steps
    if updates_per_epoch < 1:
        raise MixNetError(f"{train_dir}: {len(train_set)} training images are fewer than one update "
                          f"({cfg.batch_size} x {cfg.accum_steps} accumulation x {runtime.world_size} "
                          f"processes); lower --batch-size")
    loader_args = dict(num_workers=cfg.workers, collate_fn=collate, pin_memory=runtime.device.type == "cuda",
                       persistent_workers=cfg.workers > 0, worker_init_fn=ignore_stop_signals)
    train_loader = DataLoader(SeededSamples(train_set), batch_size=cfg.batch_size, sampler=sampler,
                              drop_last=True, **loader_args)
    val_indices = list(range(runtime.rank, len(val_set), runtime.world_size))
    val_loader = DataLoader(val_set, batch_size=cfg.batch_size, sampler=val_indices, **loader_args)
    return TrainData(train_set, val_set, sampler, train_loader, val_loader, updates_per_epoch)
