"""Models by name: the layer above the network (``models``) and the weights (``pretrained``).

``create_model("mixnet_s.ft_in1k", pretrained=True)`` resolves the name (an architecture, or
``architecture.tag`` as timm names weights), builds the network from the architecture table, then lets
``pretrained.checkpoint.apply_checkpoint`` fill the model it was given. ``load_model`` goes the other
way round: it reads the weights first and builds whatever architecture they are.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .errors import MixNetError
from .fileio import PathLike
from .models.architectures import MODELS, MixNetConfig
from .models.network import MixNet, MixNetFeatures
from .pretrained.checkpoint import Checkpoint, CheckpointMismatch, apply_checkpoint, read_checkpoint


# Input errors, so the command line states them in one line; also the ValueError and TypeError that
# Python callers caught before these existed.
class UnknownModel(MixNetError, ValueError):
    """A name that is no registered architecture."""


class UnknownArgument(MixNetError, TypeError):
    """An override that is no field of the architecture."""


def list_models() -> List[str]:
    """Names accepted by ``create_model``."""
    return list(MODELS)


def check_model_name(name: str) -> str:
    """``name`` if it is a registered architecture, else ``UnknownModel`` with the close matches."""
    if name not in MODELS:
        close = difflib.get_close_matches(name, MODELS, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownModel(f"unknown model {name!r}{hint} (known: {', '.join(MODELS)})")
    return name


def resolve_architecture(name: str) -> str:
    """An architecture from its name or a registered weights tag (``mixnet_s.ft_in1k``); an unknown tag
    is refused, naming the architecture's tags, as timm refuses it."""
    from .pretrained.registry import WEIGHTS, list_pretrained

    if name in MODELS or name in WEIGHTS:
        return name.split(".", 1)[0]
    arch = check_model_name(name.split(".", 1)[0])
    tags = list_pretrained(arch)
    known = f"known: {', '.join(tags)}" if tags else f"{arch} has none published"
    raise UnknownModel(f"unknown weights tag {name!r} ({known})")


def resolve_config(name: str, **overrides) -> MixNetConfig:
    """The architecture registered under ``name``, with any ``MixNetConfig`` fields overridden."""
    check_model_name(name)
    fields = {f.name for f in dataclasses.fields(MixNetConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise UnknownArgument(f"unknown argument(s) for {name}: {', '.join(unknown)}; "
                              f"architecture fields that can be overridden: {', '.join(sorted(fields))}")
    return dataclasses.replace(MODELS[name].config, **overrides)


def create_model(name: str, pretrained=False, num_classes: Optional[int] = None, in_chans: int = 3,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, features_only: bool = False,
                 out_indices: Optional[Sequence[int]] = None, *, cache_dir=None,
                 url_base: Optional[str] = None, source: str = "auto", progress: bool = True,
                 init: str = "zero", **overrides) -> nn.Module:
    """Build a MixNet by name, e.g. ``create_model("mixnet_s", num_classes=10)``.

    ``pretrained``: False (random init), True (the architecture's published weights, also chosen by a
    tagged name such as ``"mixnet_s.ft_in1k"``), a weights tag, or a file / hub folder / run directory
    (see ``mixnet.pretrained.checkpoint``). ``num_classes`` defaults to the weights' classes, else 1000;
    a different count leaves the classifier freshly initialised. ``init``: ``"zero"`` (every residual
    branch and the classifier start at zero: a first loss of ln(num_classes), see ``init_weights``) or
    ``"reference"`` (the paper's); weights loaded afterwards replace either. ``cache_dir``,
    ``url_base``, ``source`` and ``progress`` control downloading (``mixnet.pretrained.download.fetch``).

    ``overrides`` replace fields of the architecture (``width_multiplier``, ``depth_multiplier``,
    ``tf_padding``, ``bn_eps``, ...), so any MixNet scale can be built.
    """
    if "." in name and name not in MODELS:  # "arch.tag", as timm names weights
        tag = name
        name = resolve_architecture(tag)
        if pretrained is True:
            pretrained = tag
    config = resolve_config(name, **overrides)  # a bad name or argument fails before any download
    checkpoint = None
    if pretrained:
        checkpoint = read_checkpoint(name if pretrained is True else pretrained, cache_dir=cache_dir,
                                     url_base=url_base, source=source, progress=progress)
    if num_classes is None:
        num_classes = checkpoint.num_classes if checkpoint is not None else 1000
    pretrained_cfg = MODELS[name].pretrained_cfg
    if features_only:
        model: nn.Module = MixNetFeatures(config, in_chans, drop_path_rate, out_indices, pretrained_cfg, name,
                                          init)
    else:
        if out_indices is not None:
            raise ValueError("out_indices only applies with features_only=True")
        model = MixNet(config, num_classes, in_chans, drop_rate, drop_path_rate, pretrained_cfg, name,
                       init)
    if checkpoint is not None:
        fill(model, checkpoint)
    return model


def guess_architectures(state_dict: Dict[str, Tensor]) -> List[str]:
    """Registered architectures whose weights have exactly these names and shapes (classifier aside).

    The tf_ ports share their twin's shapes, so both are returned for those."""
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
    if architecture:
        check_model_name(architecture)  # before any file is read or downloaded
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
                              f"different padding); say which architecture (e.g. --model {guesses[0]} "
                              f"--weights {spec}, or architecture=\"{guesses[0]}\" in Python)")
        architecture = guesses[0]
    model = create_model(architecture,
                         num_classes=checkpoint.num_classes if num_classes is None else num_classes,
                         in_chans=checkpoint.in_chans if in_chans is None else in_chans,
                         **{**checkpoint.architecture_args, **create_kwargs})
    return fill(model, checkpoint)


def fill(model: nn.Module, checkpoint: Checkpoint) -> nn.Module:
    """``apply_checkpoint``, with a hint naming the architectures the weights do fit when they don't fit."""
    try:
        return apply_checkpoint(model, checkpoint)
    except CheckpointMismatch as e:
        guesses = guess_architectures(checkpoint.state_dict)
        hint = f"; it looks like {' or '.join(guesses)} weights" if guesses else ""
        raise MixNetError(f"{e}{hint}") from None
