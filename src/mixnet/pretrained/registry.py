"""The registry of published MixNet weights, as data: tag, where each file lives, its digest, its figures.

A tag is ``"<architecture>.<training recipe>"``, as timm names weights. ``DEFAULT_TAG`` ships inside the
package (``pretrained/files/``); the others are fetched on first use (``pretrained.download``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from ..errors import MixNetError
from ..models.architectures import PretrainedCfg

RELEASE_BASE = "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights"

SOURCES = ("auto", "github", "hf")


@dataclass(frozen=True)
class WeightsEntry:
    """One published checkpoint: where it lives, how to verify it, and its model card figures."""

    tag: str  # "<architecture>.<training recipe>", as timm names it
    sha256: Optional[str]  # the full digest or its leading hex digits (release files carry 8 in their name)
    url: Optional[str] = None  # GitHub release file
    hf_hub_id: Optional[str] = None  # Hugging Face hub repository holding model.safetensors
    # The full sha256 of that model.safetensors. None: no verified digest is known, so the hub copy is
    # never used (the hub names files by their own hash, which proves integrity, not that they are ours).
    hf_sha256: Optional[str] = None
    package_file: Optional[str] = None  # file under mixnet/pretrained/files/, its config.json beside it as <stem>.json
    file_size: Optional[int] = None  # bytes of the release file
    top1: Optional[float] = None  # ImageNet-1k validation accuracy, %
    top5: Optional[float] = None
    imagenet_classes: bool = True  # False: class names (and preprocessing) come from the shipped config
    pretrained_cfg: PretrainedCfg = field(default_factory=PretrainedCfg)
    license: str = "apache-2.0"

    @property
    def architecture(self) -> str:
        return self.tag.split(".", 1)[0]

    @property
    def filename(self) -> str:
        return (self.url or self.package_file or "").rsplit("/", 1)[-1]


def _release(tag: str, file: str, size: Optional[int], top1: float, top5: float) -> WeightsEntry:
    return WeightsEntry(tag, sha256=file.rsplit("-", 1)[1].split(".")[0], url=f"{RELEASE_BASE}/{file}",
                        hf_hub_id=f"timm/{tag}", file_size=size, top1=top1, top5=top5)


DEFAULT_SHA256 = "a6c83addb45aeada7e0171d6139d6f68638f30f2d3e2f871b3f47423b809c219"

WEIGHTS: Dict[str, WeightsEntry] = {e.tag: e for e in (
    # No full digest of the hub's model.safetensors copies could be verified here (no network to the hub
    # while this was written), so none is registered and these tags load from the GitHub release only.
    _release("mixnet_s.ft_in1k", "mixnet_s-a907afbc.pth", 16_727_982, 75.99, 92.79),
    _release("mixnet_m.ft_in1k", "mixnet_m-4647fc68.pth", 20_298_347, 77.27, 93.42),
    _release("mixnet_l.ft_in1k", "mixnet_l-5a9a2ed8.pth", 29_608_232, 78.98, 94.18),
    _release("mixnet_xl.ra_in1k", "mixnet_xl_ra-aac3c00c.pth", 48_001_170, 80.47, 94.93),
    _release("tf_mixnet_s.in1k", "tf_mixnet_s-89d3354b.pth", None, 75.66, 92.63),
    _release("tf_mixnet_m.in1k", "tf_mixnet_m-0f4d8805.pth", None, 76.95, 93.16),
    _release("tf_mixnet_l.in1k", "tf_mixnet_l-6c92e0c8.pth", None, 78.77, 94.00),
    # Trained here from scratch on Imagenette (10 classes); made by scripts/package_default_model.py, which
    # prints the sha256 to put here. Figures: Imagenette val top-1/top-5 (`mixnet validate`), not ImageNet.
    WeightsEntry("mixnet_s.imagenette", sha256=DEFAULT_SHA256, package_file="mixnet_s.imagenette.safetensors",
                 top1=91.18, top5=98.93, imagenet_classes=False,
                 license="non-commercial research (ImageNet images)"),
)}

DEFAULT_TAG = "mixnet_s.imagenette"


def list_pretrained(architecture: Optional[str] = None) -> List[str]:
    """Registered tags, optionally only those of one architecture."""
    return [t for t, e in WEIGHTS.items() if architecture in (None, e.architecture)]


def default_tag(architecture: str) -> str:
    """The tag ``pretrained=True`` loads for ``architecture`` (the first published one)."""
    tags = [t for t in list_pretrained(architecture) if WEIGHTS[t].url]
    if not tags:
        have = sorted({e.architecture for e in WEIGHTS.values() if e.url})
        raise MixNetError(f"no published weights for {architecture} (published: {', '.join(have)})")
    return tags[0]

