"""optimize_for_inference: folded batch norm and merged MixConvs give the eval model's outputs."""

import pytest
import torch
from torch import nn

from conftest import ALONE, COMPILES_TIMEOUT, randomized
from mixnet import list_models
from mixnet.deploy.benchmark import randomize_batchnorm
from mixnet.models.layers import Conv2dSame, MixedConv2d
from mixnet.models.fusion import fold_batchnorm, merge_mixed_conv, mixed_conv_names, optimize_for_inference

TOLERANCE = 1e-4


@pytest.mark.parametrize("name", list_models())
@torch.no_grad()
def test_optimized_logits_match_eval_model(name):
    model = randomized(name)
    fast = optimize_for_inference(model)
    generator = torch.Generator().manual_seed(1)
    for shape in [(1, 3, 224, 224), (3, 3, 97, 131)]:
        x = torch.randn(shape, generator=generator)
        expected = model(x)
        assert expected.abs().max() > 0.1  # logits large enough for the tolerance to mean something
        assert (fast(x) - expected).abs().max().item() < TOLERANCE
    # Nothing of the slow form is left: no batch norm, no split-and-concat MixConv.
    assert not any(isinstance(m, (nn.BatchNorm2d, MixedConv2d)) for m in fast.modules())


@pytest.mark.parametrize("tf_padding", [False, True])
@pytest.mark.parametrize("stride", [1, 2])
@torch.no_grad()
def test_merged_depthwise_mixconv_equals_split_form(tf_padding, stride):
    torch.manual_seed(0)
    mixed = MixedConv2d(50, 50, [3, 5, 7, 9], stride=stride, depthwise=True, tf_padding=tf_padding)
    merged = merge_mixed_conv(mixed)
    assert merged.groups == 50 and merged.kernel_size == (9, 9)
    assert isinstance(merged, Conv2dSame) == (tf_padding and stride > 1)
    for size in [(33, 33), (40, 51)]:  # odd and even sizes: TF pads asymmetrically on some
        x = torch.randn(2, 50, *size)
        torch.testing.assert_close(merged(x), mixed(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["tf_mixnet_s", "mixnet_m"])
@torch.no_grad()
def test_batchnorm_folds_into_split_mixconvs(name):
    model = randomized(name)
    fast = optimize_for_inference(model, merge_mixconv=False)
    x = torch.randn(3, 3, 97, 131, generator=torch.Generator().manual_seed(1))
    assert (fast(x) - model(x)).abs().max().item() < TOLERANCE
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert any(isinstance(m, MixedConv2d) for m in fast.modules())


@torch.no_grad()
def test_only_the_named_mixconvs_are_merged():
    model = randomized("mixnet_s")
    names = mixed_conv_names(model)
    assert "blocks.2.0.conv_dw" in names and "blocks.1.0.conv_pw" in names
    chosen = names[::2]
    fast = optimize_for_inference(model, merge_mixconv=chosen)
    still_split = [name for name, m in fast.named_modules() if isinstance(m, MixedConv2d)]
    assert still_split == [name for name in names if name not in chosen]
    x = torch.randn(2, 3, 97, 131, generator=torch.Generator().manual_seed(1))
    assert (fast(x) - model(x)).abs().max().item() < TOLERANCE
    with pytest.raises(ValueError, match="no MixConv named 'blocks.0.0.conv_dw'"):
        optimize_for_inference(model, merge_mixconv=["blocks.0.0.conv_dw"])


@pytest.mark.parametrize("in_channels,out_channels", [(48, 96), (50, 75)])
@torch.no_grad()
def test_merged_grouped_pointwise_equals_split_form(in_channels, out_channels):
    torch.manual_seed(0)
    mixed = MixedConv2d(in_channels, out_channels, [1, 1], depthwise=False)
    merged = merge_mixed_conv(mixed)
    # An even split becomes a grouped conv; an uneven one a block-diagonal dense conv.
    even = in_channels % 2 == 0 and out_channels % 2 == 0
    assert merged.groups == (2 if even else 1)
    x = torch.randn(2, in_channels, 9, 11)
    torch.testing.assert_close(merged(x), mixed(x), rtol=0, atol=1e-5)


@torch.no_grad()
def test_fold_batchnorm_equals_conv_then_bn():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=False)
    bn = randomize_batchnorm(nn.Sequential(nn.BatchNorm2d(16, eps=1e-3))).eval()[0]
    x = torch.randn(2, 8, 10, 10)
    torch.testing.assert_close(fold_batchnorm(conv, bn)(x), bn(conv(x)), rtol=0, atol=1e-5)


@torch.no_grad()
def test_original_model_is_untouched_and_smallest_input_runs():
    model = randomized("tf_mixnet_s")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = optimize_for_inference(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    x = torch.randn(2, 3, 32, 33)
    torch.testing.assert_close(fast(x), model(x), rtol=0, atol=TOLERANCE)
    assert fast.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    assert not any(p.requires_grad for p in fast.parameters())


@torch.no_grad()
def test_feature_pyramid_model_is_optimized_too():
    model = randomized("mixnet_m", features_only=True)
    fast = optimize_for_inference(model, channels_last=False)
    x = torch.randn(1, 3, 64, 64)
    for got, expected in zip(fast(x), model(x), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=TOLERANCE)


@ALONE
@COMPILES_TIMEOUT
@torch.no_grad()
def test_optimized_model_compiles_and_matches_eval_model():
    # One variant, one size: compiling costs about a minute on 2 cores; tf_mixnet_s's eager compile is
    # tested in test_model.py, so both padding styles go through torch.compile.
    model = randomized("mixnet_s")
    x = torch.randn(2, 3, 65, 49, generator=torch.Generator().manual_seed(3))
    expected = model(x)
    assert expected.abs().max() > 0.1
    compiled = optimize_for_inference(model, compile=True)
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)  # compile=True took effect
    torch.testing.assert_close(compiled(x), expected, rtol=0, atol=TOLERANCE)
