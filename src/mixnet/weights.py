"""Pretrained weights: the registry of published checkpoints, safe loading, and the hub folder format.

Where weights come from (``spec`` in ``load_model``, ``pretrained`` in ``create_model``):

- a tag of the registry ``WEIGHTS``, e.g. ``"mixnet_l.ft_in1k"``: fetched from the cache, else the GitHub
  release URL, else the Hugging Face hub (see ``hub`` for cache and mirrors), always checked against
  the registered sha256; ``DEFAULT_TAG`` (``"mixnet_s.imagenette"``) ships inside the package;
- an architecture name, e.g. ``"mixnet_l"`` (``pretrained=True`` in ``create_model``): its default tag,
  the first registered for it;
- a weights file: timm-style ``.pth``/``.bin`` (a bare state dict, or a training checkpoint holding
  ``state_dict_ema``/``model_ema``/``state_dict``/``model``, EMA preferred; ``module.`` and
  ``_orig_mod.`` prefixes stripped) or ``.safetensors``; read with ``torch.load(weights_only=True)``,
  so a file whose pickle would run code is refused;
- a hub folder as timm and ``save_pretrained`` write it: ``config.json`` + ``model.safetensors`` (or
  ``pytorch_model.bin``); its architecture, classes, class names and preprocessing come from the config;
- a training run directory holding such a folder named ``final`` (``RUN_MODEL_DIRNAME``).

Adapting on load: when the model's ``num_classes`` differs from the checkpoint's, the classifier is left
freshly initialised (with a warning: a fine-tuning start); when ``in_chans`` differs, the stem is
adapted (summed for 1 channel, tiled and rescaled for more).

After weights are loaded, ``model.pretrained_cfg`` holds the preprocessing (input_size, crop_pct,
interpolation, mean, std) and, whenever the classes of the loaded classifier are known,
``class_names`` (the ImageNet-1k names for the published tags, the saved names for a fine-tuned model),
plus ``architecture``, ``tag`` (registry tags only) and ``file`` (what was read).

The built-in ``mixnet_s.imagenette`` weights are two package files, ``weights/mixnet_s.imagenette.safetensors``
and ``weights/mixnet_s.imagenette.json`` (the ``config.json`` that ``save_pretrained`` writes), with the
sha256 of the ``.safetensors`` file registered below.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import hub
from .configs import MODELS, MixNetConfig, PretrainedCfg
from .errors import MixNetError
from .fileio import atomic_write
from .imagenet import imagenet_class_names

PathLike = Union[str, "os.PathLike[str]"]

RELEASE_BASE = "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights"
HUB_CONFIG = "config.json"
HUB_SAFETENSORS = "model.safetensors"
HUB_PYTORCH = "pytorch_model.bin"
RUN_MODEL_DIRNAME = "final"
SOURCES = ("auto", "github", "hf")


@dataclass(frozen=True)
class WeightsEntry:
    """One published checkpoint: where it lives, how to verify it, and its model card figures."""

    tag: str  # "<architecture>.<training recipe>", as timm names it
    sha256: Optional[str]  # the full digest or its leading hex digits (release files carry 8 in their name)
    url: Optional[str] = None  # GitHub release file
    hf_hub_id: Optional[str] = None  # Hugging Face hub repository holding model.safetensors
    package_file: Optional[str] = None  # file under mixnet/weights/, its config.json beside it as <stem>.json
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


@dataclass
class Checkpoint:
    """Weights read from somewhere, with what is known about them."""

    state_dict: Dict[str, Tensor]
    file: str
    architecture: Optional[str] = None
    tag: Optional[str] = None
    class_names: Optional[List[str]] = None
    preprocess: Dict[str, object] = field(default_factory=dict)  # PretrainedCfg fields
    architecture_args: Dict[str, object] = field(default_factory=dict)  # MixNetConfig overrides

    @property
    def num_classes(self) -> int:
        weight = self.state_dict.get("classifier.weight")
        return 0 if weight is None else weight.shape[0]

    @property
    def in_chans(self) -> int:
        weight = self.state_dict.get("conv_stem.weight")
        return 3 if weight is None else weight.shape[1]


# ---------------------------------------------------------------------------------------------- reading


def read_state_dict(path: PathLike, use_ema: bool = True) -> Dict[str, Tensor]:
    """The tensors of a ``.safetensors``, ``.pth`` or ``.bin`` file, never unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise MixNetError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise MixNetError(f"{path}: not a readable safetensors file (truncated or corrupt: "
                              f"{_first_line(e)})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise MixNetError(f"{path}: refused: the file's pickle holds objects other than tensors "
                              f"(code could run); only plain weights are loaded") from None
        raise MixNetError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt: "
                          f"{_first_line(e)})") from None
    return _unwrap_checkpoint(obj, path, use_ema)


def _unwrap_checkpoint(obj, path: Path, use_ema: bool) -> Dict[str, Tensor]:
    if isinstance(obj, dict):
        keys = ("state_dict_ema", "model_ema", "state_dict", "model") if use_ema else ("state_dict", "model")
        for key in keys:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise MixNetError(f"{path}: holds no state dict (expected tensors by name, or a training "
                          f"checkpoint with state_dict / state_dict_ema / model)")
    return {_strip_prefixes(k): v for k, v in obj.items()}


def _strip_prefixes(key: str) -> str:
    # DistributedDataParallel adds "module.", torch.compile "_orig_mod."
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def read_hub_folder(folder: PathLike, config_file: Optional[PathLike] = None,
                    weights_file: Optional[PathLike] = None) -> Checkpoint:
    """A hub folder (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``)."""
    folder = Path(folder)
    config_file = Path(config_file) if config_file else folder / HUB_CONFIG
    if weights_file is None:
        for name in (HUB_SAFETENSORS, HUB_PYTORCH):
            if (folder / name).is_file():
                weights_file = folder / name
                break
        else:
            raise MixNetError(f"{folder}: hub folder without {HUB_SAFETENSORS} or {HUB_PYTORCH}")
    config = _read_config(config_file)
    architecture = str(config.get("architecture", "")).split(".", 1)[0] or None
    if architecture and architecture not in MODELS:
        raise MixNetError(f"{config_file}: architecture {architecture!r} is not a MixNet "
                          f"(known: {', '.join(MODELS)})")
    cfg = config.get("pretrained_cfg") or {}
    names = config.get("label_names", cfg.get("label_names"))
    if isinstance(names, dict):  # index -> name, as timm allows
        names = [names[k] for k in sorted(names, key=int)]
    fields = {f.name for f in dataclasses.fields(PretrainedCfg)}
    preprocess = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items() if k in fields}
    architecture_args = config.get(ARCHITECTURE_ARGS, {})
    unknown = set(architecture_args) - set(_scalar_architecture_fields())
    if unknown:
        raise MixNetError(f"{config_file}: unknown {ARCHITECTURE_ARGS} {', '.join(sorted(unknown))}")
    state_dict = read_state_dict(weights_file)
    checkpoint = Checkpoint(state_dict, str(weights_file), architecture,
                            class_names=list(names) if names else None, preprocess=preprocess,
                            architecture_args=architecture_args)
    if checkpoint.class_names and len(checkpoint.class_names) != checkpoint.num_classes:
        raise MixNetError(f"{config_file}: {len(checkpoint.class_names)} label_names for a classifier "
                          f"of {checkpoint.num_classes} classes")
    return checkpoint


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MixNetError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MixNetError(f"{path}: not a readable JSON config ({_first_line(e)})") from None
    if not isinstance(config, dict):
        raise MixNetError(f"{path}: not a JSON object")
    return config


def read_checkpoint(spec: Union[str, PathLike], *, cache_dir: Optional[PathLike] = None,
                    url_base: Optional[str] = None, source: str = "auto",
                    progress: bool = True) -> Checkpoint:
    """Weights named by a registry tag, an architecture (its default tag), a file, a hub folder or a
    run directory (see the module docstring)."""
    spec = str(spec)
    if spec in MODELS:
        spec = default_tag(spec)
    if spec in WEIGHTS:
        return _read_registered(WEIGHTS[spec], cache_dir, url_base, source, progress)
    path = Path(spec).expanduser()
    if path.is_dir():
        # A run directory has a config.json of its own (the training configuration): check it first.
        if (path / RUN_MODEL_DIRNAME / HUB_CONFIG).is_file():
            return read_hub_folder(path / RUN_MODEL_DIRNAME)
        if (path / HUB_CONFIG).is_file():
            return read_hub_folder(path)
        raise MixNetError(f"{path}: a folder without {HUB_CONFIG} (nor {RUN_MODEL_DIRNAME}/{HUB_CONFIG}): "
                          f"not a hub folder or training run")
    if path.is_file():
        config = path.with_name(HUB_CONFIG)
        if path.name in (HUB_SAFETENSORS, HUB_PYTORCH) and config.is_file():
            return read_hub_folder(path.parent, weights_file=path)
        return Checkpoint(read_state_dict(path), str(path))
    raise MixNetError(f"{spec}: not a model name, a weights tag ({', '.join(WEIGHTS)}), "
                      f"a file or a folder")


def _read_registered(entry: WeightsEntry, cache_dir, url_base, source, progress) -> Checkpoint:
    if entry.package_file:
        weights_file, config_file = _package_files(entry)
        checkpoint = read_hub_folder(weights_file.parent, config_file=config_file, weights_file=weights_file)
    else:
        path = fetch(entry.tag, cache_dir, url_base, source, progress)
        checkpoint = Checkpoint(read_state_dict(path), str(path))
        checkpoint.preprocess = {k: v for k, v in entry.pretrained_cfg.to_dict().items()
                                 if k not in ("num_classes",)}
    checkpoint.architecture, checkpoint.tag = entry.architecture, entry.tag
    if entry.imagenet_classes and checkpoint.num_classes == 1000:
        checkpoint.class_names = imagenet_class_names()
    return checkpoint


def _package_files(entry: WeightsEntry):
    folder = Path(str(resources.files(__package__).joinpath("weights")))
    weights_file = folder / entry.package_file
    config_file = weights_file.with_suffix(".json")
    missing = [str(p) for p in (weights_file, config_file) if not p.is_file()]
    if missing:
        raise MixNetError(f"{entry.tag}: the built-in weights are not in this installation "
                          f"({', '.join(missing)} missing)")
    if not entry.sha256:
        raise MixNetError(f"{entry.tag}: {weights_file} has no sha256 registered in mixnet.weights.WEIGHTS; "
                          f"refusing to load unverified weights")
    hub.check_sha256(weights_file, entry.sha256)
    return weights_file, config_file


def fetch(tag: str, cache_dir: Optional[PathLike] = None, url_base: Optional[str] = None,
          source: str = "auto", progress: bool = True) -> Path:
    """The verified local file of a published tag: from the cache, else downloaded.

    ``source``: "github" (the release URL), "hf" (the Hugging Face hub), or "auto": GitHub first, then
    the hub when GitHub cannot be reached or lacks the file (never after a hash mismatch).
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
    entry = WEIGHTS[tag]
    dest = hub.default_cache_dir(cache_dir) / entry.filename
    url = hub.release_url(entry.url, url_base)
    if source != "hf" and dest.is_file():
        try:
            hub.check_sha256(dest, entry.sha256)
        except MixNetError as e:
            raise MixNetError(f"{e}; delete the cached file to download it again") from None
        return dest
    use_hub = source == "hf" or (source == "auto" and entry.hf_hub_id)
    if use_hub and source == "auto":  # the hub's cache counts as a cache too
        try:
            return hub.hf_download(entry.hf_hub_id, HUB_SAFETENSORS, cache_dir, local_only=True)
        except hub.DownloadError:
            pass
    failures = []
    if hub.is_offline():
        failures.append("offline (HF_HUB_OFFLINE is set)")
    else:
        if source != "hf":
            try:
                return hub.download(url, dest, entry.sha256, progress)
            except hub.DownloadError as e:
                if not (use_hub and e.retry_elsewhere):
                    raise
                failures.append(str(e))
        if use_hub:
            try:
                return hub.hf_download(entry.hf_hub_id, HUB_SAFETENSORS, cache_dir)
            except hub.DownloadError as e:
                if not e.retry_elsewhere:
                    raise
                failures.append(str(e))
    raise MixNetError(f"{entry.tag}: weights file {entry.filename} is not cached and could not be "
                      f"downloaded ({'; '.join(failures)}); fetch {url} yourself and put it at {dest} "
                      f"(or point ${hub.CACHE_DIR_ENV} / cache_dir at the folder holding it)")


# ---------------------------------------------------------------------------------------------- loading


def adapt_stem(weight: Tensor, in_chans: int) -> Tensor:
    """Stem conv weights for ``in_chans`` input channels: summed for 1, tiled and rescaled for more,
    so a constant image gives the same response whatever the channel count."""
    src = weight.shape[1]
    if in_chans == src:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-in_chans // src)
    return weight.repeat(1, repeats, 1, 1)[:, :in_chans] * (src / in_chans)


def apply_checkpoint(model: nn.Module, checkpoint: Checkpoint) -> nn.Module:
    """Load ``checkpoint`` into ``model`` (adapting classifier and stem) and record its configuration."""
    model_name = getattr(model, "model_name", None)
    if checkpoint.architecture and model_name and checkpoint.architecture != model_name:
        raise MixNetError(f"{checkpoint.file}: holds {checkpoint.architecture} weights, not {model_name}")
    state_dict = dict(checkpoint.state_dict)
    in_chans = getattr(model, "in_chans", 3)
    if "conv_stem.weight" in state_dict:
        state_dict["conv_stem.weight"] = adapt_stem(state_dict["conv_stem.weight"], in_chans)
    expected = model.state_dict()
    num_classes = getattr(model, "num_classes", None)  # None: a features_only model, no head at all
    head_prefixes = ("classifier.",) if num_classes is not None else ("classifier.", "conv_head.", "bn2.")
    classes_kept = num_classes is not None and num_classes == checkpoint.num_classes
    if not classes_kept:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(head_prefixes)}
        if num_classes:
            warnings.warn(f"{checkpoint.file}: classifier not loaded ({checkpoint.num_classes} classes in "
                          f"the file, {num_classes} in the model); it starts freshly initialised",
                          stacklevel=3)
    _check_fits(state_dict, expected, checkpoint, model_name, head_prefixes if not classes_kept else ())
    model.load_state_dict(state_dict, strict=False)
    cfg = {**model.pretrained_cfg, **checkpoint.preprocess}
    cfg["input_size"] = (in_chans, *tuple(cfg["input_size"])[1:])
    cfg["num_classes"] = num_classes or 0
    cfg.update(architecture=checkpoint.architecture or model_name, tag=checkpoint.tag, file=checkpoint.file)
    cfg.pop("class_names", None)
    if classes_kept and checkpoint.class_names:
        cfg["class_names"] = list(checkpoint.class_names)
    model.pretrained_cfg = cfg
    return model


def _check_fits(state_dict: Dict[str, Tensor], expected: Dict[str, Tensor], checkpoint: Checkpoint,
                model_name: Optional[str], skipped: Sequence[str]) -> None:
    # Old checkpoints lack BatchNorm's num_batches_tracked counters; they carry no weights.
    missing = [k for k in expected if k not in state_dict and not k.startswith(tuple(skipped))
               and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [k for k in state_dict if k in expected and state_dict[k].shape != expected[k].shape]
    if not (missing or unexpected or wrong):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} weights missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if wrong:
        k = wrong[0]
        problems.append(f"{len(wrong)} of the wrong shape (e.g. {k}: {tuple(state_dict[k].shape)} in the "
                        f"file, {tuple(expected[k].shape)} in the model)")
    guesses = guess_architectures(checkpoint.state_dict)
    hint = f"; it looks like {' or '.join(guesses)} weights" if guesses else ""
    raise MixNetError(f"{checkpoint.file}: does not fit {model_name or 'this model'}: "
                      f"{', '.join(problems)}{hint}")


def guess_architectures(state_dict: Dict[str, Tensor]) -> List[str]:
    """Registered architectures whose weights have exactly these names and shapes (classifier aside).

    The tf_ ports share their twin's shapes, so both are returned for those."""
    from .model import create_model

    shapes = {k: tuple(v.shape) for k, v in state_dict.items()
              if not k.startswith("classifier.") and not k.endswith("num_batches_tracked")}
    in_chans = shapes.get("conv_stem.weight", (0, 3))[1]
    matches = []
    with torch.device("meta"):  # shapes only: no memory, no init cost
        for name in MODELS:
            reference = create_model(name, num_classes=0, in_chans=in_chans).state_dict()
            if shapes == {k: tuple(v.shape) for k, v in reference.items()
                          if not k.endswith("num_batches_tracked")}:
                matches.append(name)
    return matches


def load_model(spec: Union[str, PathLike], *, architecture: Optional[str] = None,
               num_classes: Optional[int] = None, in_chans: Optional[int] = None,
               cache_dir: Optional[PathLike] = None, url_base: Optional[str] = None, source: str = "auto",
               progress: bool = True, **create_kwargs) -> nn.Module:
    """A model with weights, from a tag, an architecture name (its published weights), a file, a hub
    folder or a training run directory. The architecture comes from the registry or the saved config,
    else ``architecture``, else the weights' shapes; classes and input channels default to the
    checkpoint's. ``create_kwargs`` go to ``create_model`` (``drop_rate``, ``features_only``, ...)."""
    from .model import create_model

    checkpoint = read_checkpoint(spec, cache_dir=cache_dir, url_base=url_base, source=source,
                                 progress=progress)
    if architecture and checkpoint.architecture and architecture != checkpoint.architecture:
        raise MixNetError(f"{checkpoint.file}: holds {checkpoint.architecture} weights, not {architecture}")
    architecture = architecture or checkpoint.architecture
    if architecture is None:
        guesses = guess_architectures(checkpoint.state_dict)
        if not guesses:
            raise MixNetError(f"{checkpoint.file}: these weights fit no known MixNet architecture")
        if len(guesses) > 1:
            raise MixNetError(f"{checkpoint.file}: weights fit {' and '.join(guesses)} alike (same shapes, "
                              f"different padding); say which with architecture=")
        architecture = guesses[0]
    model = create_model(architecture,
                         num_classes=checkpoint.num_classes if num_classes is None else num_classes,
                         in_chans=checkpoint.in_chans if in_chans is None else in_chans,
                         **{**checkpoint.architecture_args, **create_kwargs})
    return apply_checkpoint(model, checkpoint)


# ---------------------------------------------------------------------------------------------- saving


ARCHITECTURE_ARGS = "mixnet_args"


def _scalar_architecture_fields() -> List[str]:
    """The ``MixNetConfig`` fields a saved config may change (all but the stage tables)."""
    return [f.name for f in dataclasses.fields(MixNetConfig) if f.name != "stages"]


def save_pretrained(model: nn.Module, directory: PathLike, class_names: Optional[Sequence[str]] = None,
                    pytorch_bin: bool = False) -> Path:
    """Write ``model`` as a hub folder that timm loads too: ``model.safetensors`` (and, if asked,
    ``pytorch_model.bin``) plus ``config.json`` with architecture, classes, class names and
    preprocessing. ``class_names`` default to those in ``model.pretrained_cfg``."""
    from safetensors.torch import save

    num_classes = getattr(model, "num_classes", None)
    if num_classes is None or not getattr(model, "model_name", None):
        raise MixNetError("save_pretrained needs a classifier model made by create_model (not features_only)")
    if class_names is None:
        class_names = model.pretrained_cfg.get("class_names")
    if class_names is not None and len(class_names) != num_classes:
        raise MixNetError(f"{len(class_names)} class names given for a model with {num_classes} classes")
    directory = Path(directory)
    state_dict = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_write(directory / HUB_SAFETENSORS) as f:
        f.write(save(state_dict, metadata={"format": "pt"}))
    if pytorch_bin:
        with atomic_write(directory / HUB_PYTORCH) as f:
            torch.save(state_dict, f)

    fields = {f.name for f in dataclasses.fields(PretrainedCfg)}
    pretrained_cfg = {k: list(v) if isinstance(v, tuple) else v
                      for k, v in model.pretrained_cfg.items() if k in fields}
    pretrained_cfg.update(input_size=[model.in_chans, *pretrained_cfg["input_size"][1:]],
                          num_classes=num_classes, crop_mode="center", fixed_input_size=False)
    config = dict(architecture=model.model_name, num_classes=num_classes, num_features=model.num_features,
                  global_pool="avg")
    if class_names is not None:
        config["label_names"] = [str(name) for name in class_names]
    config["model_args"] = dict(num_classes=num_classes, in_chans=model.in_chans)
    # A rescaled or otherwise changed architecture, under a key of our own (timm passes model_args on).
    registered = MODELS[model.model_name].config
    changed = {k: getattr(model.config, k) for k in _scalar_architecture_fields()
               if getattr(model.config, k) != getattr(registered, k)}
    if changed:
        config[ARCHITECTURE_ARGS] = changed
    config["pretrained_cfg"] = pretrained_cfg
    with atomic_write(directory / HUB_CONFIG, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return directory
