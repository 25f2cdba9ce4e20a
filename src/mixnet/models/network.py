"""The MixNet network and its feature-pyramid form. Builds from a ``MixNetConfig``; knows no files.

``mixnet.factory.create_model`` builds these by name and fills them with weights."""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import DepthwiseSeparable, InvertedResidual
from .architectures import FEATURE_STAGES, MixNetConfig, PretrainedCfg, scale_stage_depth
from .layers import activation, conv2d, round_channels

# Five stride-2 layers take 32 pixels to 1; smaller inputs are refused rather than silently degraded.
MIN_INPUT_SIZE = 32


@torch.fx.wrap
def check_images(x: Tensor, in_chans: int, min_size: int) -> Tensor:
    """Refuse, with a clear message, input that is not a batch of ``in_chans``-channel images."""
    if x.dim() != 4:
        raise ValueError(f"expected a 4-d batch of images (N, C, H, W), got shape {list(x.shape)}")
    if x.shape[1] != in_chans:
        raise ValueError(f"expected {in_chans} input channels, got {x.shape[1]} (shape {list(x.shape)})")
    if x.shape[2] < min_size or x.shape[3] < min_size:
        raise ValueError(f"input {x.shape[2]}x{x.shape[3]} is too small: MixNet needs at least "
                         f"{min_size}x{min_size}")
    return x


class FeatureInfo(list):
    """One dict per returned feature map: ``num_chs``, ``reduction`` (stride) and ``module``."""

    def channels(self) -> List[int]:
        return [info["num_chs"] for info in self]

    def reduction(self) -> List[int]:
        return [info["reduction"] for info in self]


def _validate(num_classes: int, in_chans: int, drop_rate: float, drop_path_rate: float) -> None:
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0 (0 removes the classifier), got {num_classes}")
    if in_chans < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")
    for name, rate in (("drop_rate", drop_rate), ("drop_path_rate", drop_path_rate)):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {rate}")


class MixNetTrunk(nn.Module):
    """Stem and block stages, shared by the classifier and the feature-pyramid model."""

    def __init__(self, config: MixNetConfig, in_chans: int, drop_path_rate: float,
                 model_name: Optional[str] = None):
        super().__init__()
        self.config = config
        self.model_name = model_name  # the registered architecture this was built as, if any
        self.in_chans = in_chans
        self.min_input_size = MIN_INPUT_SIZE
        norm_layer = partial(nn.BatchNorm2d, eps=config.bn_eps, momentum=config.bn_momentum)
        width = partial(round_channels, multiplier=config.width_multiplier)

        stem_channels = width(config.stem_channels)
        self.conv_stem = conv2d(in_chans, stem_channels, 3, stride=2, tf_padding=config.tf_padding)
        self.bn1 = norm_layer(stem_channels)
        self.act1 = activation(config.stem_act)()

        stage_rows = [list(zip(rows, scale_stage_depth(rows, config.depth_multiplier)))
                      for rows in config.stages]
        total_blocks = sum(repeats for rows in stage_rows for _, repeats in rows)
        in_channels, stride_so_far, block_index = stem_channels, 2, 0
        self.stage_channels: List[int] = []
        self.stage_strides: List[int] = []
        stages = []
        for rows in stage_rows:
            blocks = []
            for spec, repeats in rows:
                out_channels = width(spec.out_channels)
                for i in range(repeats):
                    stride = spec.stride if i == 0 else 1
                    common = dict(in_channels=in_channels, out_channels=out_channels,
                                  kernel_sizes=spec.kernel_sizes, stride=stride,
                                  project_groups=spec.project_groups, se_ratio=spec.se_ratio,
                                  act_layer=activation(spec.act), norm_layer=norm_layer,
                                  tf_padding=config.tf_padding,
                                  drop_path_rate=drop_path_rate * block_index / total_blocks)
                    if spec.is_depthwise_separable:
                        blocks.append(DepthwiseSeparable(**common))
                    else:
                        blocks.append(InvertedResidual(expand_ratio=spec.expand_ratio,
                                                       expand_groups=spec.expand_groups, **common))
                    in_channels = out_channels
                    stride_so_far *= stride
                    block_index += 1
            stages.append(nn.Sequential(*blocks))
            self.stage_channels.append(in_channels)
            self.stage_strides.append(stride_so_far)
        self.blocks = nn.Sequential(*stages)
        self.trunk_channels = in_channels

    def forward_stem(self, x: Tensor) -> Tensor:
        x = check_images(x, self.in_chans, self.min_input_size)
        return self.act1(self.bn1(self.conv_stem(x)))


INITS = ("zero", "reference")


def init_weights(module: nn.Module, init: str = "zero") -> None:
    """The reference initialisation for convolutions and batch norm, then, with ``init="zero"`` (the
    default), every residual branch and the classifier start at zero.

    Conv: normal(0, sqrt(2 / fan_out)) with fan_out = k*k*out / groups; BatchNorm: scale 1, shift 0.
    "zero" sets the last BatchNorm scale of each block with a skip connection to 0, so every such block
    starts as the identity and the network starts shallow (as in Goyal et al. 2017 for ResNets), and the
    classifier to 0, so every class starts at the same logit and the first loss is ln(num_classes)
    whatever the number of classes. Measured on Imagenette from scratch (docs/small-data.md): the
    reference classifier, uniform(+-1/sqrt(num_classes)), is sane for 1,000 classes but for 10 gives
    logits with a std of about 4 and a first loss near 6 instead of 2.3; the zero residual branches
    raised val top-1 after the first epoch from 42% to 51%. "reference" keeps the paper's
    initialisation for exact reproductions.
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if init == "zero":
                nn.init.zeros_(m.weight)
            else:
                bound = 1.0 / math.sqrt(m.weight.size(0))
                nn.init.uniform_(m.weight, -bound, bound)
            nn.init.zeros_(m.bias)
    if init == "zero":
        for m in module.modules():
            if getattr(m, "has_skip", False):
                m.zero_init_last()


class MixNet(MixNetTrunk):
    """A MixNet image classifier; ``state_dict`` keys and shapes are those of timm's."""

    __jit_unused_properties__ = ["default_cfg"]

    def __init__(self, config: MixNetConfig, num_classes: int = 1000, in_chans: int = 3,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 pretrained_cfg: Optional[PretrainedCfg] = None, model_name: Optional[str] = None,
                 init: str = "zero"):
        _validate(num_classes, in_chans, drop_rate, drop_path_rate)
        super().__init__(config, in_chans, drop_path_rate, model_name)
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.num_features = config.head_channels
        norm_layer = partial(nn.BatchNorm2d, eps=config.bn_eps, momentum=config.bn_momentum)
        self.conv_head = conv2d(self.trunk_channels, self.num_features, 1, tf_padding=config.tf_padding)
        self.bn2 = norm_layer(self.num_features)
        self.act2 = activation(config.stem_act)()
        self.classifier = self._make_classifier(num_classes)
        cfg = dataclasses.replace(pretrained_cfg or PretrainedCfg(), num_classes=num_classes)
        self.pretrained_cfg = cfg.to_dict()
        self.init = init
        init_weights(self, init)

    def _make_classifier(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    @property
    def default_cfg(self) -> dict:
        return self.pretrained_cfg

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a freshly initialised one (0 removes it)."""
        _validate(num_classes, self.in_chans, self.drop_rate, 0.0)
        self.num_classes = num_classes
        self.classifier = self._make_classifier(num_classes)
        init_weights(self.classifier, self.init)
        self.pretrained_cfg = {**self.pretrained_cfg, "num_classes": num_classes}

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.blocks(self.forward_stem(x))
        return self.act2(self.bn2(self.conv_head(x)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x.mean((2, 3))
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


class MixNetFeatures(MixNetTrunk):
    """The trunk returning feature maps at strides 2, 4, 8, 16, 32 (``out_indices`` picks among them)."""

    def __init__(self, config: MixNetConfig, in_chans: int = 3, drop_path_rate: float = 0.0,
                 out_indices: Optional[Sequence[int]] = None,
                 pretrained_cfg: Optional[PretrainedCfg] = None, model_name: Optional[str] = None,
                 init: str = "zero"):
        _validate(0, in_chans, 0.0, drop_path_rate)
        super().__init__(config, in_chans, drop_path_rate, model_name)
        out_indices = tuple(range(len(FEATURE_STAGES))) if out_indices is None else tuple(out_indices)
        bad = [i for i in out_indices if not 0 <= i < len(FEATURE_STAGES)]
        if bad or not out_indices:
            raise ValueError(f"out_indices must be a non-empty subset of 0..{len(FEATURE_STAGES) - 1}, "
                             f"got {list(out_indices)}")
        self.out_indices = out_indices
        self.return_stages: List[int] = [FEATURE_STAGES[i] for i in out_indices]
        self.feature_info = FeatureInfo(
            dict(num_chs=self.stage_channels[s], reduction=self.stage_strides[s], module=f"blocks.{s}",
                 index=i)
            for i, s in zip(out_indices, self.return_stages)
        )
        self.pretrained_cfg = (pretrained_cfg or PretrainedCfg()).to_dict()
        init_weights(self, init)

    def forward(self, x: Tensor) -> List[Tensor]:
        x = self.forward_stem(x)
        features: List[Tensor] = []
        for i, stage in enumerate(self.blocks):
            x = stage(x)
            if i in self.return_stages:
                features.append(x)
        return features
