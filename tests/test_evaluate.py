"""mixnet.inference.validate.validate and `mixnet validate`: known accuracies, folder-to-class mapping, timm parity."""

from __future__ import annotations

import json

import pytest
import torch

from colour_model import write_colour_image, write_framed_square
from conftest import counting, shared_data
from mixnet import create_model
from mixnet.cli import main
from mixnet.errors import MixNetError
from mixnet.inference.validate import map_folders_to_classes, validate
from mixnet.data.imagenet import imagenet_class_names, imagenet_wnids


@pytest.fixture
def labelled(tmp_path):
    """8 readable images, 7 in the folder of their colour and one blue image filed under red, plus a
    corrupt file: top-1 must be 7/8."""
    root = tmp_path / "val"
    for i in range(3):
        write_colour_image(root / "red" / f"r{i}.png", "red", (70 + 10 * i, 60))
    write_colour_image(root / "red" / "mislabelled.png", "blue")
    write_colour_image(root / "green" / "g0.jpg", "green")
    write_colour_image(root / "green" / "g1.bmp", "green", (40, 90))
    write_colour_image(root / "blue" / "b0.png", "blue")
    write_colour_image(root / "blue" / "b1.webp", "blue")
    (root / "blue" / "truncated.png").write_bytes((root / "blue" / "b0.png").read_bytes()[:100])
    return root


def test_validate_known_accuracy(colour_model, labelled):
    result = validate(colour_model, labelled, batch_size=3, progress=False)
    assert result.num_images == 8 and result.num_failed == 1
    assert result.failures[0]["image"].endswith("truncated.png") and "truncated" in result.failures[0]["error"]
    assert result.top1 == pytest.approx(100 * 7 / 8)
    assert result.topk == 3 and result.top5 == pytest.approx(100.0)  # 3 classes: the answer is always in top-3
    assert result.classes == ["blue", "green", "red"]
    assert result.class_indices == [2, 1, 0]  # folder names mapped onto the model's class names
    assert result.per_class_accuracy == pytest.approx({"blue": 100.0, "green": 100.0, "red": 75.0})
    assert result.per_class_count == {"blue": 2, "green": 2, "red": 4}
    # rows: true folder class; columns: predicted folder class, then "other"
    assert result.confusion_matrix == [[2, 0, 0, 0], [0, 2, 0, 0], [1, 0, 3, 0]]
    assert result.loss > 0 and result.images_per_sec > 0


def test_cli_validate_json_out_and_exit_code(weights_dir, labelled, tmp_path, capsys):
    out_file = tmp_path / "reports" / "val.json"
    rc = main(["validate", str(labelled), "--weights", str(weights_dir), "--workers", "0", "--batch-size", "4",
               "--out", str(out_file)])
    out, err = capsys.readouterr()
    assert rc == 1  # one unreadable image
    assert "top-1 87.50%" in out and "top-3 100.00%" in out and "truncated.png" in err
    report = json.loads(out_file.read_text())
    assert report["top1"] == pytest.approx(87.5) and report["confusion_matrix"][2] == [1, 0, 3, 0]

    (labelled / "blue" / "truncated.png").unlink()
    rc = main(["validate", str(labelled), "--weights", str(weights_dir), "--workers", "0", "--json"])
    out, _ = capsys.readouterr()
    assert rc == 0
    assert json.loads(out[out.index("{"):])["num_failed"] == 0


def validate_report(capsys, folder, weights, *flags) -> dict:
    assert main(["validate", str(folder), "--weights", str(weights), "--workers", "0", "--json",
                 *map(str, flags)]) == 0
    out = capsys.readouterr().out
    return json.loads(out[out.index("{"):])


def assert_same_report(got: dict, expected: dict):
    assert got["loss"] == pytest.approx(expected["loss"], abs=1e-4)  # every probability counts in it
    for key in ("num_images", "top1", "top5", "confusion_matrix", "per_class_accuracy"):
        assert got[key] == expected[key], key


@pytest.fixture
def readable_labelled(labelled):
    (labelled / "blue" / "truncated.png").unlink()
    return labelled


def test_cli_validate_fast_runs_the_inference_form_with_the_same_report(soft_weights_dir, readable_labelled,
                                                                        capsys, monkeypatch):
    from mixnet.models import fusion

    expected = validate_report(capsys, readable_labelled, soft_weights_dir)
    assert 0.3 < expected["loss"] < 2  # probabilities far from 0 and 1: errors would show
    calls = counting(monkeypatch, fusion, "optimize_for_inference")
    got = validate_report(capsys, readable_labelled, soft_weights_dir, "--fast")
    assert calls == ["optimize_for_inference"]
    assert_same_report(got, expected)


def test_cli_validate_onnxruntime_runs_the_onnx_file_given(soft_weights_dir, biased_onnx, readable_labelled,
                                                           capsys, monkeypatch):
    from mixnet.deploy import export

    biased, onnx_file = biased_onnx
    # The file holds the model with biased logits: eager PyTorch on that model gives the expected report.
    expected = validate(biased, readable_labelled, progress=False).to_dict()
    unbiased = validate_report(capsys, readable_labelled, soft_weights_dir)
    assert abs(expected["loss"] - unbiased["loss"]) > 0.01  # 100 times the tolerance below
    runs = counting(monkeypatch, export.OnnxRuntimeModel, "__call__")
    got = validate_report(capsys, readable_labelled, soft_weights_dir, "--backend", "onnxruntime",
                          "--onnx", onnx_file)
    assert runs
    assert_same_report(got, expected)


def test_cli_validate_image_size_and_crop_pct_set_what_the_model_sees(weights_dir, tmp_path, capsys,
                                                                      monkeypatch):
    from mixnet.models.network import MixNet

    # Each photo is its class colour framed by another: the model's own crop (64 px, 0.875 of the resized
    # photo) sees mostly the frame, a crop of a quarter of it only the square.
    for colour, frame in [("red", "green"), ("green", "blue"), ("blue", "red")]:
        write_framed_square(tmp_path / "val" / colour / "a.png", colour, frame)
    shapes = []
    forward = MixNet.forward
    monkeypatch.setattr(MixNet, "forward", lambda self, x: shapes.append(tuple(x.shape[1:])) or forward(self, x))
    own = validate_report(capsys, tmp_path / "val", weights_dir)
    assert own["top1"] == 0 and shapes == [(3, 64, 64)]
    centre = validate_report(capsys, tmp_path / "val", weights_dir, "--crop-pct", "0.25", "--image-size", "40")
    assert centre["top1"] == 100 and shapes[1:] == [(3, 40, 40)]
    for flags, problem in [(["--crop-pct", "1.5"], "--crop-pct: must be in (0, 1], got 1.5"),
                           (["--image-size", "16"], "--image-size: must be from 32 to 8192, got 16")]:
        with pytest.raises(SystemExit) as exit_info:
            main(["validate", str(tmp_path / "val"), "--weights", str(weights_dir), *flags])
        assert exit_info.value.code == 2 and problem in capsys.readouterr().err


def test_validate_folder_names_must_match(colour_model, weights_dir, tmp_path, capsys):
    write_colour_image(tmp_path / "val" / "red" / "a.png", "red")
    write_colour_image(tmp_path / "val" / "purple" / "a.png", "red")
    with pytest.raises(MixNetError, match="purple") as info:
        validate(colour_model, tmp_path / "val", progress=False)
    assert "red, green, blue" in str(info.value)
    assert main(["validate", str(tmp_path / "val"), "--weights", str(weights_dir), "--workers", "0"]) == 2
    assert "purple" in capsys.readouterr().err
    assert main(["validate", str(tmp_path / "nope"), "--weights", str(weights_dir)]) == 2


# ---------------------------------------------------------------------------------------------
# Folder names onto classes


@pytest.fixture(scope="module")
def imagenet_model():
    with torch.device("meta"):
        return create_model("mixnet_s")


def test_wnid_folders_map_onto_imagenet(imagenet_model):
    # indices from the shared data README, independent of the shipped table
    expected = {"n01440764": 0, "n02102040": 217, "n03888257": 701, "n03445777": 574}
    assert map_folders_to_classes(list(expected), imagenet_model) == expected
    assert map_folders_to_classes(["golf_ball", "Tench"], imagenet_model) == {"golf_ball": 574, "Tench": 0}
    with pytest.raises(MixNetError, match="crane"):  # two ImageNet classes share this name
        map_folders_to_classes(["crane"], imagenet_model)
    with pytest.raises(MixNetError, match="n99999999"):
        map_folders_to_classes(["n01440764", "n99999999"], imagenet_model)


def test_two_folders_naming_one_class_are_refused_not_scored_as_one(colour_model, weights_dir, tmp_path, capsys,
                                                                     imagenet_model):
    # Both would share one row of the confusion matrix: one folder's images counted as the other's, and
    # the first reported with no images at all.
    with pytest.raises(MixNetError, match="'Tench' and 'tench' are both class 0 \\(tench\\)"):
        map_folders_to_classes(["Tench", "tench", "golf_ball"], imagenet_model)
    write_colour_image(tmp_path / "val" / "red" / "a.png", "red")
    write_colour_image(tmp_path / "val" / "Red" / "b.png", "red")
    write_colour_image(tmp_path / "val" / "blue" / "c.png", "blue")
    with pytest.raises(MixNetError, match="'Red' and 'red' are both class 0"):
        validate(colour_model, tmp_path / "val", progress=False)
    assert main(["validate", str(tmp_path / "val"), "--weights", str(weights_dir), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixnet validate: error: folders naming the same class") and len(err.splitlines()) == 1


def test_subset_model_maps_wnids_through_its_names():
    with torch.device("meta"):
        model = create_model("mixnet_s", num_classes=3)
    names = imagenet_class_names()
    model.pretrained_cfg["class_names"] = [names[574], names[0], names[701]]  # golf ball, tench, parachute
    assert map_folders_to_classes(["n01440764", "n03445777", "n03888257"], model) == {
        "n01440764": 1, "n03445777": 0, "n03888257": 2}
    assert map_folders_to_classes(["tench", "golf ball"], model) == {"tench": 1, "golf ball": 0}
    model.pretrained_cfg["class_wnids"] = ["w_a", "w_b", "w_c"]  # the model's own wnids win
    assert map_folders_to_classes(["w_c", "w_a"], model) == {"w_c": 2, "w_a": 0}
    assert imagenet_wnids()[574] == "n03445777"


# ---------------------------------------------------------------------------------------------
# Same numbers as timm


def test_validate_matches_timm_on_imagenette(tmp_path):
    timm = pytest.importorskip("timm")
    from timm.data import create_transform, resolve_data_config
    from timm.data import ImageNetInfo
    from timm.utils import accuracy
    from PIL import Image

    source = shared_data("imagenette2-224", "val")
    size = 128  # the same (reduced) input size on both sides keeps the test fast
    root = tmp_path / "val"
    files = []
    for wnid in sorted(p.name for p in source.iterdir())[:5]:
        (root / wnid).mkdir(parents=True)
        for f in sorted((source / wnid).iterdir())[:2]:
            (root / wnid / f.name).write_bytes(f.read_bytes())
            files.append((root / wnid / f.name, wnid))

    torch.manual_seed(0)
    theirs = timm.create_model("mixnet_s").eval()
    theirs.pretrained_cfg = {**theirs.pretrained_cfg, "input_size": (3, size, size)}
    transform = create_transform(**resolve_data_config({}, model=theirs))
    wnid_index = {w: i for i, w in enumerate(ImageNetInfo().label_names())}
    images = torch.stack([transform(Image.open(p).convert("RGB")) for p, _ in files])
    targets = torch.tensor([wnid_index[w] for _, w in files])
    with torch.no_grad():
        # A head that knows the first image of each class: answers mix right and wrong, not all wrong.
        features = theirs.forward_head(theirs.forward_features(images), pre_logits=True)
        fit = features[::2]
        weight = torch.zeros(1000, fit.shape[1])
        weight[targets[::2]] = 10 * torch.linalg.pinv(fit.T.double()).float()
        theirs.classifier.weight.copy_(weight)
        theirs.classifier.bias.copy_(torch.randn(1000) * 1e-2)  # no ties in the top-5
        top1, top5 = (a.item() for a in accuracy(theirs(images), targets, topk=(1, 5)))
    assert 0 < top1 < 100  # the comparison below is informative

    ours = create_model("mixnet_s").eval()
    ours.load_state_dict(theirs.state_dict())
    ours.pretrained_cfg.update(input_size=(3, size, size))
    result = validate(ours, root, batch_size=4, progress=False)
    assert result.num_images == len(files)
    assert result.top1 == pytest.approx(top1) and result.top5 == pytest.approx(top5)


def test_cli_validate_out_to_a_folder_is_refused_before_the_model_loads(labelled, tmp_path, capsys, monkeypatch):
    from mixnet import cli

    monkeypatch.setattr(cli, "inference_model", lambda args: pytest.fail("the model loaded"))
    assert main(["validate", str(labelled), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"mixnet validate: error: --out {tmp_path}: is a directory; give a file path"
