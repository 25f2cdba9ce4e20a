"""Layer rules from the MixConv paper and the TF reference, checked against their definitions."""

import math

import pytest
import torch
import torch.nn.functional as F

from mixnet.models.architectures import MIXNET_M_STAGES, scale_stage_depth
from mixnet.models.layers import Conv2dSame, MixedConv2d, pad_same, round_channels, split_channels


def test_split_gives_the_remainder_to_the_first_group():
    assert split_channels(200, 3) == [68, 66, 66]
    assert split_channels(240, 2) == [120, 120]
    assert sum(split_channels(1234, 5)) == 1234


@pytest.mark.parametrize("channels,multiplier,expected", [(24, 1.3, 32), (40, 1.3, 56), (200, 1.3, 264),
                                                         (16, 0.1, 8), (200, 1.6, 320), (80, 2.4, 192)])
def test_round_channels(channels, multiplier, expected):
    assert round_channels(channels, multiplier) == expected


def test_round_channels_never_loses_more_than_ten_percent():
    for c in range(8, 400, 8):
        for m in (0.35, 0.5, 0.75, 1.1, 1.3, 1.6):
            r = round_channels(c, m)
            assert r % 8 == 0 and r >= 0.9 * c * m


@pytest.mark.parametrize("size", [32, 33, 64, 97, 224, 225])
@pytest.mark.parametrize("kernel,stride", [(3, 2), (5, 2), (11, 2), (3, 1), (7, 1)])
def test_same_padding_matches_tensorflow_definition(size, kernel, stride):
    x = torch.randn(1, 1, size, size + 3)
    pads = []
    for n in (size + 3, size):  # F.pad order: last dim first
        total = max((math.ceil(n / stride) - 1) * stride + kernel - n, 0)
        pads += [total // 2, total - total // 2]  # TF puts the extra pixel bottom/right
    assert torch.equal(pad_same(x, kernel, stride, 1), F.pad(x, pads))


def test_conv2d_same_output_size_is_ceil():
    conv = Conv2dSame(2, 2, 3, stride=2)
    for h, w in [(32, 33), (101, 64)]:
        assert conv(torch.randn(1, 2, h, w)).shape[-2:] == (math.ceil(h / 2), math.ceil(w / 2))


def test_mixed_depthwise_conv_is_per_group_convolution():
    conv = MixedConv2d(10, 10, [3, 5, 7], depthwise=True)
    x = torch.randn(1, 10, 16, 16)
    parts = torch.split(x, [4, 3, 3], 1)
    expected = torch.cat([F.conv2d(p, c.weight, None, 1, c.kernel_size[0] // 2, groups=p.shape[1])
                          for p, c in zip(parts, conv)], 1)
    assert torch.allclose(conv(x), expected, atol=1e-6)
    assert [c.kernel_size[0] for c in conv] == [3, 5, 7]


def test_grouped_pointwise_splits_inputs_and_outputs():
    conv = MixedConv2d(5, 7, [1, 1])
    assert [(c.in_channels, c.out_channels, c.groups) for c in conv] == [(3, 4, 1), (2, 3, 1)]


def test_depth_scaling_shares_repeats_from_the_last_row():
    stage = MIXNET_M_STAGES[2]  # rows of 1 and 3 repeats
    assert scale_stage_depth(stage, 1.0) == [1, 3]
    assert scale_stage_depth(stage, 1.2) == [1, 4]  # round(4 * 1.2) = 5
    assert scale_stage_depth(stage, 1.3) == [1, 4]  # round(5.2) = 5
    assert scale_stage_depth(MIXNET_M_STAGES[0], 1.3) == [1]
