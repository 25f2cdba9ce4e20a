"""Building layers of MixNet: MixConv, grouped 1x1 convs, squeeze-excitation, TF "SAME" padding.

Every layer here keeps the parameter names of the reference implementation (a mixed conv holds its
parts as children ``0``, ``1``, ...), so checkpoints interchange with timm unchanged.
"""

from __future__ import annotations

import functools
import itertools
from typing import Callable, List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def split_channels(channels: int, parts: int) -> List[int]:
    """Equal split of ``channels`` into ``parts``, the remainder added to the first part."""
    sizes = [channels // parts] * parts
    sizes[0] += channels - sum(sizes)
    return sizes


def round_channels(channels: float, multiplier: float = 1.0, divisor: int = 8) -> int:
    """Scale ``channels`` by the width multiplier and round to a multiple of ``divisor``.

    Never goes below ``divisor`` and never loses more than 10% of the scaled width.
    """
    scaled = channels * multiplier
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return rounded


@torch.fx.wrap
def pad_same(x: Tensor, kernel_size: int, stride: int, dilation: int) -> Tensor:
    """Pad ``x`` as TensorFlow's "SAME" does: output size ceil(n / stride), extra pixel bottom/right.

    Computed from the input's own size, so odd and non-square inputs are handled. Wrapped for
    torch.fx so that symbolic tracing records one call instead of failing on shape arithmetic.
    """
    effective_kernel = (kernel_size - 1) * dilation + 1
    # (ceil(n / s) - 1) * s + k - n, written so that torch.export sees no data-dependent branch.
    pad_h = effective_kernel - 1 - (x.shape[-2] - 1) % stride
    pad_w = effective_kernel - 1 - (x.shape[-1] - 1) % stride
    if effective_kernel < stride:  # only then can the padding come out negative
        pad_h, pad_w = max(pad_h, 0), max(pad_w, 0)
    return F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])


class Conv2dSame(nn.Conv2d):
    """A Conv2d with TensorFlow "SAME" padding computed per input (needed where stride > 1)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 dilation: int = 1, groups: int = 1, bias: bool = False):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding=0,
                         dilation=dilation, groups=groups, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        x = pad_same(x, self.kernel_size[0], self.stride[0], self.dilation[0])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def conv2d(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
           groups: int = 1, tf_padding: bool = False, bias: bool = False) -> nn.Conv2d:
    """One convolution that keeps the spatial size (up to stride), PyTorch or TensorFlow style.

    With odd kernels and stride 1, "SAME" padding is symmetric and equals PyTorch's k // 2, so
    only strided TF convs need the dynamic form.
    """
    if tf_padding and stride > 1:
        return Conv2dSame(in_channels, out_channels, kernel_size, stride, groups=groups, bias=bias)
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2,
                     groups=groups, bias=bias)


class MixedConv2d(nn.ModuleList):
    """MixConv: the channels are split into groups, each convolved with its own kernel size.

    Depthwise (``depthwise=True``) it is the paper's MixConv; with 1x1 kernels and
    ``depthwise=False`` it is a grouped pointwise conv whose groups are separate convolutions.
    Results are concatenated in order, without channel shuffle.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_sizes: Sequence[int],
                 stride: int = 1, depthwise: bool = False, tf_padding: bool = False):
        in_splits = split_channels(in_channels, len(kernel_sizes))
        out_splits = split_channels(out_channels, len(kernel_sizes))
        super().__init__(
            conv2d(cin, cout, k, stride, groups=cout if depthwise else 1, tf_padding=tf_padding)
            for k, cin, cout in zip(kernel_sizes, in_splits, out_splits)
        )
        self.in_splits = in_splits
        self.in_channels = in_channels
        self.out_channels = out_channels

    @classmethod
    def from_convs(cls, convs: Sequence[nn.Conv2d]) -> "MixedConv2d":
        """A MixedConv2d over ready-made parts (e.g. rewritten ones), applied in order."""
        mixed = cls.__new__(cls)
        nn.ModuleList.__init__(mixed, convs)
        mixed.in_splits = [c.in_channels for c in convs]
        mixed.in_channels = sum(mixed.in_splits)
        mixed.out_channels = sum(c.out_channels for c in convs)
        return mixed

    def forward(self, x: Tensor) -> Tensor:
        parts = torch.split(x, self.in_splits, 1)
        outputs: List[Tensor] = []
        for i, conv in enumerate(self):
            outputs.append(conv(parts[i]))
        return torch.cat(outputs, 1)


def conv_parts(conv: nn.Module) -> List[nn.Module]:
    """The convolutions of a MixedConv2d, or ``[conv]`` for a single one."""
    return list(conv) if isinstance(conv, MixedConv2d) else [conv]


def depthwise_with(conv: nn.Conv2d, weight: Tensor, x: Tensor) -> Tensor:
    """The depthwise ``conv`` on some of its channels (``x``), given their rows of its weight (no bias)."""
    padding = conv.padding
    if isinstance(conv, Conv2dSame):
        x, padding = pad_same(x, conv.kernel_size[0], conv.stride[0], conv.dilation[0]), 0
    return F.conv2d(x, weight, None, conv.stride, padding, conv.dilation, weight.shape[0])


def batch_norm_channels(bn: nn.BatchNorm2d, x: Tensor, start: int, end: int) -> Tensor:
    """``bn`` on channels start:end of its input, given only those (``x``). Its running statistics are
    updated in place through views; the caller counts the batch in ``bn.num_batches_tracked`` once."""
    return F.batch_norm(x, bn.running_mean[start:end], bn.running_var[start:end], bn.weight[start:end],
                        bn.bias[start:end], bn.training, bn.momentum, bn.eps)


def mixed_conv2d(in_channels: int, out_channels: int, kernel_sizes: Sequence[int], stride: int = 1,
                 depthwise: bool = False, tf_padding: bool = False) -> nn.Module:
    """A plain conv for a single kernel size, a MixedConv2d for several (the reference layout)."""
    if len(kernel_sizes) == 1:
        groups = out_channels if depthwise else 1
        return conv2d(in_channels, out_channels, kernel_sizes[0], stride, groups, tf_padding)
    return MixedConv2d(in_channels, out_channels, kernel_sizes, stride, depthwise, tf_padding)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: channel gates from globally pooled features."""

    def __init__(self, channels: int, reduced_channels: int, act_layer: Callable[[], nn.Module]):
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced_channels, 1, bias=True)
        self.act1 = act_layer()
        self.conv_expand = nn.Conv2d(reduced_channels, channels, 1, bias=True)
        self.gate = nn.Sigmoid()

    def gates(self, pooled: Tensor) -> Tensor:
        """The channel gates (N, C, 1, 1) for globally pooled features."""
        return self.gate(self.conv_expand(self.act1(self.conv_reduce(pooled))))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gates(x.mean((2, 3), keepdim=True))

    def forward_groups(self, groups: Sequence[Tensor]) -> List[Tensor]:
        """``forward`` of the concatenation of ``groups`` (channel groups, in order), group by group."""
        gates = self.gates(torch.cat([x.mean((2, 3), keepdim=True) for x in groups], 1))
        # Slices, not torch.split: compiled by inductor (torch 2.14), split's backward here gave wrong
        # input gradients (tests/test_training.py, the compiled training step).
        ends = itertools.accumulate(x.shape[1] for x in groups)
        return [x * gates[:, end - x.shape[1]:end] for x, end in zip(groups, ends)]


ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "swish": nn.SiLU}


def activation(name: str) -> Callable[[], nn.Module]:
    """A factory of the named activation, in place: every activation here follows a batch norm (or a
    conv) whose output nothing else reads, and overwriting it saves one tensor per layer; without it a
    training step ran at x0.85 of timm's (benchmarks/RESULTS.md)."""
    try:
        return functools.partial(ACTIVATIONS[name], inplace=True)
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(ACTIVATIONS)}") from None

