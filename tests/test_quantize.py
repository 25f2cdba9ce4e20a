"""INT8 quantization (`mixnet quantize`, deploy/quantize.py) and the --precision paths of predict, validate
and benchmark.

The model is colour_model.py's: its classifier is solved so that colour k gives class k by a margin of 10
logits, so fp32's answers on the generated photos are known, and an INT8 graph whose scales, zero points
or layout were wrong would change logits by far more than the bound checked here.
"""

from __future__ import annotations

import builtins
import json
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from colour_model import COLOURS, write_colour_image
from conftest import needs_bf16
from mixnet.cli import main
from mixnet.deploy import runtimes
from mixnet.deploy.quantize import (BACKENDS, compare_top1, load_batches, load_quantized, min_check_images,
                                    quantize_model, split_photos)
from mixnet.errors import MixNetError
from mixnet.inference.predict import resolve_model

PHOTOS_PER_COLOUR = 20
CALIBRATION_IMAGES = 9  # the other 51 photos are held back for the check: a 98% bar needs at least 50
HELD_BACK = len(COLOURS) * PHOTOS_PER_COLOUR - CALIBRATION_IMAGES
BROKEN_JPEG = (Path(__file__).resolve().parents[1] / "examples" / "tench.jpg").read_bytes()[:300]


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
    assert check.images == HELD_BACK
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
    assert f"top-1 agreement with fp32 100.00% on {HELD_BACK} held-back photos" in out
    assert "top-1 fp32 100.00%, INT8 100.00%" in out
    model = resolve_model(str(output))  # the folder is also an ordinary hub folder: class names kept
    assert model.pretrained_cfg["class_names"] == list(COLOURS)


def test_agreement_counts_disagreements_and_accuracy(colour_model, photos):
    files = [photos / c / "0.png" for c in COLOURS]
    always_red = lambda x: torch.tensor([[1.0, 0.0, 0.0]]).expand(len(x), 3)  # noqa: E731
    check = compare_top1(colour_model, always_red, colour_model, files, labels=[0, 1, 2])
    assert check.images == 3 and check.agreement == pytest.approx(100 / 3)
    assert check.fp32_top1 == 100.0 and check.int8_top1 == pytest.approx(100 / 3)


@pytest.fixture
def without_export(monkeypatch, colour_model):
    """quantize_model with its slow steps faked, for what happens around them: the ONNX export and the
    INT8 graph are empty files, and "running the INT8 graph" runs the fp32 model."""
    def empty_file(path):
        Path(path).write_bytes(b"")
        return Path(path)

    monkeypatch.setattr("mixnet.deploy.quantize.export_model",
                        lambda model, path, fmt, **kwargs: SimpleNamespace(path=empty_file(path)))
    monkeypatch.setattr("mixnet.deploy.quantize.quantize_onnx", lambda source, output, *args: empty_file(output))
    monkeypatch.setattr("mixnet.deploy.quantize.int8_runner", lambda path, backend, num_threads=None: colour_model)


@pytest.fixture
def old_folder(tmp_path):
    """A quantized model folder from an earlier run, to be replaced."""
    folder = tmp_path / "int8"
    folder.mkdir()
    (folder / "quantization.json").write_text('{"backend": "onnxruntime", "graph": "model_int8.onnx"}')
    (folder / "from-the-old-run").write_text("")
    return folder


def test_quantizing_again_replaces_the_folder_whole_with_ordinary_permissions(colour_model, photos, old_folder,
                                                                             without_export):
    quantize_model(colour_model, photos, old_folder, backend="onnxruntime", images=CALIBRATION_IMAGES)
    assert not (old_folder / "from-the-old-run").exists() and (old_folder / "config.json").is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert old_folder.stat().st_mode & 0o777 == 0o777 & ~umask
    assert sorted(p.name for p in old_folder.parent.iterdir()) == ["int8"]  # nothing set aside is left


def test_a_failed_swap_leaves_the_old_quantized_folder_in_place(colour_model, photos, old_folder, without_export,
                                                               monkeypatch):
    rename = Path.rename

    def new_folder_cannot_move_in(self, target):
        if Path(target) == old_folder and not self.name.endswith(".old"):  # the staging folder, not the old one
            raise OSError(28, "No space left on device")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", new_folder_cannot_move_in)
    with pytest.raises(OSError):
        quantize_model(colour_model, photos, old_folder, backend="onnxruntime", images=CALIBRATION_IMAGES)
    assert sorted(p.name for p in old_folder.iterdir()) == ["from-the-old-run", "quantization.json"]


@pytest.mark.skipif("onnxruntime" not in INSTALLED_BACKENDS, reason="onnxruntime not installed")
def test_a_calibration_folder_too_small_for_the_agreement_bar_is_refused_naming_it_and_its_counts(
        weights_dir, tmp_path, capsys):
    few = tmp_path / "few"
    for i in range(3):
        write_colour_image(few / f"{i}.png", "red")
    code = main(["quantize", str(weights_dir), "--calibration", str(few), "--images", "300", "--output",
                 str(tmp_path / "q"), "--backend", "onnxruntime", "--workers", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert str(few) in err and "3 image file(s)" in err and "98% agreement bar needs at least 50 held-back" in err
    assert not (tmp_path / "q").exists()


@pytest.mark.skipif("onnxruntime" not in INSTALLED_BACKENDS, reason="onnxruntime not installed")
def test_unreadable_calibration_photos_are_each_reported_and_none_readable_is_refused_naming_the_folder(
        weights_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for i in range(60):
        (broken / f"{i}.jpg").write_bytes(BROKEN_JPEG)
    code = main(["quantize", str(weights_dir), "--calibration", str(broken), "--images", "9", "--output",
                 str(tmp_path / "q"), "--backend", "onnxruntime", "--workers", "0"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 10  # one line for each of the 9 photos, then the error
    assert all(line.startswith(f"skipped: {broken}/") and "truncated" in line.lower() for line in lines[:9])
    assert str(broken) in lines[-1] and "none of the 9 calibration photos could be read" in lines[-1]


@pytest.mark.parametrize("min_agreement, needed", [(98, 50), (99, 100), (99.9, 1000), (0, 1), (100, 500)])
def test_the_held_back_photos_needed_are_those_on_which_one_disagreement_is_within_the_bar(min_agreement, needed):
    assert min_check_images(min_agreement, check_images=500) == needed


def test_too_few_readable_held_back_photos_for_the_bar_are_refused_naming_the_folder_and_counts(
        colour_model, photos, tmp_path, without_export):
    folder = tmp_path / "mostly-broken"
    for colour in COLOURS:
        shutil.copytree(photos / colour, folder / colour, ignore=lambda d, names: sorted(names)[14:])
    for i in range(30):
        (folder / "red" / f"broken-{i}.jpg").write_bytes(BROKEN_JPEG)
    with pytest.raises(MixNetError) as refused:
        quantize_model(colour_model, folder, tmp_path / "q", backend="onnxruntime", images=CALIBRATION_IMAGES)
    message = str(refused.value)
    assert message.startswith(f"{folder}: ") and "of the 63 held-back photos could be read" in message
    assert "98% agreement bar needs at least 50" in message and not (tmp_path / "q").exists()


def test_unreadable_photos_among_good_ones_are_each_reported_and_left_out(colour_model, photos, tmp_path,
                                                                         without_export, capsys):
    mixed = shutil.copytree(photos, tmp_path / "mixed")
    for colour in ("red", "blue"):
        (mixed / colour / "broken.jpg").write_bytes(BROKEN_JPEG)
    result = quantize_model(colour_model, mixed, tmp_path / "q", backend="onnxruntime", images=CALIBRATION_IMAGES)
    skipped = sorted(line for line in capsys.readouterr().err.splitlines() if line.startswith("skipped: "))
    assert [line.split(": ")[1] for line in skipped] == [str(mixed / c / "broken.jpg") for c in ("blue", "red")]
    assert result.calibration_images + result.check.images == len(COLOURS) * PHOTOS_PER_COLOUR


@pytest.mark.parametrize("backend", INSTALLED_BACKENDS[:1])
def test_an_output_below_a_file_is_refused_in_one_line_before_any_photo_is_read(colour_model, weights_dir, photos,
                                                                                 tmp_path, monkeypatch, capsys,
                                                                                 backend):
    def no_photos(*args, **kwargs):
        raise AssertionError("photos were read before the impossible output was refused")

    monkeypatch.setattr("mixnet.deploy.quantize.load_batches", no_photos)
    (tmp_path / "a-file").write_text("not a folder")
    output = tmp_path / "a-file" / "q"
    with pytest.raises(MixNetError, match="a-file is a file, not a directory"):
        quantize_model(colour_model, photos, output, backend=backend)
    code = main(["quantize", str(weights_dir), "--calibration", str(photos), "--output", str(output),
                 "--backend", backend, "--workers", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"mixnet quantize: error: --output {output}: {tmp_path / 'a-file'} is a file, not a directory"


@pytest.mark.parametrize("backend", INSTALLED_BACKENDS)
def test_a_missing_exporter_is_reported_before_any_photo_is_read(weights_dir, photos, tmp_path, monkeypatch,
                                                                 capsys, backend):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed

    def no_photos(*args, **kwargs):
        raise AssertionError("photos were read before the missing exporter was reported")

    monkeypatch.setattr("mixnet.deploy.quantize.load_batches", no_photos)
    code = main(["quantize", str(weights_dir), "--calibration", str(photos), "--output", str(tmp_path / "q"),
                 "--backend", backend, "--workers", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "needs onnxscript: pip install 'mixnet[onnx]'" in err


def test_an_int8_folder_without_openvino_says_running_its_graph_needs_it(weights_dir, photos, tmp_path,
                                                                         monkeypatch, capsys):
    folder = shutil.copytree(weights_dir, tmp_path / "q1")
    (folder / "quantization.json").write_text('{"backend": "openvino", "graph": "model_int8.xml"}')
    (folder / "model_int8.xml").write_text("")
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed
    code = main(["predict", str(photos / "red"), "--model", str(folder), "--workers", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert f"running the INT8 graph {folder / 'model_int8.xml'} needs openvino: pip install 'mixnet[openvino]'" in err


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


def test_a_quantized_folder_with_another_runtimes_options_says_how_to_run_its_float_weights(quantized, photos,
                                                                                              capsys):
    _, folder, _ = quantized
    assert main(["predict", str(photos / "red"), "--model", str(folder), "--fast"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"mixnet predict: error: {folder} is a quantized model folder: it runs its INT8 graph in a runtime of its "
        f"own; drop --backend/--onnx/--fast, or add --precision fp32 to run its float weights with them")
    assert main(["predict", str(photos / "red"), "--model", str(folder), "--fast", "--precision", "fp32",
                 "--workers", "0"]) == 0
    assert "red" in capsys.readouterr().out


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
