"""Classify images: top-k classes with names and probabilities, from Python or ``mixnet predict``.

The network that runs the forward pass can be swapped: ``forward`` is any callable taking an NCHW
float tensor and returning logits (an optimized module, an ONNX Runtime session wrapper, ...), while
``model`` still supplies the input config and class names.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence, Union

import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.images import ImageList, build_eval_transform, collate, list_image_files
from ..errors import MixNetError
from ..fileio import PathLike
from ..data.imagenet import imagenet_class_names

Forward = Callable[[Tensor], Tensor]
ImageSource = Union[PathLike, Image.Image]


def num_classes_of(model) -> int:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("num_classes"):
        return int(cfg["num_classes"])
    return int(model.num_classes)


def class_names(model) -> List[str]:
    """The model's class names: its ``pretrained_cfg["class_names"]``, else the ImageNet names for a
    1000-class model, else ``class_<i>``."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    n = num_classes_of(model)
    names = cfg.get("class_names")
    if names:
        if len(names) != n:
            raise MixNetError(f"the model's config lists {len(names)} class names for {n} classes")
        return list(names)
    if n == 1000:
        return imagenet_class_names()
    return [f"class_{i}" for i in range(n)]


def resolve_model(model_name: Optional[str] = None, weights: Optional[str] = None) -> nn.Module:
    """The model for ``predict`` / ``validate`` from ``--model`` (an architecture or a weights tag) and
    ``--weights`` (a file, a folder or a tag), in eval mode; with neither, ``mixnet.pretrained.registry.DEFAULT_TAG``.
    An architecture alone gets its published weights."""
    from ..factory import load_model
    from ..pretrained.registry import DEFAULT_TAG

    if weights is None:
        return load_model(model_name or DEFAULT_TAG).eval()
    architecture = model_name.split(".", 1)[0] if model_name else None
    return load_model(weights, architecture=architecture).eval()


@dataclass
class ClassScore:
    index: int
    name: str
    probability: float


@dataclass
class Prediction:
    """The top-k classes for one image, or the reason it could not be classified."""

    source: str
    top: List[ClassScore] = field(default_factory=list)
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        d = {"image": self.source}
        if self.ok:
            d["top"] = [asdict(s) for s in self.top]
        else:
            d["error"] = self.error
        return d


def model_device(model) -> torch.device:
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model) -> Iterator[None]:
    """Eval mode (and no autograd) for the duration, the module's training flag restored afterwards."""
    was_training = isinstance(model, nn.Module) and model.training
    if was_training:
        model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        if was_training:
            model.train()


def expand_sources(images: Union[ImageSource, Sequence[ImageSource]]) -> List[ImageSource]:
    """A single path or image, or a sequence of them, with directories expanded to their image files."""
    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    sources: List[ImageSource] = []
    for item in images:
        sources += [item] if isinstance(item, Image.Image) else list_image_files([item])
    return sources


def iter_predictions(model, images: Union[ImageSource, Sequence[ImageSource]], topk: int = 5,
                     batch_size: int = 32, workers: int = 0, forward: Optional[Forward] = None,
                     progress: bool = False, image_size: Optional[int] = None,
                     crop_pct: Optional[float] = None) -> Iterator[Prediction]:
    """Like ``predict`` but yields predictions batch by batch, in input order."""
    if topk < 1:
        raise MixNetError(f"topk must be at least 1, got {topk}")
    sources = expand_sources(images)
    if not sources:
        raise MixNetError("no images to classify")
    names = class_names(model)
    k = min(topk, len(names))
    forward = forward or model
    device = model_device(forward)
    labels = [str(s) if not isinstance(s, Image.Image) else f"<image {i}>" for i, s in enumerate(sources)]
    transform = build_eval_transform(model, image_size=image_size, crop_pct=crop_pct)
    loader = DataLoader(ImageList(sources, transform), batch_size=batch_size, num_workers=workers, collate_fn=collate)
    with eval_mode(forward), tqdm(total=len(sources), unit="img", disable=not progress) as bar:
        for batch in loader:
            results = {f.index: Prediction(labels[f.index], error=f.problem) for f in batch.failures}
            if len(batch.targets):
                logits = forward(batch.images.to(device))
                probs, indices = torch.softmax(logits.float(), dim=1).topk(k, dim=1)
                for i, p_row, c_row in zip(batch.targets.tolist(), probs.tolist(), indices.tolist()):
                    results[i] = Prediction(labels[i], [ClassScore(c, names[c], p) for c, p in zip(c_row, p_row)])
            bar.update(len(results))
            yield from (results[i] for i in sorted(results))


def predict(model, images: Union[ImageSource, Sequence[ImageSource]], topk: int = 5, batch_size: int = 32,
            workers: int = 0, forward: Optional[Forward] = None, progress: bool = False,
            image_size: Optional[int] = None, crop_pct: Optional[float] = None) -> List[Prediction]:
    """Classify images with ``model``: one ``Prediction`` per image, in order.

    ``images`` is a path, a directory (searched recursively), a PIL image, or a sequence of these.
    An image that cannot be loaded gives a ``Prediction`` whose ``error`` says why, not an
    exception. ``forward`` replaces the model for the forward pass (any callable from an NCHW float
    tensor to logits); ``model`` still gives the input transform and class names. ``image_size`` and
    ``crop_pct`` override the model's evaluation size and center-crop fraction.
    """
    return list(iter_predictions(model, images, topk, batch_size, workers, forward, progress, image_size, crop_pct))
