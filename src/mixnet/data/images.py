"""Images in, tensors out: robust image loading, the evaluation transform, and datasets of image files.

Every loader here survives the real world: a truncated, empty or non-image file becomes an
``ImageLoadError`` naming the file (datasets turn it into a ``FailedSample`` that ``collate`` drops
and reports), and decompression bombs are refused before any pixel is decoded.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset, default_collate
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode

from ..errors import MixNetError, first_line
from ..fileio import PathLike

# Lower-case suffixes of the formats we load; matched case-insensitively.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# Pillow's own guard (about 89 Mpixel, a 9459 x 9459 image): larger images are refused, not decoded.
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS

# Transparent pixels are shown on white, as an image viewer on a white page would.
ALPHA_BACKGROUND = (255, 255, 255)

# The full scale of wide grey modes: the first that holds the image's brightest value. 16-bit PNG and TIFF
# span 16 bits; 32-bit integers hold 16-bit data (what older Pillow gives for 16-bit PNG) or span 31 bits;
# floats span 0-1 by convention, else 0-255 or 16 bits.
_WIDE_GREY_SCALES = {**dict.fromkeys(("I;16", "I;16L", "I;16B", "I;16N"), (65535.0,)),
                     "I": (65535.0, 2.0 ** 31 - 1), "F": (1.0, 255.0, 65535.0)}


class ImageLoadError(MixNetError):
    """An image file that cannot be used: missing, empty, truncated, not an image, or too large."""

    def __init__(self, path: PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


# ---------------------------------------------------------------------------------------------
# Loading


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB: alpha over white, 16-bit grey scaled down, CMYK converted."""
    if img.mode == "RGB":
        return img
    if img.mode in _WIDE_GREY_SCALES:
        # Pillow's own conversion clips at 255 (16-bit photos turn white, 0-1 floats black); scale instead.
        grey = np.nan_to_num(np.asarray(img, dtype=np.float64))
        peak = grey.max(initial=0.0)
        full = next((f for f in _WIDE_GREY_SCALES[img.mode] if peak <= f), peak)
        img = Image.fromarray(np.clip(np.rint(grey * (255.0 / full)), 0, 255).astype(np.uint8), mode="L")
        return img.convert("RGB")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: PathLike, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image file as RGB with its EXIF orientation applied (first frame of an animation).

    Raises ``ImageLoadError`` naming the file and the problem for a missing, empty, truncated or
    non-image file, and for images over ``max_pixels`` (decompression bombs), which are refused
    from the header alone.
    """
    path = Path(path)
    try:
        if path.is_dir():
            raise ImageLoadError(path, "is a directory, not an image file")
        if path.stat().st_size == 0:
            raise ImageLoadError(path, "empty file")
        with warnings.catch_warnings():
            # Pillow only warns between its limit and twice it; we refuse instead.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:  # reads the header only
                width, height = img.size
                if max_pixels is not None and width * height > max_pixels:
                    raise ImageLoadError(path, f"refused: {width}x{height} = {width * height:,} pixels is over "
                                               f"the limit of {max_pixels:,} (possible decompression bomb)")
                img.load()  # decodes now, so truncation and corrupt data surface here
                img = ImageOps.exif_transpose(img)
                return to_rgb(img)
    except ImageLoadError:
        raise
    except FileNotFoundError:
        raise ImageLoadError(path, "no such file") from None
    except PermissionError:
        raise ImageLoadError(path, "permission denied") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(path, f"refused: {e}") from None
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not an image, or a format that cannot be read") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError) as e:
        # Pillow's decoders report corrupt data with any of these.
        raise ImageLoadError(path, f"cannot decode image ({e})") from None


def is_image_file(path: PathLike) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def list_image_files(paths: Union[PathLike, Iterable[PathLike]], recursive: bool = True) -> List[Path]:
    """Expand files and directories into a list of image files, in the order given.

    A directory contributes its image files (by extension, case-insensitive; hidden entries skipped)
    sorted by path, descending into subdirectories when ``recursive``. A file named explicitly is
    kept whatever its extension, so that a bad file the user asked for is reported, not ignored.
    A path that does not exist raises ``MixNetError``.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: List[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = []
            walker = os.walk(p, followlinks=True) if recursive else [(str(p), [], os.listdir(p))]
            # Linked folders are followed once, and never one that holds the folder listed (a link to a
            # parent): that would be a loop, and would bring in the parent's other folders (other classes).
            root = os.path.realpath(p)
            seen = {root}

            def new_folder(path: str) -> bool:
                real = os.path.realpath(path)
                return real not in seen and os.path.commonpath([real, root]) != real

            for dirpath, dirnames, filenames in walker:
                dirnames[:] = [d for d in dirnames if not d.startswith(".") and new_folder(os.path.join(dirpath, d))]
                seen.update(os.path.realpath(os.path.join(dirpath, d)) for d in dirnames)
                found += [Path(dirpath, f) for f in filenames
                          if not f.startswith(".") and is_image_file(f) and os.path.isfile(os.path.join(dirpath, f))]
            files += sorted(found)
        elif p.exists():
            files.append(p)
        else:
            raise MixNetError(f"{p}: no such file or directory")
    return files


# ---------------------------------------------------------------------------------------------
# Evaluation transform


def _input_config(cfg: Any) -> Mapping[str, Any]:
    """A pretrained_cfg dict from a model, a ``PretrainedCfg`` dataclass or a mapping."""
    if hasattr(cfg, "pretrained_cfg"):
        cfg = cfg.pretrained_cfg
    if dataclasses.is_dataclass(cfg):
        cfg = dataclasses.asdict(cfg)
    if not isinstance(cfg, Mapping):
        raise TypeError(f"expected a model, a PretrainedCfg or a dict, got {type(cfg).__name__}")
    return cfg


def eval_resize_size(image_size: int, crop_pct: float) -> int:
    """Shorter side before the center crop: ``floor(224 / 0.875) = 256``."""
    return int(math.floor(image_size / crop_pct))


class LimitResizedArea:
    """Cut a very long, thin image down to its middle when resizing its shorter side to ``resize`` px
    would make more than ``max_pixels``.

    A 400,000 x 1 image (a few hundred bytes, far below the decompression-bomb limit) would otherwise
    become 80 million pixels, gigabytes, of which the center crop keeps a square. Only the middle (the
    short side, plus a margin wider than the resampling filter reaches) can reach the crop. Images whose
    resized form fits, every photo included, pass unchanged, so the transform stays exactly timm's.
    """

    def __init__(self, resize: int, max_pixels: int = 16_000_000):
        self.resize, self.max_pixels = resize, max_pixels

    def __call__(self, img: Image.Image) -> Image.Image:
        width, height = img.size
        short, long = min(width, height), max(width, height)
        keep = 3 * short + 32
        if self.resize * self.resize * long / short <= self.max_pixels or long <= keep:
            return img
        start = (long - keep) // 2
        return img.crop((start, 0, start + keep, height) if width > height else (0, start, width, start + keep))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(resize={self.resize}, max_pixels={self.max_pixels})"


def build_eval_transform(cfg: Any, *, image_size: Optional[int] = None, crop_pct: Optional[float] = None,
                         interpolation: Optional[str] = None, mean: Optional[Sequence[float]] = None,
                         std: Optional[Sequence[float]] = None) -> Callable[[Image.Image], torch.Tensor]:
    """The reference evaluation transform for an RGB PIL image, from a model's ``pretrained_cfg``.

    Resize the shorter side to ``floor(size / crop_pct)`` (bicubic by default), center-crop ``size``,
    scale to [0, 1] and normalize with the config's mean and std. ``cfg`` may be a model, a
    ``PretrainedCfg`` or a dict; keyword arguments override single fields (``image_size``: the side of
    the square crop, in place of the config's ``input_size``).
    """
    cfg = _input_config(cfg)
    _, height, width = cfg["input_size"]
    if image_size is not None:
        if image_size < 1:
            raise MixNetError(f"image size must be at least 1 pixel, got {image_size}")
        height = width = image_size
    if height != width:
        raise MixNetError(f"non-square input size {height}x{width} is not supported by the evaluation transform")
    crop_pct = cfg.get("crop_pct", 0.875) if crop_pct is None else crop_pct
    if not 0 < crop_pct <= 1:
        raise MixNetError(f"crop_pct must be in (0, 1], the fraction of the resized photo kept, got {crop_pct}")
    interpolation = interpolation or cfg.get("interpolation", "bicubic")
    try:
        mode = InterpolationMode(interpolation)
    except ValueError:
        raise MixNetError(f"unknown interpolation {interpolation!r}; use one of "
                          f"{', '.join(m.value for m in InterpolationMode)}") from None
    return transforms.Compose([
        LimitResizedArea(eval_resize_size(height, crop_pct)),
        transforms.Resize(eval_resize_size(height, crop_pct), interpolation=mode),
        transforms.CenterCrop(height),
        transforms.ToTensor(),
        transforms.Normalize(mean=torch.tensor(mean or cfg["mean"]), std=torch.tensor(std or cfg["std"])),
    ])


# ---------------------------------------------------------------------------------------------
# Datasets that report bad files instead of crashing


class FailedSample(NamedTuple):
    """Returned by a dataset in place of a sample whose file could not be loaded."""

    path: str
    problem: str
    index: int = -1  # position in the dataset


class Batch(NamedTuple):
    """What ``collate`` returns: the good samples stacked, and the failed ones by path."""

    images: torch.Tensor
    targets: torch.Tensor
    failures: List[FailedSample]


def collate(samples: Sequence[Any]) -> Batch:
    """Stack ``(image, target)`` samples, dropping ``FailedSample`` entries into ``Batch.failures``.

    When every sample failed, ``images`` and ``targets`` are empty tensors.
    """
    failures = [s for s in samples if isinstance(s, FailedSample)]
    good = [s for s in samples if not isinstance(s, FailedSample)]
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), failures)
    images, targets = default_collate(good)
    return Batch(images, targets, failures)


def _load_or_fail(source: Union[PathLike, Image.Image], transform: Optional[Callable], index: int) -> Any:
    """The transformed image, or a ``FailedSample`` when the image cannot be loaded or preprocessed."""
    name = f"<image {index}>" if isinstance(source, Image.Image) else str(source)
    if isinstance(source, Image.Image):
        try:
            # EXIF orientation applied as load_image applies it to files, so that an opened photo gets the
            # answer its file gets (an image already transposed has no orientation tag left: unchanged).
            img = to_rgb(ImageOps.exif_transpose(source))
            img.load()
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError) as e:
            # a truncated or undecodable image opened by the caller (Pillow reports these with any of them)
            return FailedSample(name, first_line(e), index)
    else:
        try:
            img = load_image(source)
        except ImageLoadError as e:
            return FailedSample(e.path, e.problem, index)
    if transform is None:
        return img
    try:
        return transform(img)
    except Exception as e:  # noqa: BLE001 - one odd image (a shape the resize cannot make) fails alone
        return FailedSample(name, f"cannot be preprocessed: {first_line(e)}", index)


def folder_classes(root: PathLike) -> List[str]:
    """The class folder names of an ImageFolder-layout directory, sorted (hidden folders skipped)."""
    root = Path(root)
    if not root.is_dir():
        raise MixNetError(f"{root}: no such directory")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise MixNetError(f"{root}: no class folders found (expected {root}/<class>/<image files>)")
    return classes


class LabelledImageFolder(datasets.DatasetFolder):
    """An ImageFolder-layout directory (``root/<class>/.../<image>``) whose bad files don't crash.

    ``class_to_idx`` maps folder names to target indices (e.g. onto a model's classes); by default
    the sorted folder names get indices 0, 1, ... Folders missing from ``class_to_idx`` are skipped.
    ``dataset[i]`` is ``(transform(image), target)``, or a ``FailedSample`` when the file cannot be
    loaded; use ``collate`` as the DataLoader's ``collate_fn`` to drop and report those.
    """

    def __init__(self, root: PathLike, transform: Optional[Callable] = None,
                 class_to_idx: Optional[Mapping[str, int]] = None):
        self._given_class_to_idx = dict(class_to_idx) if class_to_idx is not None else None
        super().__init__(str(root), loader=load_image, extensions=IMAGE_EXTENSIONS, transform=transform,
                         allow_empty=True)

    def find_classes(self, directory: PathLike) -> Tuple[List[str], dict]:
        classes = folder_classes(directory)
        if self._given_class_to_idx is None:
            return classes, {c: i for i, c in enumerate(classes)}
        mapping = {c: i for c, i in self._given_class_to_idx.items() if c in classes}
        return [c for c in classes if c in mapping], mapping

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        # Each class folder's images as predict lists them: hidden entries (e.g. macOS "._x.jpg") skipped,
        # which torchvision keeps, and linked folders followed once, never back up to a parent, where
        # torchvision would loop and label the other classes' photos as this one.
        return [(str(path), class_to_idx[c]) for c in sorted(class_to_idx)
                for path in list_image_files(Path(directory, c))]

    def __getitem__(self, index: int) -> Any:
        path, target = self.samples[index]
        sample = _load_or_fail(path, self.transform, index)
        if isinstance(sample, FailedSample):
            return sample
        if self.target_transform is not None:
            target = self.target_transform(target)
        return sample, target


class ImageList(Dataset):
    """Image files (or in-memory PIL images) as a dataset: ``dataset[i] = (transform(image), i)``.

    A file that cannot be loaded gives a ``FailedSample``; pair with ``collate``.
    """

    def __init__(self, sources: Sequence[Union[PathLike, Image.Image]], transform: Optional[Callable] = None):
        self.sources = list(sources)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> Any:
        sample = _load_or_fail(self.sources[index], self.transform, index)
        return sample if isinstance(sample, FailedSample) else (sample, index)


# ---------------------------------------------------------------------------------------------
# Training transforms (owned by the training module's author) go below.


class RandAugmentMstd(transforms.RandAugment):
    """RandAugment whose magnitude (0..10, as in "rand-m9-mstd0.5") is drawn per image from
    ``normal(magnitude, magnitude_std)`` clipped to [0, 10]; ``magnitude_std=0`` is plain RandAugment."""

    _BINS = 101  # magnitudes on a 0..10 scale in steps of 0.1

    def __init__(self, num_ops: int = 2, magnitude: float = 9.0, magnitude_std: float = 0.0,
                 interpolation: InterpolationMode = InterpolationMode.BILINEAR, fill=None):
        if not 0.0 <= magnitude <= 10.0:
            raise ValueError(f"RandAugment magnitude must be in [0, 10], got {magnitude}")
        super().__init__(num_ops=num_ops, magnitude=round(magnitude * 10), num_magnitude_bins=self._BINS,
                         interpolation=interpolation, fill=fill)
        self.mean_magnitude = magnitude
        self.magnitude_std = magnitude_std

    def forward(self, img):
        if self.magnitude_std > 0:
            m = float(torch.empty(()).normal_(self.mean_magnitude, self.magnitude_std).clamp_(0.0, 10.0))
            self.magnitude = round(m * 10)
        return super().forward(img)


def build_train_transform(size: int, *, scale: Sequence[float] = (0.08, 1.0),
                          ratio: Sequence[float] = (3 / 4, 4 / 3), hflip: float = 0.5,
                          randaugment_ops: int = 0, randaugment_magnitude: float = 9.0,
                          randaugment_std: float = 0.0, random_erasing: float = 0.0,
                          interpolation: str = "bicubic", mean: Sequence[float] = (0.485, 0.456, 0.406),
                          std: Sequence[float] = (0.229, 0.224, 0.225)) -> Callable[[Image.Image], torch.Tensor]:
    """The training transform: random-resized-crop to ``size``, horizontal flip, optional RandAugment
    (``randaugment_ops`` > 0), normalisation, optional random erasing with per-pixel normal noise.

    All randomness comes from torch's global generator, so a seeded generator reproduces the sample.
    """
    mode = InterpolationMode(interpolation)
    steps: List[Callable] = [transforms.RandomResizedCrop(size, scale=tuple(scale), ratio=tuple(ratio),
                                                          interpolation=mode)]
    if hflip > 0:
        steps.append(transforms.RandomHorizontalFlip(hflip))
    if randaugment_ops > 0:
        steps.append(RandAugmentMstd(randaugment_ops, randaugment_magnitude, randaugment_std,
                                     interpolation=InterpolationMode.BILINEAR,
                                     fill=[round(255 * m) for m in mean]))
    steps += [transforms.ToTensor(), transforms.Normalize(mean=torch.tensor(mean), std=torch.tensor(std))]
    if random_erasing > 0:
        steps.append(transforms.RandomErasing(p=random_erasing, value="random"))
    return transforms.Compose(steps)
