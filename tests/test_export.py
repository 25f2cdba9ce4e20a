"""Exported files (TorchScript for every variant, ONNX via onnxruntime, pt2) reproduce the eval model."""

import json

import pytest
import torch

from conftest import randomized
from mixnet import list_models
from mixnet.cli import main
from mixnet.errors import MixNetError
from mixnet.deploy.export import EXPORTERS, compare_with_model, export_model, format_from_path, load_exported

TOLERANCE = 1e-4
SHAPES = [(1, 3, 224, 224), (3, 3, 97, 131)]  # batch 1 at the native size; batch 3, odd, non-square
QUICK_CHECK = [(2, 3, 64, 64)]  # the exporter's own check, kept small; the tests compare at SHAPES


@pytest.mark.parametrize("name", list_models())
def test_torchscript_export_matches_eval_model(name, tmp_path):
    model = randomized(name)
    result = export_model(model, tmp_path / f"{name}.ts", check_shapes=QUICK_CHECK)
    assert result.max_diff < TOLERANCE
    assert compare_with_model(load_exported(result.path), model, SHAPES, seed=5) < TOLERANCE


@pytest.mark.parametrize("name", ["mixnet_s", "tf_mixnet_s"])
def test_onnx_export_runs_in_onnxruntime_with_dynamic_batch_and_size(name, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = randomized(name)
    result = export_model(model, tmp_path / f"{name}.onnx", check_shapes=QUICK_CHECK)
    session = load_exported(result.path)
    assert compare_with_model(session, model, SHAPES + [(2, 3, 32, 45)], seed=5) < TOLERANCE


def test_pt2_export_matches_eval_model_at_several_shapes(tmp_path):
    model = randomized("tf_mixnet_s")  # "SAME" padding computed per input size: the harder graph
    result = export_model(model, tmp_path / "m.pt2", check=False)  # no self-check: this test is the check
    assert result.format == "pt2"
    program = torch.export.load(str(result.path)).module()  # torch's own loader, not ours
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for shape in SHAPES + [(2, 3, 33, 40)]:  # dynamic batch and size, down to the smallest dynamic size
            x = torch.randn(shape, generator=generator)
            expected = model(x)
            assert expected.abs().max() > 0.1  # logits large enough for the tolerance to mean something
            torch.testing.assert_close(program(x), expected, rtol=0, atol=TOLERANCE)


def test_export_that_disagrees_fails_loudly_and_writes_nothing(tmp_path, monkeypatch):
    model = randomized("mixnet_s")
    exporter = EXPORTERS["torchscript"]

    def perturbed(module, example):
        with torch.no_grad():
            module.classifier.bias.add_(1e-3)  # a small error the check must catch
        return exporter(module, example)

    monkeypatch.setitem(EXPORTERS, "torchscript", perturbed)
    with pytest.raises(MixNetError, match="differs from PyTorch"):
        export_model(model, tmp_path / "bad.ts", check_shapes=QUICK_CHECK)
    assert list(tmp_path.iterdir()) == []


def test_format_and_file_errors_name_the_file(tmp_path):
    with pytest.raises(MixNetError, match="model.xyz"):
        format_from_path(tmp_path / "model.xyz")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(MixNetError, match="garbage.onnx"):
        load_exported(garbage)
    with pytest.raises(MixNetError, match="missing.ts"):
        load_exported(tmp_path / "missing.ts")


def test_cli_export_writes_a_checked_file(tmp_path, capsys):
    out = tmp_path / "s.ts"
    assert main(["export", "mixnet_s", "--random-weights", "--output", str(out), "--json"]) == 0
    assert "\"max_diff\"" in capsys.readouterr().out
    x = torch.randn(1, 3, 64, 64)
    assert load_exported(out)(x).shape == (1, 1000)
    assert main(["export", "mixnet_q", "--random-weights", "-o", str(tmp_path / "q.ts")]) == 2
    assert "mixnet_q" in capsys.readouterr().err
    assert main(["export", "mixnet_s", "--random-weights", "--weights", str(out), "-o", str(tmp_path / "r.ts")]) == 2
    assert "--random-weights and --weights contradict each other" in capsys.readouterr().err
    assert not (tmp_path / "r.ts").exists()


def test_cli_export_of_random_weights_has_logits_for_its_check_to_compare(tmp_path, capsys):
    # Zero-initialised residual branches and classifier would give all-zero logits: the check after
    # writing would compare zeros with zeros and pass whatever the exported graph computes.
    out = tmp_path / "s.ts"
    assert main(["export", "mixnet_s", "--random-weights", "-o", str(out), "--json"]) == 0
    capsys.readouterr()
    logits = load_exported(out)(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    assert logits.abs().max() > 0.1 and logits.std(dim=1).min() > 0


def test_an_output_where_nothing_can_be_created_is_refused_in_one_line_before_any_work(tmp_path, capsys,
                                                                                      monkeypatch):
    from pathlib import Path

    locked = Path("/proc")  # no file can be created there, not even by root (chmod cannot stop root)
    if not (locked / "self").is_dir():
        pytest.skip("needs Linux's /proc")

    def no_work(*args, **kwargs):
        pytest.fail("the work ran before the unwritable output was refused")

    monkeypatch.setattr("mixnet.deploy.export.export_model", no_work)
    monkeypatch.setattr("mixnet.cli.inference_model", no_work)
    monkeypatch.setattr("mixnet.inference.predict.resolve_model", no_work)
    (tmp_path / "n01440764").mkdir()
    (tmp_path / "n01440764" / "a.png").write_bytes(b"")
    for argv, what in ((["export", "mixnet_s", "--random-weights", "-o", str(locked / "m.onnx")], "--output"),
                       (["validate", str(tmp_path), "--out", str(locked / "r.json")], "--out"),
                       (["quantize", "mixnet_s.imagenette", "--calibration", str(tmp_path), "-o", str(locked / "q")],
                        "--output")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"mixnet {argv[0]}: error: {what} {locked}/") and "cannot create files in /proc" in err
        assert len(err.splitlines()) == 1


def test_a_checked_onnx_export_without_onnxruntime_is_refused_before_exporting(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    monkeypatch.setitem(EXPORTERS, "onnx", lambda *a: pytest.fail("exported before refusing"))
    assert main(["export", "mixnet_s", "--random-weights", "-o", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixnet export: error: checking an ONNX export runs it in onnxruntime: pip install "
                          "'mixnet[onnx]'") and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_export_check_scales_with_the_logits(tmp_path):
    # A trained model's logits on noise reach the hundreds; fp32 rounding then exceeds 1e-4 absolute, so
    # the check is relative to the logit scale: the export passes, and the absolute error stays tiny
    # compared with the logits.
    model = randomized("mixnet_s")
    with torch.no_grad():
        model.classifier.weight.mul_(1000.0)
    result = export_model(model, tmp_path / "big.ts", check_shapes=QUICK_CHECK)
    absolute = compare_with_model(load_exported(result.path), model, QUICK_CHECK)
    relative = compare_with_model(load_exported(result.path), model, QUICK_CHECK, relative=True)
    assert result.max_diff < TOLERANCE and relative < TOLERANCE
    assert absolute > relative


def test_cli_export_output_folder_is_refused_before_exporting_and_unchecked_json_is_strict(tmp_path, capsys,
                                                                                           monkeypatch):
    from mixnet.deploy import export

    (tmp_path / "folder.onnx").mkdir()
    monkeypatch.setattr(export, "export_model", lambda *a, **k: pytest.fail("exported to a folder"))
    assert main(["export", "mixnet_s", "--random-weights", "-o", str(tmp_path / "folder.onnx")]) == 2
    assert capsys.readouterr().err.strip() == \
        f"mixnet export: error: --output {tmp_path / 'folder.onnx'}: is a directory; give a file path"
    monkeypatch.undo()
    assert main(["export", "mixnet_s", "--random-weights", "-o", str(tmp_path / "s.ts"), "--no-check", "--json"]) == 0
    report = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert report["max_diff"] is None and report["checked_shapes"] == []
