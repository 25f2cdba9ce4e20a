"""Model cards: MAC counting, the stats cache, `mixnet info` and `mixnet list`."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from mixnet import create_model
from mixnet.cli import main
from mixnet.errors import MixNetError
from mixnet.info import count_stats, model_card, model_stats, stats_cache_path
from mixnet.pretrained.registry import WEIGHTS


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXNET_CACHE_DIR", str(tmp_path / "cache"))


def macs_by_hooks(model: nn.Module, input_size) -> int:
    """Conv and linear multiply-adds from each layer's output shape: an independent count."""
    total = 0

    def conv_hook(module, inputs, output):
        nonlocal total
        per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        total += output.numel() * per_output

    def linear_hook(module, inputs, output):
        nonlocal total
        total += output.numel() * module.in_features

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(conv_hook)
        elif isinstance(m, nn.Linear):
            m.register_forward_hook(linear_hook)
    with torch.no_grad():
        model(torch.empty(1, *input_size, device="meta"))
    return total


@pytest.mark.parametrize("name", ["mixnet_s", "tf_mixnet_m"])
def test_macs_match_an_independent_count(name):
    params, macs = count_stats(name)
    with torch.device("meta"):
        model = create_model(name).eval()
    assert macs == macs_by_hooks(model, (3, 224, 224))
    assert params == sum(p.numel() for p in model.parameters())


def test_mixnet_s_figures_match_the_literature_and_timm():
    timm = pytest.importorskip("timm")
    params, macs = count_stats("mixnet_s")
    assert round(macs / 1e6, 1) == 239.2  # the convention's published figure for MixNet-S at 224
    with torch.device("meta"):
        reference = timm.create_model("mixnet_s")
    assert params == sum(p.numel() for p in reference.parameters())
    _, macs_small = count_stats("mixnet_s", (3, 112, 112))
    assert macs_small < macs / 3  # MACs scale with the input area (the head's linear layer does not)


def test_stats_cache_is_written_and_reused(monkeypatch):
    first = model_stats(["mixnet_s"])
    assert stats_cache_path().is_file()
    import mixnet.info

    def must_not_count(*args, **kwargs):
        raise AssertionError("counted again despite the cache")

    monkeypatch.setattr(mixnet.info, "count_stats", must_not_count)
    assert model_stats(["mixnet_s"]) == first
    stats_cache_path().write_text("{ not json")  # a broken cache is recounted, not fatal
    monkeypatch.undo()
    assert model_stats(["mixnet_s"]) == first


def test_a_cache_folder_that_cannot_be_made_only_costs_counting_again(tmp_path, monkeypatch, capsys):
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("MIXNET_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    assert model_stats(["mixnet_s"])["mixnet_s"]["params"] == 4_134_606
    assert main(["list", "--json"]) == 0
    assert [row["name"] for row in json.loads(capsys.readouterr().out)][0] == "mixnet_s"


def test_model_card_fields():
    card = model_card("mixnet_s.ft_in1k")  # a tag names its architecture
    assert card["name"] == "mixnet_s"
    assert card["input_size"] == [3, 224, 224] and card["crop_size"] == 224 and card["resize_size"] == 256
    assert card["interpolation"] == "bicubic" and card["mean"] == pytest.approx([0.485, 0.456, 0.406])
    tags = {w["tag"]: w for w in card["pretrained"]}
    assert "mixnet_s.ft_in1k" in tags
    assert tags["mixnet_s.ft_in1k"]["top1"] == WEIGHTS["mixnet_s.ft_in1k"].top1
    assert tags["mixnet_s.ft_in1k"]["file_size"] == WEIGHTS["mixnet_s.ft_in1k"].file_size
    with pytest.raises(MixNetError, match="unknown model"):
        model_card("resnet50")


def test_cli_info_and_list(capsys):
    assert main(["info", "mixnet_s"]) == 0
    out = capsys.readouterr().out
    assert "239.2M" in out and "4,134,606" in out and "mixnet_s.ft_in1k" in out and "bicubic" in out
    assert main(["info", "mixnet_m", "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["name"] == "mixnet_m" and card["macs"] == count_stats("mixnet_m")[1]
    assert main(["info", "nope"]) == 2
    assert main(["list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["mixnet_s"]["macs"] == count_stats("mixnet_s")[1]
    assert "mixnet_s.ft_in1k" in rows["mixnet_s"]["pretrained"]
    assert main(["list"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["model", "params", "MACs"]
    assert any(line.startswith("mixnet_s ") and "239.2M" in line and "ft_in1k" in line for line in table)


def test_card_of_a_weights_tag_shows_that_tags_preprocessing_and_classes(capsys):
    from mixnet.pretrained.checkpoint import PACKAGE_FILES

    entry = WEIGHTS["mixnet_s.imagenette"]
    shipped = json.loads((PACKAGE_FILES / entry.package_file).with_suffix(".json").read_text())["pretrained_cfg"]
    card = model_card("mixnet_s.imagenette")
    assert card["name"] == "mixnet_s" and card["weights"] == "mixnet_s.imagenette"
    assert card["input_size"] == shipped["input_size"] == [3, 176, 176] and card["crop_size"] == 176
    assert card["resize_size"] == int(176 / shipped["crop_pct"]) and card["num_classes"] == 10
    with torch.device("meta"):
        model = create_model("mixnet_s", num_classes=10).eval()
    assert card["params"] == sum(p.numel() for p in model.parameters())  # a 10-class head, not 1000
    assert card["macs"] == macs_by_hooks(model, (3, 176, 176))
    assert model_card("mixnet_s.ft_in1k")["input_size"] == [3, 224, 224]
    assert main(["info", "mixnet_s.imagenette"]) == 0
    out = capsys.readouterr().out
    assert "3x176x176" in out and "classes        10" in out


def test_unknown_weights_tag_is_an_error_naming_the_known_tags(capsys):
    with pytest.raises(MixNetError, match=r"unknown weights tag 'mixnet_s\.bogus' "
                                          r"\(known: mixnet_s\.ft_in1k, mixnet_s\.imagenette\)"):
        model_card("mixnet_s.bogus")
    with pytest.raises(MixNetError, match=r"unknown weights tag 'mixnet_xxl\.x' \(mixnet_xxl has none published\)"):
        model_card("mixnet_xxl.x")
    assert main(["info", "mixnet_s.bogus"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("mixnet info: error: unknown weights tag 'mixnet_s.bogus'")
