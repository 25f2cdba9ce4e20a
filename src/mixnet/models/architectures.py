"""The MixNet architectures as data: one row per group of identical blocks, as in the paper's figure.

Read a row left to right like Figure 8 of the MixConv paper (arXiv 1907.09595): how many blocks,
the kernel sizes of the depthwise MixConv, the expansion ratio, how many groups the 1x1 expand and
project convs are split into, the stride of the first block, output channels, squeeze-excitation
ratio (of the block's input channels) and activation. Rows are gathered into the six stages whose
indices appear in state_dict keys (``blocks.<stage>.<index>``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Tuple

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BlockRow:
    """``repeats`` identical blocks; only the first one has ``stride``."""

    repeats: int
    kernel_sizes: Tuple[int, ...]
    expand_ratio: float
    expand_groups: int
    project_groups: int
    stride: int
    out_channels: int
    se_ratio: float
    act: str

    @property
    def is_depthwise_separable(self) -> bool:
        """The first row of every MixNet: depthwise conv then 1x1 project, no expansion."""
        return self.expand_ratio == 1


def row(repeats, kernels, expand, expand_groups, project_groups, stride, out, se, act) -> BlockRow:
    """Compact constructor so the tables below read like the paper's figure."""
    kernels = (kernels,) if isinstance(kernels, int) else tuple(kernels)
    return BlockRow(repeats, kernels, expand, expand_groups, project_groups, stride, out, se, act)


# fmt: off
#        rep  kernels            exp  a  p  stride  out   se     act
MIXNET_S_STAGES = (
    (row(1, 3,                   1,   1, 1, 1,      16,   0.0,  "relu"),),
    (row(1, 3,                   6,   2, 2, 2,      24,   0.0,  "relu"),
     row(1, 3,                   3,   2, 2, 1,      24,   0.0,  "relu")),
    (row(1, (3, 5, 7),           6,   1, 1, 2,      40,   0.5,  "swish"),
     row(3, (3, 5),              6,   2, 2, 1,      40,   0.5,  "swish")),
    (row(1, (3, 5, 7),           6,   1, 2, 2,      80,   0.25, "swish"),
     row(2, (3, 5),              6,   1, 2, 1,      80,   0.25, "swish")),
    (row(1, (3, 5, 7),           6,   2, 2, 1,      120,  0.5,  "swish"),
     row(2, (3, 5, 7, 9),        3,   2, 2, 1,      120,  0.5,  "swish")),
    (row(1, (3, 5, 7, 9, 11),    6,   1, 1, 2,      200,  0.5,  "swish"),
     row(2, (3, 5, 7, 9),        6,   1, 2, 1,      200,  0.5,  "swish")),
)

#        rep  kernels            exp  a  p  stride  out   se     act
MIXNET_M_STAGES = (
    (row(1, 3,                   1,   1, 1, 1,      24,   0.0,  "relu"),),
    (row(1, (3, 5, 7),           6,   2, 2, 2,      32,   0.0,  "relu"),
     row(1, 3,                   3,   2, 2, 1,      32,   0.0,  "relu")),
    (row(1, (3, 5, 7, 9),        6,   1, 1, 2,      40,   0.5,  "swish"),
     row(3, (3, 5),              6,   2, 2, 1,      40,   0.5,  "swish")),
    (row(1, (3, 5, 7),           6,   1, 1, 2,      80,   0.25, "swish"),
     row(3, (3, 5, 7, 9),        6,   2, 2, 1,      80,   0.25, "swish")),
    (row(1, 3,                   6,   1, 1, 1,      120,  0.5,  "swish"),
     row(3, (3, 5, 7, 9),        3,   2, 2, 1,      120,  0.5,  "swish")),
    (row(1, (3, 5, 7, 9),        6,   1, 1, 2,      200,  0.5,  "swish"),
     row(3, (3, 5, 7, 9),        6,   1, 2, 1,      200,  0.5,  "swish")),
)
# fmt: on

# Stages whose outputs are the feature pyramid (strides 2, 4, 8, 16, 32): the last stage at each stride.
FEATURE_STAGES = (0, 1, 2, 4, 5)


@dataclass(frozen=True)
class MixNetConfig:
    """Everything that defines one MixNet; any field can be overridden in ``create_model``."""

    stages: Tuple[Tuple[BlockRow, ...], ...]
    stem_channels: int
    width_multiplier: float = 1.0
    depth_multiplier: float = 1.0
    head_channels: int = 1536  # never width-scaled
    stem_act: str = "relu"
    tf_padding: bool = False  # TensorFlow "SAME" padding (the tf_ ports)
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1


@dataclass(frozen=True)
class PretrainedCfg:
    """How a model expects its input (the reference evaluation transform)."""

    input_size: Tuple[int, int, int] = (3, 224, 224)
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: Tuple[float, ...] = IMAGENET_MEAN
    std: Tuple[float, ...] = IMAGENET_STD
    num_classes: int = 1000
    first_conv: str = "conv_stem"
    classifier: str = "classifier"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ModelEntry:
    config: MixNetConfig
    description: str
    pretrained_cfg: PretrainedCfg = field(default_factory=PretrainedCfg)


def _tf(config: MixNetConfig) -> MixNetConfig:
    """The TensorFlow ports: SAME padding and TF's BatchNorm epsilon."""
    return dataclasses.replace(config, tf_padding=True, bn_eps=1e-3)


_S = MixNetConfig(MIXNET_S_STAGES, stem_channels=16)
_M = MixNetConfig(MIXNET_M_STAGES, stem_channels=24)
_L = dataclasses.replace(_M, width_multiplier=1.3)

MODELS: dict[str, ModelEntry] = {
    "mixnet_s": ModelEntry(_S, "MixNet-S"),
    "mixnet_m": ModelEntry(_M, "MixNet-M"),
    "mixnet_l": ModelEntry(_L, "MixNet-L (MixNet-M at width 1.3)"),
    "mixnet_xl": ModelEntry(dataclasses.replace(_M, width_multiplier=1.6, depth_multiplier=1.2),
                            "MixNet-XL (MixNet-M at width 1.6, depth 1.2)"),
    "mixnet_xxl": ModelEntry(dataclasses.replace(_M, width_multiplier=2.4, depth_multiplier=1.3),
                             "MixNet-XXL (MixNet-M at width 2.4, depth 1.3)"),
    "tf_mixnet_s": ModelEntry(_tf(_S), "MixNet-S, TensorFlow port (SAME padding, BN eps 1e-3)"),
    "tf_mixnet_m": ModelEntry(_tf(_M), "MixNet-M, TensorFlow port (SAME padding, BN eps 1e-3)"),
    "tf_mixnet_l": ModelEntry(_tf(_L), "MixNet-L, TensorFlow port (SAME padding, BN eps 1e-3)"),
}


def scale_stage_depth(rows: Tuple[BlockRow, ...], depth_multiplier: float) -> list[int]:
    """Repeats of each row after depth scaling (the reference's "round" mode).

    The stage's total is scaled and rounded, then shared out over its rows from the last backwards.
    """
    repeats = [r.repeats for r in rows]
    left = sum(repeats)
    left_scaled = max(1, round(left * depth_multiplier))
    scaled = []
    for r in reversed(repeats):
        rs = max(1, round(r / left * left_scaled))
        scaled.append(rs)
        left -= r
        left_scaled -= rs
    return scaled[::-1]
