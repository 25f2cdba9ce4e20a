"""Checkpoints: reading weights safely, filling a model with them, and writing the hub folder format.

Where weights come from (``spec`` in ``load_model``, ``pretrained`` in ``create_model``):

- a tag of the registry ``WEIGHTS``, e.g. ``"mixnet_l.ft_in1k"``: fetched from the cache, else the GitHub
  release URL, else the Hugging Face hub (only where a digest of its copy is registered; see ``download``
  for cache and mirrors), always checked against the registered sha256; ``DEFAULT_TAG``
  (``"mixnet_s.imagenette"``) ships inside the package;
- an architecture name, e.g. ``"mixnet_l"`` (``pretrained=True`` in ``create_model``): its default tag,
  the first registered for it;
- a weights file: timm-style ``.pth``/``.bin`` (a bare state dict, or a training checkpoint holding
  ``state_dict_ema``/``model_ema``/``state_dict``/``model``, EMA preferred; ``module.`` and
  ``_orig_mod.`` prefixes stripped) or ``.safetensors``; read with ``torch.load(weights_only=True)``
  (allowing too the ``argparse.Namespace`` of timm's training checkpoints), so a file whose pickle would
  run code is refused;
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

The built-in ``mixnet_s.imagenette`` weights are two package files, ``files/mixnet_s.imagenette.safetensors``
and ``files/mixnet_s.imagenette.json`` (the ``config.json`` that ``save_pretrained`` writes), with the
sha256 of the ``.safetensors`` file registered in ``registry``.

This module fills models it is given; building them by name is ``mixnet.factory``'s job.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import re
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..data.imagenet import imagenet_class_names
from ..errors import MixNetError, first_line
from ..fileio import PathLike, atomic_write
from ..models.architectures import MODELS, MixNetConfig, PretrainedCfg
from ..models.network import MIN_INPUT_SIZE
from . import download
from .registry import WEIGHTS, WeightsEntry, default_tag

HUB_CONFIG = "config.json"
HUB_SAFETENSORS = "model.safetensors"
HUB_PYTORCH = "pytorch_model.bin"
RUN_MODEL_DIRNAME = "final"
PACKAGE_FILES = Path(str(resources.files(__package__).joinpath("files")))  # the built-in weights

class CheckpointMismatch(MixNetError):
    """The weights' names or shapes do not fit the model they were to fill."""


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


# torch < 2.5 has no allowlist context: there such files stay refused, with the message naming the global.
_safe_globals = getattr(torch.serialization, "safe_globals", lambda _: contextlib.nullcontext())


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
                              f"{first_line(e)})") from None
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive (a pickle before torch 1.6, protocol 2+): anything else (an image, a
    # text file) would otherwise be reported by torch.load's weights-only refusal, as if it held code.
    if not (head.startswith(b"PK") or head.startswith(b"\x80")):
        raise MixNetError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle; "
                          f"{'empty' if not head else f'it starts with {head!r}'})")
    try:
        # timm's training checkpoints keep the run's arguments as an argparse.Namespace: plain data
        # (attributes set, no code called), so allowed; anything else outside torch's list is refused.
        with _safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            named = re.search(r"GLOBAL ([\w.]+)", str(e))
            what = f" ({named.group(1)})" if named else ""
            raise MixNetError(f"{path}: refused: the file's pickle holds objects other than tensors and "
                              f"plain data{what}, so code could run; only plain weights are loaded") from None
        raise MixNetError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt: "
                          f"{first_line(e)})") from None
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
    preprocess = read_hub_preprocess(config, config_file)
    cfg = config.get("pretrained_cfg") or {}
    names = config.get("label_names", cfg.get("label_names"))
    if isinstance(names, dict) and all(k.isdigit() for k in names):  # index -> name, as timm allows
        names = [names[k] for k in sorted(names, key=int)]
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise MixNetError(f"{config_file}: label_names must be a list of class names, got {_shown(names)}")
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
    for key, value in (("num_classes", config.get("num_classes")), ("pretrained_cfg.num_classes",
                                                                    preprocess.get("num_classes"))):
        if value is not None and value != checkpoint.num_classes:
            raise MixNetError(f"{config_file}: {key} is {_shown(value)} for a classifier of "
                              f"{checkpoint.num_classes} classes")
    return checkpoint


def read_hub_preprocess(config: dict, config_file: PathLike) -> Dict[str, object]:
    """The ``PretrainedCfg`` fields of a hub config's ``pretrained_cfg``, each checked, since a config is
    input: a wrong type would otherwise surface far away, as a traceback in the eval transform."""
    cfg = config.get("pretrained_cfg") or {}
    if not isinstance(cfg, dict):
        raise MixNetError(f"{config_file}: pretrained_cfg must be a JSON object, got {_shown(cfg)}")

    def check(key: str, ok: bool, expected: str) -> None:
        if not ok:
            raise MixNetError(f"{config_file}: pretrained_cfg.{key} must be {expected}, got {_shown(cfg[key])}")

    fields = {f.name for f in dataclasses.fields(PretrainedCfg)}
    preprocess = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items() if k in fields}
    size = preprocess.get("input_size")
    if size is not None:
        check("input_size", isinstance(size, tuple) and len(size) == 3 and all(map(_is_int, size))
              and size[0] > 0 and min(size[1:]) >= MIN_INPUT_SIZE,
              f"[C, H, W] (integers, H and W at least {MIN_INPUT_SIZE})")
    if "crop_pct" in preprocess:
        crop_pct = preprocess["crop_pct"]
        check("crop_pct", _is_number(crop_pct) and 0 < crop_pct <= 1, "a number in (0, 1]")
    if "interpolation" in preprocess:
        check("interpolation", isinstance(preprocess["interpolation"], str), "a string such as \"bicubic\"")
    if "num_classes" in preprocess:
        check("num_classes", _is_int(preprocess["num_classes"]) and preprocess["num_classes"] >= 0,
              "a count of classes")
    # One statistic per input channel; or three, the RGB statistics that timm and save_pretrained keep
    # when the stem was adapted to another channel count.
    counts = sorted({size[0] if size else 3, 3})
    for key in ("mean", "std"):
        if key in preprocess:
            stats = preprocess[key]
            numbers = isinstance(stats, tuple) and len(stats) in counts and all(map(_is_number, stats))
            positive = key == "mean" or (numbers and min(stats) > 0)  # std divides
            check(key, numbers and positive, f"a list of {' or '.join(map(str, counts))} "
                  f"{'' if key == 'mean' else 'positive '}numbers (one per channel)")
    return preprocess


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shown(value, limit: int = 60) -> str:
    """A config value as JSON, cut short: enough to recognise it in a one-line error."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MixNetError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MixNetError(f"{path}: not a readable JSON config ({first_line(e)})") from None
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
        path = download.fetch(entry, cache_dir, url_base, source, progress)
        checkpoint = Checkpoint(read_state_dict(path), str(path))
        checkpoint.preprocess = registered_pretrained_cfg(entry)
    checkpoint.architecture, checkpoint.tag = entry.architecture, entry.tag
    if entry.imagenet_classes and checkpoint.num_classes == 1000:
        checkpoint.class_names = imagenet_class_names()
    return checkpoint


def registered_pretrained_cfg(entry: WeightsEntry) -> Dict[str, object]:
    """The ``PretrainedCfg`` fields of registered weights (preprocessing and ``num_classes``) without
    loading them: the shipped config's for the built-in weights, else the registry entry's."""
    if entry.package_file:
        config_file = (PACKAGE_FILES / entry.package_file).with_suffix(".json")
        return read_hub_preprocess(_read_config(config_file), config_file)
    return entry.pretrained_cfg.to_dict()


def _package_files(entry: WeightsEntry):
    weights_file = PACKAGE_FILES / entry.package_file
    config_file = weights_file.with_suffix(".json")
    missing = [str(p) for p in (weights_file, config_file) if not p.is_file()]
    if missing:
        raise MixNetError(f"{entry.tag}: the built-in weights are not in this installation "
                          f"({', '.join(missing)} missing)")
    if not entry.sha256:
        raise MixNetError(f"{entry.tag}: {weights_file} has no sha256 registered in mixnet.pretrained.registry.WEIGHTS; "
                          f"refusing to load unverified weights")
    download.check_sha256(weights_file, entry.sha256)
    return weights_file, config_file


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
    # Saved from a run that diverged: every prediction would be NaN (and --json would not be JSON).
    broken = nonfinite_tensors(state_dict)
    if broken:
        raise MixNetError(f"{checkpoint.file}: NaN or infinite values in {len(broken)} of its tensors (e.g. "
                          f"{broken[0]}); saved from a training run that diverged?")
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


def nonfinite_tensors(state_dict: Dict[str, Tensor]) -> List[str]:
    """The names of the floating-point tensors holding a NaN or an infinity: weights of a diverged run."""
    return [k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


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
    raise CheckpointMismatch(f"{checkpoint.file}: does not fit {model_name or 'this model'}: "
                             f"{', '.join(problems)}")


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
