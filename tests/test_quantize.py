"""INT8 quantization (`mixnet quantize`, deploy/quantize.py) and the --precision paths of predict, validate
and benchmark.

The model is colour_model.py's: its classifier is solved so that colour k gives class k by a margin of 10
logits, so fp32's answers on the generated photos are known, and an INT8 graph whose scales, zero points
or layout were wrong would change logits by far more than the bound checked here.
"""

from __future__ import annotations

import builtins
import json

import pytest
import torch

from colour_model import COLOURS, write_colour_image
from conftest import needs_bf16
from mixnet.cli import main
from mixnet.deploy import runtimes
from mixnet.deploy.quantize import (BACKENDS, compare_top1, load_batches, load_quantized,
                                    quantize_model, split_photos)
from mixnet.inference.predict import resolve_model

PHOTOS_PER_COLOUR = 6
CALIBRATION_IMAGES = 9  # the other 9 photos are held back for the check


def has_module(name: str) -> bool:
    try:
        __import__(name)
        return True
    except ImportError:
        return False


BACKEND_MODULES = {"openvino": ("openvino", "nncf"), "onnxruntime": ("onnxruntime",)}
INSTALLED_BACKENDS = [b for b in BACKENDS if all(has_module(m) for m in BACKEND_MODULES[b])]
needs_openvino = pytest.mark.skipif("openvino" not in INSTALLED_BACKENDS, reason="openvino/nncf not installed")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Labelled photos: <colour>/<i>.png, noisy solid colours of varied sizes."""
    root = tmp_path_factory.mktemp("colour-photos")
    for colour in COLOURS:
        for i in range(PHOTOS_PER_COLOUR):
            write_colour_image(root / colour / f"{i}.png", colour, (60 + 7 * i, 50 + 5 * i))
    return root


@pytest.fixture(scope="module", params=INSTALLED_BACKENDS)
def quantized(request, colour_model, photos, tmp_path_factory):
    """(backend, folder, result) of the colour model quantized on 9 of the photos."""
    output = tmp_path_factory.mktemp(f"int8-{request.param}") / "model"
    result = quantize_model(colour_model, photos, output, backend=request.param, images=CALIBRATION_IMAGES)
    return request.param, output, result


def test_int8_model_of_each_backend_agrees_with_fp32_on_held_back_photos(quantized, colour_model, photos):
    backend, folder, result = quantized
    assert result.calibration_images == CALIBRATION_IMAGES
    check = result.check
    assert check.images == len(COLOURS) * PHOTOS_PER_COLOUR - CALIBRATION_IMAGES
    assert check.agreement == 100.0 and check.fp32_top1 == 100.0 and check.int8_top1 == 100.0
    # The INT8 graph read back from the folder, on the held-back photos: every colour seen, same classes
    # as fp32 on each, and logits off by under a third of the 10-logit margin on average (the solved head
    # amplifies feature errors: OpenVINO's INT8 moved them by 1.5 on average, single ones by up to 5.5).
    _, held_back = split_photos(photos, CALIBRATION_IMAGES, 100)
    runner = load_quantized(folder)
    with torch.no_grad():
        for _, x in load_batches(colour_model, held_back):
            expected, got = colour_model(x), runner(x)
            assert got.shape == expected.shape
            assert torch.equal(got.argmax(1), expected.argmax(1))
            assert (got - expected).abs().mean().item() < 3.0
    assert len({p.parent.name for p in held_back}) == len(COLOURS)
    config = json.loads((folder / "quantization.json").read_text())
    assert config["backend"] == backend and (folder / config["graph"]).is_file()


def test_quantized_folder_is_a_model_for_predict_and_validate(quantized, photos, capsys):
    _, folder, _ = quantized
    assert main(["predict", str(photos / "green"), "--model", str(folder), "--json", "--workers", "0"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == PHOTOS_PER_COLOUR and all(r["top"][0]["name"] == "green" for r in lines)
    for precision in ("int8", "fp32"):
        assert main(["validate", str(photos), "--model", str(folder), "--precision", precision, "--json",
                     "--workers", "0"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["top1"] == 100.0 and report["num_images"] == len(COLOURS) * PHOTOS_PER_COLOUR


def test_int8_forward_is_the_quantized_graph_not_the_float_weights(quantized, photos, monkeypatch, capsys):
    """--precision int8 must run the folder's INT8 graph: replace it by one that always says blue."""
    _, folder, _ = quantized
    from mixnet import cli

    def always_blue(path, num_threads=None):
        return lambda x: torch.tensor([[0.0, 0.0, 1.0]]).expand(len(x), 3)

    monkeypatch.setattr("mixnet.deploy.quantize.load_quantized", always_blue)
    assert cli.main(["predict", str(photos / "red"), "--model", str(folder), "--json", "--workers", "0"]) == 0
    assert all(json.loads(line)["top"][0]["name"] == "blue" for line in capsys.readouterr().out.splitlines())


@pytest.mark.skipif("onnxruntime" not in INSTALLED_BACKENDS, reason="onnxruntime not installed")
def test_quantize_command_fails_loudly_and_writes_nothing_below_the_agreement_bar(weights_dir, photos, tmp_path,
                                                                                 monkeypatch, capsys):
    output = tmp_path / "int8"

    def shuffled_classes(path, backend, num_threads=None):  # a "quantization" that gets classes wrong
        return lambda x: torch.roll(torch.eye(3)[torch.arange(len(x)) % 3], 1, dims=1)

    monkeypatch.setattr("mixnet.deploy.quantize.quantize_onnx", lambda source, output, *args: source)
    monkeypatch.setattr("mixnet.deploy.quantize.int8_runner", shuffled_classes)
    code = main(["quantize", str(weights_dir), "--calibration", str(photos), "--images", "9", "--output",
                 str(output), "--backend", "onnxruntime", "--workers", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1
    assert "below the required 98%" in err and "nothing written" in err
    assert not output.exists() and list(tmp_path.iterdir()) == []  # no staging folder left either


@pytest.mark.skipif("onnxruntime" not in INSTALLED_BACKENDS, reason="onnxruntime not installed")
def test_quantize_command_writes_a_folder_and_reports_agreement_and_accuracy(weights_dir, photos, tmp_path, capsys):
    output = tmp_path / "int8"
    assert main(["quantize", str(weights_dir), "--calibration", str(photos), "--images", "9", "--output",
                 str(output), "--backend", "onnxruntime", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "top-1 agreement with fp32 100.00% on 9 held-back photos" in out
    assert "top-1 fp32 100.00%, INT8 100.00%" in out
    model = resolve_model(str(output))  # the folder is also an ordinary hub folder: class names kept
    assert model.pretrained_cfg["class_names"] == list(COLOURS)


def test_agreement_counts_disagreements_and_accuracy(colour_model, photos):
    files = [photos / c / "0.png" for c in COLOURS]
    always_red = lambda x: torch.tensor([[1.0, 0.0, 0.0]]).expand(len(x), 3)  # noqa: E731
    check = compare_top1(colour_model, always_red, colour_model, files, labels=[0, 1, 2])
    assert check.images == 3 and check.agreement == pytest.approx(100 / 3)
    assert check.fp32_top1 == 100.0 and check.int8_top1 == pytest.approx(100 / 3)


def test_missing_backend_package_is_a_one_line_error_naming_the_extra(weights_dir, photos, tmp_path, monkeypatch,
                                                                      capsys):
    real_import = builtins.__import__

    def no_openvino(name, *args, **kwargs):
        if name.split(".")[0] in ("openvino", "nncf"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_openvino)
    monkeypatch.setattr("importlib.import_module", lambda name: no_openvino(name))
    code = main(["quantize", str(weights_dir), "--calibration", str(photos), "--output", str(tmp_path / "q"),
                 "--backend", "openvino"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "pip install 'mixnet[openvino]'" in err
    assert not (tmp_path / "q").exists()


def test_bf16_on_a_cpu_without_it_is_a_one_line_error(weights_dir, photos, monkeypatch, capsys, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse sse2 avx2 avx512f avx512_vnni\n")
    monkeypatch.setattr(runtimes, "CPUINFO", cpuinfo)
    assert runtimes.cpu_flags(cpuinfo) >= {"avx2", "avx512_vnni"}
    for argv in (["predict", str(photos / "red")], ["validate", str(photos)]):
        code = main(argv + ["--weights", str(weights_dir), "--precision", "bf16", "--workers", "0"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "avx512_bf16" in err
    code = main(["benchmark", "--model", "mixnet_s", "--batch-size", "1", "--image-size", "64", "--precision", "bf16",
                 "--repeats", "1", "--warmup", "0", "--json"])
    assert code == 2 and "avx512_bf16" in capsys.readouterr().err


def test_int8_without_a_quantized_folder_is_a_one_line_error(weights_dir, photos, capsys):
    code = main(["predict", str(photos / "red"), "--weights", str(weights_dir), "--precision", "int8"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "mixnet quantize" in err


@needs_openvino
@needs_bf16
def test_bf16_predict_gives_the_fp32_answers(weights_dir, photos, capsys):
    assert main(["predict", str(photos), "--weights", str(weights_dir), "--precision", "bf16", "--json",
                 "--workers", "0"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == len(COLOURS) * PHOTOS_PER_COLOUR
    for r in lines:
        assert r["top"][0]["name"] == r["image"].split("/")[-2]


def test_benchmark_low_precision_paths_measure_graphs_that_match_the_model(capsys):
    """The INT8 and bf16 benchmark paths in smoke mode: each runner's answers are checked against the
    model's before timing, and the timed results come out for every path."""
    from conftest import randomized
    from mixnet.deploy.benchmark import build_path, calibration_arrays, default_paths

    paths = [p for p in default_paths(False, False, False, ["int8", "bf16"])
             if (runtimes.native_bf16() or not p.endswith("-bf16"))
             and ("-openvino" not in p or "openvino" in INSTALLED_BACKENDS)]
    assert "mixnet-onnxruntime-int8" in paths and "mixnet-onnxruntime" in paths
    model = randomized("mixnet_s")  # random statistics and head: logits with a spread, not zeros
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    calibration = calibration_arrays(model, 64, count=8)
    import tempfile
    from pathlib import Path

    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        expected = model(x)
        scale = expected.abs().max().item()
        for path in paths:
            got = build_path(path, model, "mixnet_s", Path(tmp), calibration)(x)
            # Random weights give close logits, so compare values, not classes: INT8 within a quarter of
            # the logit scale, fp32 and bf16 much closer.
            bound = 0.25 if path.endswith("-int8") else 0.05
            assert (got - expected).abs().max().item() < bound * scale, path
    code = main(["benchmark", "--model", "mixnet_s", "--batch-size", "2", "--image-size", "64", "--precision", "int8",
                 "--paths", ",".join(paths), "--repeats", "1", "--warmup", "0", "--json"])
    assert code == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert sorted(r["path"] for r in results) == sorted(paths)
    assert all(r["images_per_s"] > 0 for r in results)
