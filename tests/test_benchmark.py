"""The benchmark runs end to end in a smoke mode (tiny repeats); its numbers are not asserted."""

import json

import pytest
import torch

from mixnet.deploy.benchmark import (build_train_step, default_paths, format_table, randomize_batchnorm, ratios,
                                     run_benchmark)
from mixnet.cli import main
from mixnet.errors import MixNetError
from mixnet.factory import create_model

SMOKE = dict(image_size=64, warmup=0, repeats=2, show_progress=False)


def test_inference_smoke_measures_every_path_and_compares_with_timm():
    pytest.importorskip("timm")
    paths = ["mixnet", "mixnet-fast", "timm", "timm-cl"]
    results = run_benchmark(["tf_mixnet_s"], [1, 2], paths, **SMOKE)
    assert [(r.batch_size, r.path) for r in results] == [(b, p) for b in (1, 2) for p in paths]
    for r in results:
        assert r.images_per_s > 0 and r.latency_p95_ms >= r.latency_p50_ms > 0
    rows = ratios(results)
    assert [row["batch_size"] for row in rows] == [1, 2]
    assert all(row["ours"].startswith("mixnet") and row["vs_timm_best_eager"] > 0 for row in rows)
    assert "ours/timm tf_mixnet_s infer batch 2" in format_table(results)


def test_training_step_smoke_updates_weights():
    results = run_benchmark(["mixnet_s"], [2], ["mixnet"], train=True, **SMOKE)
    assert results[0].mode == "train" and results[0].images_per_s > 0
    # the timed step is a real training step: repeated on one batch, it fits that batch
    torch.manual_seed(0)
    step = build_train_step("mixnet", create_model("mixnet_s"), "mixnet_s", batch_size=2)
    x = torch.randn(2, 3, 64, 64)
    losses = [float(step(x)) for _ in range(8)]
    assert losses[-1] < 0.8 * losses[0], losses


def test_flags_choose_paths():
    assert default_paths(fast=False, compare_timm=False, train=False) == ["mixnet"]
    fast_vs_timm = default_paths(fast=True, compare_timm=True, train=False)
    assert {"mixnet-fast", "mixnet-onnxruntime", "timm-compile", "timm-onnxruntime"} <= set(fast_vs_timm)
    assert default_paths(fast=False, compare_timm=True, train=True) == ["mixnet", "mixnet-cl", "timm", "timm-cl"]


def test_randomized_batchnorm_changes_the_statistics():
    model = randomize_batchnorm(create_model("mixnet_s"))
    assert model.bn1.running_var.std() > 0.1 and model.bn1.running_mean.abs().max() > 0.1


def test_unknown_path_is_a_usage_error(capsys):
    with pytest.raises(MixNetError, match="timm-fastest"):
        run_benchmark(["mixnet_s"], [1], ["timm-fastest"], **SMOKE)
    assert main(["benchmark", "--paths", "mixnet,timm-fastest", "--repeats", "1"]) == 2
    assert "timm-fastest" in capsys.readouterr().err


def test_an_unknown_model_or_a_size_under_32_or_over_8192_is_refused_in_one_line_before_any_work(capsys):
    with pytest.raises(MixNetError, match="image size 16 is too small"):
        run_benchmark(["mixnet_s"], [1], ["mixnet"], **{**SMOKE, "image_size": 16})
    assert main(["benchmark", "--model", "mixnet_s", "mixnet_q", "--repeats", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixnet benchmark: error: unknown model 'mixnet_q'") and "round" not in err
    with pytest.raises(SystemExit) as usage:
        main(["benchmark", "--image-size", "8"])
    assert usage.value.code == 2 and "must be from 32 to 8192, got 8" in capsys.readouterr().err
    for command in ("benchmark", "predict examples", "validate examples"):  # gigabytes per image: a typo
        with pytest.raises(SystemExit) as usage:
            main([*command.split(), "--image-size", "100000"])
        assert usage.value.code == 2 and "--image-size: must be from 32 to 8192, got 100000" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["benchmark", "--warmup", "-1"])


def test_bf16_or_a_missing_runtime_is_refused_in_one_line_before_any_path_is_built(capsys, monkeypatch, tmp_path):
    import sys

    from mixnet.deploy import benchmark, runtimes

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse sse2 avx2\n")  # Zen 3: no bf16
    monkeypatch.setattr(runtimes, "CPUINFO", cpuinfo)
    monkeypatch.setattr(benchmark, "build_path", lambda *a, **k: pytest.fail("built a path before refusing"))
    assert main(["benchmark", "--model", "mixnet_s", "--batch-size", "1", "--image-size", "64", "--precision",
                 "bf16", "--repeats", "1", "--warmup", "0", "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("mixnet benchmark: error: --precision bf16 needs")
    assert len(captured.err.splitlines()) == 1
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    assert main(["benchmark", "--paths", "mixnet,mixnet-onnxruntime", "--image-size", "64", "--repeats", "1"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("mixnet benchmark: error: the benchmark path mixnet-onnxruntime needs onnxruntime: "
                           "pip install 'mixnet[onnx]'")


def test_cli_json_smoke(capsys):
    pytest.importorskip("timm")
    code = main(["benchmark", "--model", "mixnet_s", "--batch-size", "1", "--image-size", "64",
                 "--warmup", "0", "--repeats", "1", "--compare", "timm", "--json", "--threads",
                 str(torch.get_num_threads())])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert {r["path"] for r in report["results"]} == {"mixnet", "timm", "timm-cl"}
    assert report["ratios"][0]["model"] == "mixnet_s"
