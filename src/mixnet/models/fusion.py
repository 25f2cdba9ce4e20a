"""An inference form of a MixNet: batch norm folded, MixConv merged, the fastest memory format.

Why the rewrites help (measured on a 2-core CPU, see benchmarks/RESULTS.md):

* A MixConv splits its input, runs one small depthwise conv per kernel size and concatenates the
  results: several kernel launches and two extra copies per layer. One depthwise conv whose smaller
  kernels are zero-padded to the largest computes exactly the same thing (the padded kernels keep
  their centre, so both PyTorch's k // 2 padding and TensorFlow "SAME" padding carry over when the
  largest kernel's padding is used) and is faster despite the extra multiply-adds by zero.
* A grouped 1x1 made of separate convs becomes one 1x1 conv (``groups=g`` when the split is even,
  block-diagonal otherwise), again one launch instead of split/convs/concat.
* Batch norm in eval mode is an affine map per channel, so it folds into the preceding conv.
"""

from __future__ import annotations

import copy
from typing import Collection, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import DepthwiseSeparable, InvertedResidual
from .layers import Conv2dSame, MixedConv2d
from .network import MixNet, MixNetFeatures, MixNetTrunk

# (conv, batch norm) attribute pairs per module type: the batch norm directly follows the conv.
CONV_BN_PAIRS: Dict[type, Tuple[Tuple[str, str], ...]] = {
    MixNetTrunk: (("conv_stem", "bn1"),),
    MixNet: (("conv_stem", "bn1"), ("conv_head", "bn2")),
    MixNetFeatures: (("conv_stem", "bn1"),),
    DepthwiseSeparable: (("conv_dw", "bn1"), ("conv_pw", "bn2")),
    InvertedResidual: (("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3")),
}


def _new_conv_like(template: nn.Conv2d, weight: Tensor, bias: Optional[Tensor], groups: int,
                   padding: int) -> nn.Conv2d:
    """A conv of the same kind as ``template`` (plain or TF "SAME") holding ``weight`` and ``bias``."""
    out_channels, in_per_group, k, _ = weight.shape
    stride = template.stride[0]
    if isinstance(template, Conv2dSame):
        conv: nn.Conv2d = Conv2dSame(in_per_group * groups, out_channels, k, stride, groups=groups,
                                     bias=bias is not None)
    else:
        conv = nn.Conv2d(in_per_group * groups, out_channels, k, stride, padding=padding,
                         groups=groups, bias=bias is not None)
    conv = conv.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
    return conv


def merge_mixed_conv(mixed: MixedConv2d) -> nn.Conv2d:
    """One conv computing exactly what the MixedConv2d computes.

    Depthwise parts: one depthwise conv, each kernel zero-padded (symmetrically) to the largest.
    1x1 parts: one grouped conv when every part has the same shape, else one block-diagonal conv.
    """
    convs: List[nn.Conv2d] = list(mixed)
    first = convs[0]
    biases = torch.cat([c.bias for c in convs]) if first.bias is not None else None
    if all(c.groups == c.in_channels == c.out_channels for c in convs):
        k_max = max(c.kernel_size[0] for c in convs)
        weight = torch.cat([F.pad(c.weight, [(k_max - c.kernel_size[0]) // 2] * 4) for c in convs])
        widest = max(convs, key=lambda c: c.kernel_size[0])
        return _new_conv_like(widest, weight, biases, groups=weight.shape[0], padding=k_max // 2)
    if any(c.kernel_size != (1, 1) or c.groups != 1 for c in convs):
        raise ValueError("only depthwise MixConvs and grouped 1x1 convs can be merged")
    if len({c.weight.shape for c in convs}) == 1:
        return _new_conv_like(first, torch.cat([c.weight for c in convs]), biases,
                              groups=len(convs), padding=0)
    weight = first.weight.new_zeros(mixed.out_channels, mixed.in_channels, 1, 1)
    row = col = 0
    for c in convs:
        weight[row:row + c.out_channels, col:col + c.in_channels] = c.weight
        row, col = row + c.out_channels, col + c.in_channels
    return _new_conv_like(first, weight, biases, groups=1, padding=0)


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d, channels: slice = slice(None)) -> nn.Conv2d:
    """``conv`` followed by ``bn`` (eval mode, running statistics) as one conv with a bias;
    ``channels``: the part of ``bn`` that follows ``conv`` (one part of a MixedConv2d)."""
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps))[channels]
    bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
    return _new_conv_like(conv, conv.weight * scale.reshape(-1, 1, 1, 1),
                          (bias - bn.running_mean[channels]) * scale + bn.bias[channels],
                          groups=conv.groups, padding=conv.padding[0])


def _fold_into(conv: nn.Module, bn: nn.BatchNorm2d) -> nn.Module:
    """``bn`` folded into a conv, or into each part of a MixedConv2d (its slice of the channels)."""
    if isinstance(conv, MixedConv2d):
        parts, start = [], 0
        for part in conv:
            parts.append(fold_batchnorm(part, bn, slice(start, start + part.out_channels)))
            start += part.out_channels
        return MixedConv2d.from_convs(parts)
    return fold_batchnorm(conv, bn)


# Which MixConvs to merge: all (True), none (False), or those whose module names are listed.
MergeChoice = Union[bool, Collection[str]]


def mixed_conv_names(model: nn.Module) -> List[str]:
    """The module names of ``model``'s MixConvs (the layers a merge choice is about), in order."""
    return [name for name, m in model.named_modules() if isinstance(m, MixedConv2d)]


@torch.no_grad()
def fuse_model(model: nn.Module, merge_mixconv: MergeChoice = True) -> nn.Module:
    """Fold every batch norm into its conv (and merge MixConvs) in place; returns ``model``.

    The batch norms become identities, so the model's own forward code runs unchanged.
    ``merge_mixconv``: True merges every MixConv, False none, a collection of module names (see
    ``mixed_conv_names``) just those: a runtime may run some layers faster split (zero-padding a 3x3
    kernel to 9x9 does 9x its multiply-adds) and others merged.
    """
    names = set(mixed_conv_names(model))
    chosen = names if merge_mixconv is True else set() if merge_mixconv is False else set(merge_mixconv)
    if chosen - names:
        raise ValueError(f"no MixConv named {sorted(chosen - names)[0]!r} in {type(model).__name__}")
    model.eval()
    for module in model.modules():
        for conv_name, bn_name in CONV_BN_PAIRS.get(type(module), ()):
            conv, bn = getattr(module, conv_name), getattr(module, bn_name)
            if isinstance(bn, nn.BatchNorm2d):
                setattr(module, conv_name, _fold_into(conv, bn))
                setattr(module, bn_name, nn.Identity())
    for name in chosen:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child_name, merge_mixed_conv(getattr(parent, child_name)))
    return model


def optimize_for_inference(model: nn.Module, merge_mixconv: MergeChoice = True, channels_last: bool = True,
                           compile: bool = False, copy_model: bool = True) -> nn.Module:
    """A fast, eval-only form of ``model`` giving the same outputs (to float rounding).

    Works for any MixNet variant and any input size the model accepts; the original model is left
    untouched unless ``copy_model=False``. ``compile=True`` wraps the result in ``torch.compile``
    (slow to compile on small CPUs; worth it for long-running jobs, see benchmarks/RESULTS.md).
    """
    fused = fuse_model(copy.deepcopy(model) if copy_model else model, merge_mixconv)
    for p in fused.parameters():
        p.requires_grad_(False)
    if channels_last:
        # Weights in channels_last make every conv (the first included) produce channels_last output.
        fused = fused.to(memory_format=torch.channels_last)
    if compile:
        fused = torch.compile(fused, dynamic=None)
    return fused
