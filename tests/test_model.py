"""The model family against the reference (timm, as test oracle) and against the published facts."""

import copy
import math
from pathlib import Path

import pytest
import timm
import torch

import mixnet
from conftest import ALONE, COMPILES_TIMEOUT, randomized
from mixnet.deploy.benchmark import randomize_batchnorm as randomize
from mixnet.models.blocks import InvertedResidual
from mixnet.models.fusion import fuse_model
from mixnet.models.layers import MixedConv2d
from mixnet.models.network import MIN_INPUT_SIZE

ALL = mixnet.list_models()

# Published parameter counts (ImageNet heads); tf_ ports equal their counterparts.
PARAMS = {"mixnet_s": 4_134_606, "mixnet_m": 5_014_382, "mixnet_l": 7_329_252,
          "mixnet_xl": 11_896_768, "mixnet_xxl": 23_961_752}
FEATURE_CHANNELS = {"mixnet_s": [16, 24, 40, 120, 200], "mixnet_m": [24, 32, 40, 120, 200],
                    "mixnet_l": [32, 40, 56, 160, 264], "mixnet_xl": [40, 48, 64, 192, 320]}


def pair(name: str, **kwargs):
    """Our model and timm's, with identical (randomised) weights."""
    ours = mixnet.create_model(name, **kwargs)
    ref = timm.create_model(name, **kwargs)
    randomize(ref)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


@pytest.mark.parametrize("name", ALL)
def test_parameter_count_matches_publication(name):
    model = mixnet.create_model(name)
    base = name.removeprefix("tf_")
    assert sum(p.numel() for p in model.parameters()) == PARAMS[base]


@pytest.mark.parametrize("name", ALL)
def test_state_dict_interchanges_with_timm_both_ways(name):
    ours = mixnet.create_model(name)
    ref = timm.create_model(name)
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert list(ours_sd) == list(ref_sd)
    assert all(ours_sd[k].shape == ref_sd[k].shape for k in ref_sd)
    ours.load_state_dict(ref_sd, strict=True)
    ref.load_state_dict(ours_sd, strict=True)


@pytest.mark.parametrize("name", ALL)
def test_eval_logits_match_timm(name):
    ours, ref = pair(name)
    ours.eval(), ref.eval()
    torch.manual_seed(1)
    for shape in [(2, 3, 224, 224), (1, 3, 161, 127)]:  # standard, and odd non-square
        x = torch.randn(shape)
        with torch.no_grad():
            a, b = ours(x), ref(x)
        assert a.shape == (shape[0], 1000)
        assert (a - b).abs().max().item() <= 1e-5, shape


def assert_training_steps_match(ours, ref, x, target, steps=1):
    """Outputs, gradients and batch-norm buffers of ``steps`` forward/backward passes agree to 1e-9 (relative
    where above 1), in float64. (In float32 they agree to rounding, about 1e-5 relative: our blocks train
    piece by piece, adding the project conv's shares in another order.)"""
    ours, ref, x = ours.double(), ref.double(), x.double()
    for _ in range(steps):
        outputs = []
        for model in (ours, ref):
            model.zero_grad(set_to_none=True)
            out = model(x)
            torch.nn.functional.cross_entropy(out, target).backward()
            outputs.append(out.detach())
        assert (outputs[0] - outputs[1]).abs().max().item() <= 1e-9 * max(1.0, outputs[1].abs().max().item())
    ref_params = dict(ref.named_parameters())
    for key, p in ours.named_parameters():
        ref_grad = ref_params[key].grad
        assert (p.grad - ref_grad).abs().max().item() <= 1e-9 * max(1.0, ref_grad.abs().max().item()), key
    ref_buffers = dict(ref.named_buffers())
    for key, b in ours.named_buffers():
        assert torch.allclose(b.double(), ref_buffers[key].double(), rtol=0, atol=1e-9), key


def blocks_run_by_piece(model, x):
    """The indices of the model's inverted-residual blocks that run ``forward_by_piece`` on ``x`` (asked of a
    copy: a forward in training updates the batch norms' running statistics)."""
    model = copy.deepcopy(model)
    chosen = []
    for i, block in enumerate(m for m in model.modules() if isinstance(m, InvertedResidual)):
        block.register_forward_pre_hook(lambda b, args, i=i: chosen.append(i) if b.runs_by_piece(args[0]) else None)
    with torch.no_grad():
        model(x)
    return chosen


@pytest.mark.parametrize("name", ALL)
def test_train_mode_outputs_gradients_and_bn_updates_match_timm(name, monkeypatch):
    monkeypatch.setattr(InvertedResidual, "min_piece_elements", 0)  # split blocks by piece at this small size
    ours, ref = pair(name, num_classes=10)
    ours.train(), ref.train()
    torch.manual_seed(2)
    assert_training_steps_match(ours, ref, torch.randn(3, 3, 67, 75), torch.tensor([1, 5, 9]))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_blocks_train_piece_by_piece_with_timms_outputs_gradients_and_bn_updates(memory_format, monkeypatch):
    monkeypatch.setattr(InvertedResidual, "min_piece_elements", 0)  # split blocks by piece at this small size
    ours, ref = pair("mixnet_s", num_classes=10, drop_rate=0.0)
    ours, ref = ours.to(memory_format=memory_format).train(), ref.to(memory_format=memory_format).train()
    blocks = [m for m in ours.modules() if isinstance(m, InvertedResidual)]
    # 13 blocks have a MixConv, and 2 a single depthwise conv between grouped expand and project convs.
    assert sum(isinstance(b.conv_dw, MixedConv2d) for b in blocks) == 13
    torch.manual_seed(3)
    x = torch.randn(4, 3, 64, 64).to(memory_format=memory_format)
    assert len(blocks_run_by_piece(ours, x)) == 15
    assert_training_steps_match(ours, ref, x, torch.tensor([0, 3, 6, 9]), steps=2)  # (makes both float64)
    assert blocks_run_by_piece(ours.eval(), x.double()) == []
    fused = fuse_model(ours).train()  # batch norms folded: the blocks' plain forward
    assert blocks_run_by_piece(fused, x.double()) == []


def test_blocks_train_piece_by_piece_only_where_a_piece_is_big_enough_to_pay():
    model = mixnet.create_model("mixnet_s", num_classes=10).train()
    # Elements per piece of each split block's expanded tensor at batch 8, 128 px (batch x height x width x
    # channels / pieces): blocks 0 (8 x 64 x 64 x 96 / 2 = 1,572,864) and 2 (8 x 32 x 32 x 144 / 3 = 393,216)
    # are above 300,000; the rest are at most 294,912. At batch 2 only block 0 is (393,216).
    assert blocks_run_by_piece(model, torch.randn(8, 3, 128, 128)) == [0, 2]
    assert blocks_run_by_piece(model, torch.randn(2, 3, 128, 128)) == [0]
    assert len(blocks_run_by_piece(model, torch.randn(32, 3, 224, 224))) == 15


@pytest.mark.parametrize("name", ALL)
def test_feature_maps_match_timm(name):
    ours = mixnet.create_model(name, features_only=True)
    ref = timm.create_model(name, features_only=True)
    randomize(ref)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours.eval(), ref.eval()
    assert ours.feature_info.channels() == ref.feature_info.channels()
    assert ours.feature_info.reduction() == [2, 4, 8, 16, 32]
    if name in FEATURE_CHANNELS:
        assert ours.feature_info.channels() == FEATURE_CHANNELS[name]
    x = torch.randn(1, 3, 96, 72)
    with torch.no_grad():
        feats, ref_feats = ours(x), ref(x)
    assert len(feats) == 5
    for f, r, stride in zip(feats, ref_feats, [2, 4, 8, 16, 32]):
        assert f.shape == r.shape
        assert f.shape[-2:] == (math.ceil(96 / stride), math.ceil(72 / stride))
        assert (f - r).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name, out_indices", [("mixnet_s", (1, 4)), ("tf_mixnet_m", (0, 2, 3))])
def test_out_indices_select_the_feature_maps_timm_selects(name, out_indices):
    ours, ref = pair(name, features_only=True, out_indices=out_indices)
    ours.eval(), ref.eval()
    assert ours.feature_info.channels() == ref.feature_info.channels()
    assert ours.feature_info.reduction() == ref.feature_info.reduction() == [2 ** (i + 1) for i in out_indices]
    x = torch.randn(2, 3, 70, 58)
    with torch.no_grad():
        feats, ref_feats = ours(x), ref(x)
    assert len(feats) == len(ref_feats) == len(out_indices)
    for f, r in zip(feats, ref_feats):
        assert f.shape == r.shape and r.abs().max() > 0.1
        assert (f - r).abs().max().item() <= 1e-5
    if name == "mixnet_s":
        assert ours.feature_info.channels() == [24, 200]
    with pytest.raises(ValueError, match="out_indices"):
        mixnet.create_model("mixnet_s", features_only=True, out_indices=(5,))


@pytest.mark.parametrize("multipliers", [(0.75, 1.0), (1.1, 1.4)])
def test_custom_width_and_depth_build_the_reference_scale(multipliers):
    from timm.models.efficientnet import _gen_mixnet_m

    width, depth = multipliers
    ours = mixnet.create_model("mixnet_m", width_multiplier=width, depth_multiplier=depth)
    ref = _gen_mixnet_m("mixnet_m", channel_multiplier=width, depth_multiplier=depth)
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert list(ours_sd) == list(ref_sd)
    assert all(ours_sd[k].shape == ref_sd[k].shape for k in ref_sd)


@pytest.mark.parametrize("name", ALL)
def test_script_and_fx_agree_with_eager(name):
    model = randomized(name)
    x = torch.randn(2, 3, 71, 45)
    with torch.no_grad():
        expected = model(x)
        assert expected.abs().max() > 0.1  # logits large enough for the tolerance to mean something
        for out in (torch.jit.script(model)(x), torch.fx.symbolic_trace(model)(x)):
            assert (out - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ALL)
def test_export_with_dynamic_batch_and_size_agrees_with_eager(name):
    model = randomized(name)
    # torch.export needs the last feature map > 1 pixel for a dynamic size (static 32 is tested below).
    dims = {0: torch.export.Dim("batch", max=64), 2: torch.export.Dim("height", min=33, max=2048),
            3: torch.export.Dim("width", min=33, max=2048)}
    exported = torch.export.export(model, (torch.randn(2, 3, 64, 64),), dynamic_shapes=(dims,)).module()
    with torch.no_grad():
        for shape in [(3, 3, 71, 45), (1, 3, 224, 224), (2, 3, 33, 40)]:
            x = torch.randn(shape)
            expected = model(x)
            assert expected.abs().max() > 0.1
            assert (exported(x) - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["mixnet_s", "tf_mixnet_s"])
def test_smallest_input_runs_in_every_form(name):
    model = randomized(name)
    x = torch.randn(1, 3, MIN_INPUT_SIZE, MIN_INPUT_SIZE)
    with torch.no_grad():
        expected = model(x)
        assert expected.abs().max() > 0.1
        assert (torch.jit.script(model)(x) - expected).abs().max() <= 1e-5
        assert (torch.fx.symbolic_trace(model)(x) - expected).abs().max() <= 1e-5
        assert (torch.export.export(model, (x,)).module()(x) - expected).abs().max() <= 1e-5


# One variant: compiling costs a minute or more on 2 cores. tf_mixnet_s has the per-size "SAME" padding,
# the harder graph; test_optimize.py compiles mixnet_s's inference form.
@ALONE
@COMPILES_TIMEOUT
@pytest.mark.parametrize("name", ["tf_mixnet_s"])
def test_torch_compile_agrees_with_eager(name):
    model = randomized(name)
    x = torch.randn(1, 3, 65, 49)
    with torch.no_grad():
        expected = model(x)
        assert expected.abs().max() > 0.1
        assert (torch.compile(model)(x) - expected).abs().max().item() <= 1e-5


def test_tf_ports_use_tensorflow_batchnorm_eps():
    ours = mixnet.create_model("tf_mixnet_s")
    assert all(m.eps == 1e-3 for m in ours.modules() if isinstance(m, torch.nn.BatchNorm2d))
    plain = mixnet.create_model("mixnet_s")
    assert all(m.eps == 1e-5 for m in plain.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_unknown_model_lists_close_matches():
    with pytest.raises(ValueError, match="did you mean.*mixnet_s"):
        mixnet.create_model("mixnet_ss")


def test_an_unknown_weights_tag_is_refused_even_without_pretrained_as_timm_refuses_it():
    with pytest.raises(ValueError, match=r"unknown weights tag 'mixnet_s\.nope' \(known: mixnet_s\.ft_in1k"):
        mixnet.create_model("mixnet_s.nope")
    assert mixnet.create_model("mixnet_s.ft_in1k").num_classes == 1000  # a known tag names its architecture


def test_unknown_override_is_refused():
    with pytest.raises(TypeError, match="width_multipler"):
        mixnet.create_model("mixnet_s", width_multipler=2.0)


def test_negative_num_classes_is_refused():
    with pytest.raises(ValueError, match="num_classes"):
        mixnet.create_model("mixnet_s", num_classes=-1)


def test_wrong_channel_count_is_named():
    model = mixnet.create_model("mixnet_s").eval()
    with pytest.raises(ValueError, match="expected 3 input channels, got 1"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="4-d batch"):
        model(torch.randn(3, 64, 64))


def test_too_small_input_is_named():
    model = mixnet.create_model("mixnet_s").eval()
    with pytest.raises(ValueError, match="too small"):
        model(torch.randn(1, 3, 31, 64))


def test_in_chans_and_num_classes_shape_the_model():
    model = mixnet.create_model("mixnet_s", in_chans=1, num_classes=7).eval()
    assert model.conv_stem.weight.shape[1] == 1
    assert model(torch.randn(2, 1, 40, 40)).shape == (2, 7)
    headless = mixnet.create_model("mixnet_s", num_classes=0).eval()
    assert headless(torch.randn(2, 3, 40, 40)).shape == (2, 1536)


def test_head_api():
    model = randomized("mixnet_s")  # a random head: the zero-initialised one would make logits all equal
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, 1536, 2, 2)
        pre = model.forward_head(features, pre_logits=True)
        assert torch.allclose(pre, features.mean((2, 3)))
        assert torch.allclose(model.forward_head(features), model.get_classifier()(pre))
    model.reset_classifier(5)
    assert model(x).shape == (2, 5) and model.pretrained_cfg["num_classes"] == 5
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.875
    assert cfg["interpolation"] == "bicubic" and cfg["mean"] == (0.485, 0.456, 0.406)


def test_initialisation_follows_the_reference():
    torch.manual_seed(0)
    model = mixnet.create_model("mixnet_m", init="reference")
    head = model.conv_head.weight  # 1x1, 1536 outputs, groups 1: fan_out 1536
    assert head.std().item() == pytest.approx(math.sqrt(2 / 1536), rel=0.02)
    dw = model.blocks[5][1].conv_dw[0].weight  # depthwise: fan_out = k*k*out/groups = k*k
    assert dw.std().item() == pytest.approx(math.sqrt(2 / 9), rel=0.1)
    bound = 1 / math.sqrt(1000)
    w = model.classifier.weight
    assert w.abs().max().item() <= bound and w.abs().max().item() > 0.99 * bound
    assert model.classifier.bias.abs().sum() == 0
    assert all(bool((m.weight == 1).all()) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


@pytest.mark.parametrize("features_only", [False, True])
def test_by_default_every_block_with_a_skip_starts_as_the_identity(features_only):
    torch.manual_seed(0)
    model = mixnet.create_model("mixnet_m", features_only=features_only).train()
    seen = []

    def check(block, inputs, output):
        seen.append(block)
        torch.testing.assert_close(output, inputs[0], rtol=0, atol=0)

    blocks = [m for m in model.modules() if getattr(m, "has_skip", None) is not None]
    # mixnet_m (paper, Fig. 8): 1 + 2 + 4 + 4 + 4 + 4 blocks; the first of stages 1-5 changes shape
    assert sum(b.has_skip for b in blocks) == 14 and len(blocks) == 19
    for block in blocks:
        if block.has_skip:
            block.register_forward_hook(check)
    model(torch.randn(2, 3, 64, 64))
    assert len(seen) == 14


def test_drop_path_is_stochastic_in_training_and_grows_with_depth():
    model = mixnet.create_model("mixnet_s", drop_path_rate=0.2, drop_rate=0.3)
    rates = [b.drop_path.p for stage in model.blocks for b in stage if hasattr(b.drop_path, "p")]
    assert rates == sorted(rates) and 0 < rates[0] < rates[-1] < 0.2
    x = torch.randn(4, 3, 64, 64)

    def features(x):  # before the classifier, which starts at zero and would hide every difference
        return model.forward_head(model.forward_features(x), pre_logits=True)

    model.train()
    torch.manual_seed(0)
    a = features(x)
    torch.manual_seed(1)
    b = features(x)
    assert not torch.allclose(a, b)
    model.eval()
    assert torch.equal(features(x), features(x))


@pytest.mark.parametrize("num_classes", [10, 1000])
def test_a_fresh_classifier_starts_calibrated_on_real_photos(num_classes):
    from mixnet.data.images import build_eval_transform, load_image

    photos = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.jpg"))
    torch.manual_seed(0)
    model = mixnet.create_model("mixnet_s", num_classes=num_classes).train()
    transform = build_eval_transform(model.pretrained_cfg, image_size=128)
    x = torch.stack([transform(load_image(p)) for p in photos])
    targets = torch.arange(len(photos)) % num_classes
    loss = torch.nn.functional.cross_entropy(model(x), targets).item()
    assert abs(loss - math.log(num_classes)) < 0.5, loss
    model.reset_classifier(num_classes)  # a new head for fine-tuning starts calibrated too
    loss = torch.nn.functional.cross_entropy(model(x), targets).item()
    assert abs(loss - math.log(num_classes)) < 0.5, loss
