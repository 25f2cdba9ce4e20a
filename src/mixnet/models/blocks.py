"""MixNet's two block types: the depthwise-separable first block and the inverted residual."""

from __future__ import annotations

import itertools
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import StochasticDepth

from .layers import SqueezeExcite, batch_norm_channels, conv_parts, depthwise_with, mixed_conv2d


def drop_path(rate: float) -> nn.Module:
    """Stochastic depth on the residual branch (per sample); nothing at all when the rate is 0."""
    return StochasticDepth(rate, "row") if rate > 0 else nn.Identity()


def common_pieces(*splits: Sequence[int]) -> List[Tuple[int, int]]:
    """The channel ranges (start, end) cut at every boundary of each split (channel counts of its parts)."""
    cuts = sorted({0}.union(*(itertools.accumulate(sizes) for sizes in splits)))
    return list(zip(cuts[:-1], cuts[1:]))


def part_index(ranges: Sequence[Tuple[int, int]], sizes: Sequence[int]) -> List[int]:
    """For each range, the index of the part of the split ``sizes`` that holds it."""
    ends = list(itertools.accumulate(sizes))
    return [next(i for i, part_end in enumerate(ends) if end <= part_end) for _, end in ranges]


def split_by_piece(weights: Sequence[Tensor], part_of_piece: Sequence[int], sizes: Sequence[int],
                   dim: int) -> List[Tensor]:
    """Each piece's share of its part's weight, along ``dim``: one split per part, so backward gathers each
    part's gradient in one concatenation (slices would each allocate a whole zero gradient)."""
    return [w for i, weight in enumerate(weights)
            for w in weight.split([n for n, part in zip(sizes, part_of_piece) if part == i], dim)]


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
        # forward_by_piece's pieces of the expanded channels: cut wherever the expand convs, the depthwise
        # convs or the project convs split them, so each piece lies in one part of each. None: no split.
        splits = [[c.out_channels for c in conv_parts(self.conv_pw)],
                  [c.out_channels for c in conv_parts(self.conv_dw)],
                  [c.in_channels for c in conv_parts(self.conv_pwl)]]
        self.pieces = common_pieces(*splits)
        # For each piece, the part that holds it: of the expand conv, of the depthwise conv, of the project conv.
        self.piece_parts = [part_index(self.pieces, sizes) for sizes in splits]
        if len(self.pieces) == 1:
            self.pieces = None

    def zero_init_last(self) -> None:
        """Start the residual branch at zero, so the block begins as the identity."""
        nn.init.zeros_(self.bn3.weight)

    # forward_by_piece pays where a piece of the expanded tensor has at least this many elements (batch x
    # height x width x channels / pieces): below it, its extra small ops cost more than the copies it saves.
    # Measured block by block on a 2-core AVX-512 CPU, mixnet_s and mixnet_l at batch 8 and 32, 128 and
    # 224 px: above about 3e5 the pieces mostly won (up to x1.85), below they mostly lost (down to x0.73)
    # (benchmarks/RESULTS.md, "Pieces by size"); checked again on an AVX2-only CPU; not measured on a GPU.
    # 0: every split block by piece.
    min_piece_elements = 300_000

    def runs_by_piece(self, x: Tensor) -> bool:
        """Whether ``forward`` runs ``forward_by_piece`` on ``x``: in training, in a block whose channels are
        split somewhere, with plain batch norms (not folded, not synchronised), on a big enough input."""
        return (self.training and self.pieces is not None
                and all(type(bn) is nn.BatchNorm2d and bn.track_running_stats and bn.momentum is not None
                        for bn in (self.bn1, self.bn2))
                and self.elements_per_piece(x) >= self.min_piece_elements)

    def elements_per_piece(self, x: Tensor) -> float:
        """The elements of one piece of the expanded tensor for the input ``x``, on average over the pieces
        (batch x height x width x expanded channels / pieces); for a block that has pieces."""
        n, _, h, w = x.shape
        return n * h * w * self.bn1.num_features / len(self.pieces)

    def forward_by_piece(self, x: Tensor) -> Tensor:
        """The expansion to the projection with each piece of the channels (``self.pieces``) in a tensor of
        its own.

        The same arithmetic as the layers' own forwards, piece by piece: the expand conv computes a piece
        from its rows of the weight, the depthwise conv (per channel) from its filters, and the project
        conv sums the pieces' shares (columns). Nothing slices channels out of a channels_last tensor (a
        copy) before the depthwise convs or concatenates after them, nor copies their gradients back: a
        training step at 224 px ran x1.32 (mixnet_s) and x1.78 (mixnet_l) timm's (benchmarks/RESULTS.md).
        The batch norms update their running statistics through views, once each per batch.
        """
        expand, depthwise, project = (conv_parts(c) for c in (self.conv_pw, self.conv_dw, self.conv_pwl))
        expand_of, depthwise_of, project_of = self.piece_parts
        sizes = [end - start for start, end in self.pieces]
        expand_w = split_by_piece([c.weight for c in expand], expand_of, sizes, 0)
        depthwise_w = split_by_piece([c.weight for c in depthwise], depthwise_of, sizes, 0)
        project_w = split_by_piece([c.weight for c in project], project_of, sizes, 1)
        inputs = torch.split(x, [c.in_channels for c in expand], 1) if len(expand) > 1 else (x,)
        pieces = []
        for i, (start, end) in enumerate(self.pieces):
            y = F.conv2d(inputs[expand_of[i]], expand_w[i])
            y = self.act1(batch_norm_channels(self.bn1, y, start, end))
            y = depthwise_with(depthwise[depthwise_of[i]], depthwise_w[i], y)
            pieces.append(self.act2(batch_norm_channels(self.bn2, y, start, end)))
        for bn in (self.bn1, self.bn2):
            if bn.training:
                bn.num_batches_tracked.add_(1)
        if isinstance(self.se, SqueezeExcite):
            pieces = self.se.forward_groups(pieces)
        outputs: List[Optional[Tensor]] = [None] * len(project)
        for y, w, p in zip(pieces, project_w, project_of):
            share = F.conv2d(y, w)
            outputs[p] = share if outputs[p] is None else outputs[p] + share
        return torch.cat(outputs, 1) if len(outputs) > 1 else outputs[0]

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        projected: Optional[Tensor] = None
        if not torch.jit.is_scripting():  # (TorchScript compiles only the layers' own forwards)
            if self.runs_by_piece(x):
                projected = self.forward_by_piece(x)
        if projected is None:
            x = self.act1(self.bn1(self.conv_pw(x)))
            x = self.act2(self.bn2(self.conv_dw(x)))
            projected = self.conv_pwl(self.se(x))
        x = self.bn3(projected)
        if self.has_skip:
            x = self.drop_path(x) + shortcut
        return x
