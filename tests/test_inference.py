"""mixnet.predict (mixnet.inference) and `mixnet predict`, with a model whose answers are known (see colour_model.py)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from colour_model import COLOURS, write_colour_image, write_framed_square
from conftest import counting
from mixnet.cli import main
from mixnet.errors import MixNetError
from mixnet.inference.predict import class_names, predict


@pytest.fixture
def images(tmp_path):
    """red, green, blue images in several formats and sizes, one nested, plus a corrupt file."""
    folder = tmp_path / "images"
    write_colour_image(folder / "a_red.png", "red", (120, 90))
    write_colour_image(folder / "b_green.jpg", "green", (50, 70))
    write_colour_image(folder / "nested" / "c_blue.webp", "blue", (64, 64))
    (folder / "b_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return folder


def test_predict_folder_top_classes_and_failures(colour_model, images):
    results = predict(colour_model, images, topk=2, batch_size=2)
    by_name = {r.source.rsplit("/", 1)[-1]: r for r in results}
    assert [r.source.rsplit("/", 1)[-1] for r in results] == ["a_red.png", "b_corrupt.jpg", "b_green.jpg",
                                                               "c_blue.webp"]
    for name, colour in [("a_red.png", "red"), ("b_green.jpg", "green"), ("c_blue.webp", "blue")]:
        r = by_name[name]
        assert r.ok and len(r.top) == 2
        assert r.top[0].name == colour and r.top[0].index == list(COLOURS).index(colour)
        assert r.top[0].probability > 0.99 and r.top[0].probability >= r.top[1].probability
    bad = by_name["b_corrupt.jpg"]
    assert not bad.ok and bad.top == [] and "b_corrupt.jpg" in bad.source


def test_predict_accepts_pil_images_and_single_path(colour_model, images):
    pil = Image.open(images / "a_red.png").convert("L").convert("RGB")  # grey: still a valid input
    single = predict(colour_model, images / "b_green.jpg", topk=10)
    assert len(single) == 1 and single[0].top[0].name == "green"
    assert len(single[0].top) == 3  # topk is capped at the number of classes
    in_memory = predict(colour_model, [Image.open(images / "nested" / "c_blue.webp"), pil])
    assert in_memory[0].top[0].name == "blue" and in_memory[0].source == "<image 0>"
    assert in_memory[1].ok


def test_predict_forward_can_be_swapped(colour_model, images):
    calls = []

    def always_blue(x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return torch.tensor([[0.0, 0.0, 5.0]]).expand(x.shape[0], 3)

    results = predict(colour_model, images, forward=always_blue, batch_size=8)
    assert all(r.top[0].name == "blue" for r in results if r.ok)
    assert calls == [(3, 3, 64, 64)]  # the model's preprocessing, three readable images


def test_predict_restores_training_mode(colour_model, images):
    colour_model.train()
    try:
        assert predict(colour_model, images / "a_red.png")[0].top[0].name == "red"
        assert colour_model.training
    finally:
        colour_model.eval()


def test_predict_image_size_and_crop_pct_set_what_the_model_sees(colour_model, tmp_path):
    write_framed_square(tmp_path / "framed.png", "blue", "red")
    shapes = []

    def forward(x):
        shapes.append(tuple(x.shape[1:]))
        return colour_model(x)

    # The model's own crop (0.875 of the resized photo) sees mostly the red frame, a quarter of it the square.
    assert predict(colour_model, tmp_path, topk=1, forward=forward)[0].top[0].name == "red"
    centre = predict(colour_model, tmp_path, topk=1, forward=forward, image_size=48, crop_pct=0.25)
    assert centre[0].top[0].name == "blue" and shapes == [(3, 64, 64), (3, 48, 48)]


def test_cli_predict_crop_pct_sets_what_the_model_sees(weights_dir, tmp_path, capsys):
    framed = write_framed_square(tmp_path / "framed.png", "blue", "red")
    for flags, answer in [([], "red"), (["--crop-pct", "0.25", "--image-size", "48"], "blue")]:
        assert main(["predict", str(framed), "--weights", str(weights_dir), "--topk", "1", "--json", *flags]) == 0
        assert json.loads(capsys.readouterr().out)["top"][0]["name"] == answer


def test_class_names_fallbacks():
    from mixnet import create_model
    from mixnet.data.imagenet import imagenet_class_names

    with torch.device("meta"):
        imagenet = create_model("mixnet_s")
        small = create_model("mixnet_s", num_classes=4)
    assert class_names(imagenet) == imagenet_class_names()
    assert class_names(small) == ["class_0", "class_1", "class_2", "class_3"]


def test_predict_errors(colour_model, tmp_path):
    with pytest.raises(MixNetError, match="no such file"):
        predict(colour_model, tmp_path / "missing")
    with pytest.raises(MixNetError, match="no images"):
        predict(colour_model, tmp_path)
    with pytest.raises(MixNetError, match="topk"):
        predict(colour_model, tmp_path, topk=0)


# ---------------------------------------------------------------------------------------------
# The command


def test_cli_predict_json_and_exit_codes(weights_dir, images, capsys):
    rc = main(["predict", str(images), "--weights", str(weights_dir), "--topk", "1", "--json", "--workers", "0"])
    out, err = capsys.readouterr()
    assert rc == 1  # the corrupt file
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 4
    answers = {d["image"].rsplit("/", 1)[-1]: d for d in lines}
    assert answers["a_red.png"]["top"][0]["name"] == "red"
    assert answers["b_green.jpg"]["top"][0]["name"] == "green"
    assert answers["c_blue.webp"]["top"][0]["name"] == "blue"
    assert "error" in answers["b_corrupt.jpg"] and "b_corrupt.jpg" in err

    (images / "b_corrupt.jpg").unlink()
    rc = main(["predict", str(images / "a_red.png"), str(images / "nested"), "--weights", str(weights_dir),
               "--workers", "0"])
    out, _ = capsys.readouterr()
    assert rc == 0
    assert "a_red.png" in out and "red (0)" in out and "blue (2)" in out


def test_cli_predict_exits_2_when_no_image_could_be_read_as_validate_does(weights_dir, tmp_path, capsys):
    for i in range(3):
        (tmp_path / "val" / "red").mkdir(parents=True, exist_ok=True)
        (tmp_path / "val" / "red" / f"{i}.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    assert main(["predict", str(tmp_path / "val"), "--weights", str(weights_dir), "--workers", "0"]) == 2
    assert "3 of 3 images could not be classified" in capsys.readouterr().err
    assert main(["validate", str(tmp_path / "val"), "--weights", str(weights_dir), "--workers", "0"]) == 2
    assert "none of the 3 images could be read" in capsys.readouterr().err


def test_cli_predict_usage_errors(weights_dir, images, capsys):
    assert main(["predict", str(images / "missing.jpg"), "--weights", str(weights_dir)]) == 2
    assert "missing.jpg" in capsys.readouterr().err
    assert main(["predict", str(images), "--weights", str(images / "nope")]) == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(images), "--topk", "0"])
    assert exit_info.value.code == 2


# ---------------------------------------------------------------------------------------------
# --fast and --backend onnxruntime: the flag takes effect and gives the same probabilities


@pytest.fixture
def colour_images(tmp_path):
    return [write_colour_image(tmp_path / "in" / f"{colour}.png", colour) for colour in COLOURS]


def cli_probabilities(capsys, files, weights, *flags):
    """``mixnet predict --json`` run on ``files``: image name -> the probability of every class, by index."""
    assert main(["predict", *map(str, files), "--weights", str(weights), "--topk", str(len(COLOURS)),
                 "--json", "--workers", "0", *map(str, flags)]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(answers) == len(files)
    return {a["image"].rsplit("/", 1)[-1]: torch.tensor([p for _, p in sorted((c["index"], c["probability"])
                                                                             for c in a["top"])])
            for a in answers}


def assert_same_probabilities(got, expected):
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-4)


def test_cli_predict_fast_runs_the_inference_form_with_the_same_probabilities(
        soft_weights_dir, colour_images, capsys, monkeypatch):
    from mixnet.models import fusion

    expected = cli_probabilities(capsys, colour_images, soft_weights_dir)
    assert all(0.2 < p.max() < 0.8 for p in expected.values())  # not saturated: errors would show
    calls = counting(monkeypatch, fusion, "optimize_for_inference")
    got = cli_probabilities(capsys, colour_images, soft_weights_dir, "--fast")
    assert calls == ["optimize_for_inference"]
    assert_same_probabilities(got, expected)


def test_cli_predict_onnxruntime_exports_and_runs_onnxruntime_with_the_same_probabilities(
        soft_weights_dir, colour_images, capsys, monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from mixnet.deploy import export

    expected = cli_probabilities(capsys, colour_images, soft_weights_dir)
    exports = counting(monkeypatch, export, "export_model")
    runs = counting(monkeypatch, export.OnnxRuntimeModel, "__call__")
    got = cli_probabilities(capsys, colour_images, soft_weights_dir, "--backend", "onnxruntime")
    assert exports == ["export_model"] and len(runs) >= 1
    assert_same_probabilities(got, expected)


def test_cli_predict_runs_the_onnx_file_given(soft_weights_dir, biased_onnx, colour_images, capsys, monkeypatch):
    from mixnet.deploy import export

    biased, onnx_file = biased_onnx
    # The file holds a model with other logits than --weights: its answers show the file ran.
    expected = {path.name: r.softmax(0) for path, r in zip(colour_images, logits_of(biased, colour_images))}
    unbiased = cli_probabilities(capsys, colour_images, soft_weights_dir)
    assert all((expected[k] - unbiased[k]).abs().max() > 0.05 for k in expected)
    exports = counting(monkeypatch, export, "export_model")
    got = cli_probabilities(capsys, colour_images, soft_weights_dir, "--backend", "onnxruntime",
                            "--onnx", onnx_file)
    assert exports == []  # the file is used as it is
    assert_same_probabilities(got, expected)
    assert main(["predict", str(colour_images[0]), "--weights", str(soft_weights_dir), "--onnx",
                 str(onnx_file)]) == 2
    assert "--onnx FILE needs --backend onnxruntime" in capsys.readouterr().err


def logits_of(model, files):
    """Eager PyTorch logits of image files, preprocessed by the model's own evaluation transform."""
    from mixnet.data.images import build_eval_transform, load_image

    transform = build_eval_transform(model)
    with torch.no_grad():
        return model.eval()(torch.stack([transform(load_image(f)) for f in files]))


def test_predict_reports_a_truncated_in_memory_image_and_classifies_the_rest(colour_model, images, tmp_path):
    Image.effect_noise((64, 64), 60).convert("RGB").save(tmp_path / "whole.png")  # incompressible
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    answers = predict(colour_model, [Image.open(tmp_path / "cut.png"), images / "b_green.jpg"])
    assert not answers[0].ok and "truncated" in answers[0].error and answers[0].source == "<image 0>"
    assert answers[1].top[0].name == "green"


@pytest.mark.parametrize("flag,value,problem", [("--image-size", "16", "must be from 32 to 8192, got 16"),
                                                ("--workers", "-1", "must be at least 0, got -1"),
                                                ("--workers", "two", "invalid int value: 'two'")])
def test_cli_predict_refuses_sizes_the_network_cannot_take_and_negative_workers(images, capsys, flag, value,
                                                                                problem):
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(images), flag, value])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"mixnet predict: error: argument {flag}: {problem}"


def test_a_reader_that_goes_away_ends_the_command_quietly(monkeypatch, capsys):
    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

        def fileno(self):
            raise OSError("not a file")

    monkeypatch.setattr("sys.stdout", ClosedPipe())
    assert main(["info", "mixnet_s"]) == 141  # as a program killed by SIGPIPE, without a traceback


def test_predict_classifies_an_image_too_thin_to_resize_whole_and_the_rest(colour_model, images, tmp_path):
    # 11 million x 1 pixels (11 KB of PNG): resized whole, its short side to the crop's, it would be
    # billions of pixels wide, more than Pillow can make.
    Image.new("RGB", (11_000_000, 1), (40, 200, 40)).save(tmp_path / "thin.png")
    answers = predict(colour_model, [tmp_path / "thin.png", images / "a_red.png"])
    assert [a.top[0].name for a in answers] == ["green", "red"]


def test_an_image_the_transform_cannot_process_fails_alone(images):
    from mixnet.data.images import FailedSample, ImageList

    def fails_on_green(img):
        if img.getpixel((0, 0))[1] > 150:
            raise OverflowError("signed integer is greater than maximum")
        return img.size

    samples = ImageList([images / "b_green.jpg", images / "a_red.png"], fails_on_green)
    assert samples[0] == FailedSample(str(images / "b_green.jpg"),
                                      "cannot be preprocessed: signed integer is greater than maximum", 0)
    assert samples[1] == (Image.open(images / "a_red.png").size, 1)

