"""MixNet's two block types: the depthwise-separable first block and the inverted residual."""

from __future__ import annotations

from typing import Callable, Sequence

from torch import Tensor, nn
from torchvision.ops import StochasticDepth

from .layers import SqueezeExcite, mixed_conv2d


def drop_path(rate: float) -> nn.Module:
    """Stochastic depth on the residual branch (per sample); nothing at all when the rate is 0."""
    return StochasticDepth(rate, "row") if rate > 0 else nn.Identity()


class DepthwiseSeparable(nn.Module):
    """Depthwise conv -> BN -> act -> [SE] -> 1x1 conv -> BN, plus the input when shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, kernel_sizes: Sequence[int], stride: int,
                 project_groups: int, se_ratio: float, act_layer: Callable[[], nn.Module],
                 norm_layer: type[nn.Module], tf_padding: bool, drop_path_rate: float):
        super().__init__()
        self.has_skip = stride == 1 and in_channels == out_channels
        self.conv_dw = mixed_conv2d(in_channels, in_channels, kernel_sizes, stride, depthwise=True,
                                    tf_padding=tf_padding)
        self.bn1 = norm_layer(in_channels)
        self.act1 = act_layer()
        self.se = (SqueezeExcite(in_channels, round(in_channels * se_ratio), act_layer)
                   if se_ratio > 0 else nn.Identity())
        self.conv_pw = mixed_conv2d(in_channels, out_channels, [1] * project_groups,
                                    tf_padding=tf_padding)
        self.bn2 = norm_layer(out_channels)
        self.drop_path = drop_path(drop_path_rate)

    def zero_init_last(self) -> None:
        """Start the residual branch at zero, so the block begins as the identity."""
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.se(self.act1(self.bn1(self.conv_dw(x))))
        x = self.bn2(self.conv_pw(x))
        if self.has_skip:
            x = self.drop_path(x) + shortcut
        return x


class InvertedResidual(nn.Module):
    """[Grouped] 1x1 expand -> MixConv depthwise -> SE -> [grouped] 1x1 project, with a residual."""

    def __init__(self, in_channels: int, out_channels: int, kernel_sizes: Sequence[int], stride: int,
                 expand_ratio: float, expand_groups: int, project_groups: int, se_ratio: float,
                 act_layer: Callable[[], nn.Module], norm_layer: type[nn.Module], tf_padding: bool,
                 drop_path_rate: float):
        super().__init__()
        mid_channels = int(in_channels * expand_ratio)
        self.has_skip = stride == 1 and in_channels == out_channels
        self.conv_pw = mixed_conv2d(in_channels, mid_channels, [1] * expand_groups,
                                    tf_padding=tf_padding)
        self.bn1 = norm_layer(mid_channels)
        self.act1 = act_layer()
        self.conv_dw = mixed_conv2d(mid_channels, mid_channels, kernel_sizes, stride, depthwise=True,
                                    tf_padding=tf_padding)
        self.bn2 = norm_layer(mid_channels)
        self.act2 = act_layer()
        # The squeeze width follows the block's input channels, not the expanded width.
        self.se = (SqueezeExcite(mid_channels, round(in_channels * se_ratio), act_layer)
                   if se_ratio > 0 else nn.Identity())
        self.conv_pwl = mixed_conv2d(mid_channels, out_channels, [1] * project_groups,
                                     tf_padding=tf_padding)
        self.bn3 = norm_layer(out_channels)
        self.drop_path = drop_path(drop_path_rate)

    def zero_init_last(self) -> None:
        """Start the residual branch at zero, so the block begins as the identity."""
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.act1(self.bn1(self.conv_pw(x)))
        x = self.act2(self.bn2(self.conv_dw(x)))
        x = self.bn3(self.conv_pwl(self.se(x)))
        if self.has_skip:
            x = self.drop_path(x) + shortcut
        return x
