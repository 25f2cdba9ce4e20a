"""Score a model on a labelled folder (ImageFolder layout): top-1, top-5, loss, per-class accuracy,
confusion matrix, throughput.

Folder names are matched against the model's classes: its own ``class_wnids`` or ``class_names``
when its config carries them; for a 1000-class ImageNet model, the ImageNet wnids (``n01440764``)
or readable names. So a 1000-class model can be scored on any ImageNet subset, and a model trained
on a subset (with its own class names) on the same folders.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.images import LabelledImageFolder, build_eval_transform, collate, folder_classes
from ..errors import MixNetError
from ..data.imagenet import imagenet_class_names, imagenet_wnids
from ..fileio import PathLike
from .predict import Forward, class_names, eval_mode, model_device, num_classes_of


def _normalize_label(label: str) -> str:
    """Folder names often stand in ``_`` for spaces and vary in case."""
    return label.replace("_", " ").strip().casefold()


def label_vocabularies(model) -> List[Tuple[str, List[str]]]:
    """The label lists folder names may be matched against, each with a description, best first."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    vocabularies = []
    if cfg.get("class_wnids"):
        vocabularies.append(("the model's class wnids", list(cfg["class_wnids"])))
    names = class_names(model)
    own_names = bool(cfg.get("class_names"))
    if num_classes_of(model) == 1000 and (not own_names or names == imagenet_class_names()):
        vocabularies.append(("the ImageNet wnids", imagenet_wnids()))
    elif own_names:
        # A model trained on an ImageNet subset named by ImageNet names: its wnids follow from the names.
        wnid_of_name: Dict[str, List[str]] = {}
        for wnid, name in zip(imagenet_wnids(), imagenet_class_names()):
            wnid_of_name.setdefault(name, []).append(wnid)
        wnids = [wnid_of_name.get(name, [None])[0] if len(wnid_of_name.get(name, [])) <= 1 else None
                 for name in names]
        if any(wnids):
            vocabularies.append(("the ImageNet wnids of the model's class names", [w or "" for w in wnids]))
    vocabularies.append(("the model's class names", names))
    return vocabularies


def map_folders_to_classes(folders: Sequence[str], model) -> Dict[str, int]:
    """Map each class folder name onto the model's class index, or raise ``MixNetError`` saying which
    folders match nothing (or more than one class)."""
    best: Optional[Tuple[str, List[str], List[str]]] = None
    for description, labels in label_vocabularies(model):
        index: Dict[str, List[int]] = {}
        for i, label in enumerate(labels):
            index.setdefault(_normalize_label(label), []).append(i)
        hits = {f: index.get(_normalize_label(f), []) for f in folders}
        ambiguous = [f for f, idx in hits.items() if len(idx) > 1]
        unmatched = [f for f, idx in hits.items() if not idx]
        if not unmatched and not ambiguous:
            mapping = {f: idx[0] for f, idx in hits.items()}
            by_class: Dict[int, List[str]] = {}
            for f, c in mapping.items():
                by_class.setdefault(c, []).append(f)
            # Two folders of one class would share one row of the confusion matrix and of the per-class
            # scores: the images of one would be counted as the other's.
            shared = [(c, fs) for c, fs in by_class.items() if len(fs) > 1]
            if shared:
                names = class_names(model)
                detail = "; ".join(f"{' and '.join(map(repr, fs))} are both class {c} ({names[c]})"
                                   for c, fs in shared)
                raise MixNetError(f"folders naming the same class: {detail} (merge them into one folder)")
            return mapping
        if ambiguous and not unmatched:
            detail = "; ".join(f"{f!r} is classes {', '.join(map(str, hits[f]))}" for f in ambiguous)
            raise MixNetError(f"folder names matching more than one of {description}: {detail} "
                              f"(name these folders by wnid or rename them)")
        if best is None or len(unmatched) < len(best[2]):
            best = (description, labels, unmatched)
    description, labels, unmatched = best
    shown = ", ".join(labels[:8]) + (", ..." if len(labels) > 8 else "")
    raise MixNetError(f"{len(unmatched)} of {len(folders)} folder names match none of {description} "
                      f"({', '.join(unmatched[:10])}{', ...' if len(unmatched) > 10 else ''}); "
                      f"the model's classes are: {shown}")


@dataclass
class ValidationResult:
    """Accuracies are percentages; ``confusion_matrix[i][j]`` counts images of folder class i predicted
    as folder class j, the last column counting predictions outside the folder's classes."""

    top1: float
    top5: float
    topk: int  # the k of "top5": 5, or fewer for a model with fewer classes
    loss: float
    num_images: int
    num_failed: int
    seconds: float
    images_per_sec: float
    classes: List[str]
    class_indices: List[int]
    per_class_accuracy: Dict[str, Optional[float]]  # None: no readable image
    per_class_count: Dict[str, int]
    confusion_matrix: List[List[int]]
    failures: List[Dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        top5_name = "top-5" if self.topk == 5 else f"top-{self.topk}"
        failed = f", {self.num_failed} failed" if self.num_failed else ""
        return (f"top-1 {self.top1:.2f}%  {top5_name} {self.top5:.2f}%  loss {self.loss:.4f}  "
                f"({self.num_images} images{failed}, {self.images_per_sec:.1f} images/s)")


def validate(model, root: PathLike, batch_size: int = 64, workers: int = 0, forward: Optional[Forward] = None,
             progress: bool = True, image_size: Optional[int] = None,
             crop_pct: Optional[float] = None) -> ValidationResult:
    """Classify every image under ``root/<class>/`` and score the answers.

    Unreadable images are skipped and listed in ``failures``. ``forward`` replaces the model for the
    forward pass (any callable from an NCHW float tensor to logits); ``model`` still gives the input
    transform and the classes. ``image_size`` and ``crop_pct`` override the model's evaluation size and
    center-crop fraction (e.g. to score it at the size it will be deployed at).
    """
    folders = folder_classes(root)
    folder_to_class = map_folders_to_classes(folders, model)
    transform = build_eval_transform(model, image_size=image_size, crop_pct=crop_pct)
    dataset = LabelledImageFolder(root, transform=transform, class_to_idx=folder_to_class)
    if len(dataset) == 0:
        raise MixNetError(f"{root}: no image files in the class folders")
    num_classes = num_classes_of(model)
    k = min(5, num_classes)
    class_to_row = torch.full((num_classes,), len(folders), dtype=torch.long)  # "other" column by default
    class_to_row[torch.tensor([folder_to_class[f] for f in folders])] = torch.arange(len(folders))
    confusion = torch.zeros(len(folders), len(folders) + 1, dtype=torch.long)
    correct1 = correct_k = 0
    loss_sum = 0.0
    failures = []

    forward = forward or model
    device = model_device(forward)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    start = time.perf_counter()
    with eval_mode(forward), tqdm(total=len(dataset), unit="img", desc="validate", disable=not progress) as bar:
        for batch in loader:
            failures += [{"image": f.path, "error": f.problem} for f in batch.failures]  # as predict --json
            if len(batch.targets):
                logits = forward(batch.images.to(device)).float().cpu()
                targets = batch.targets
                loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
                top = logits.topk(k, dim=1).indices
                hit = top == targets[:, None]
                correct1 += hit[:, 0].sum().item()
                correct_k += hit.any(dim=1).sum().item()
                rows, cols = class_to_row[targets], class_to_row[top[:, 0]]
                confusion.index_put_((rows, cols), torch.ones_like(rows), accumulate=True)
            bar.update(len(batch.targets) + len(batch.failures))
            done = confusion.sum().item()
            if done:
                bar.set_postfix(top1=f"{100 * correct1 / done:.2f}")
    seconds = time.perf_counter() - start

    n = confusion.sum().item()
    if n == 0:
        raise MixNetError(f"{root}: none of the {len(dataset)} images could be read "
                          f"(first: {failures[0]['image']}: {failures[0]['error']})")
    counts = confusion.sum(dim=1)
    per_class = {f: (100.0 * confusion[i, i].item() / counts[i].item() if counts[i] else None)
                 for i, f in enumerate(folders)}
    return ValidationResult(
        top1=100.0 * correct1 / n, top5=100.0 * correct_k / n, topk=k, loss=loss_sum / n,
        num_images=n, num_failed=len(failures), seconds=seconds, images_per_sec=n / seconds if seconds else 0.0,
        classes=list(folders), class_indices=[folder_to_class[f] for f in folders],
        per_class_accuracy=per_class, per_class_count={f: counts[i].item() for i, f in enumerate(folders)},
        confusion_matrix=confusion.tolist(), failures=failures)
