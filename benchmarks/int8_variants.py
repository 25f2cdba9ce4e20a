"""INT8 graphs that keep the depthwise convs in float, against bf16 and fp32 (see RESULTS.md).

OpenVINO's CPU plugin runs depthwise convs in f32 even in an INT8 graph, and the FakeQuantize nodes
around them become separate elementwise passes. This script quantizes the merged graph as
`mixnet quantize --backend openvino` does (NNCF, MIXED preset, full bias correction) and three variants:
depthwise convs left out of quantization (NNCF ``ignored_scope``), with MIXED (asymmetric activations)
or PERFORMANCE (symmetric) presets; and INT8 only in the blocks where the shipped INT8 graph ran faster
than the float graph (OpenVINO's per-node times summed per block, as in mixconv_merge_choice.py),
every other block float. Each INT8 graph runs with OpenVINO's f32 precision hint and, on a CPU with
native bf16, the bf16 hint too (the hint sets the precision of the float parts). All are timed side by
side with our fp32 onnxruntime path and the float graph under OpenVINO (bf16 where native, else f32),
interleaved in one process. Speed only: random weights, random calibration images.

    python benchmarks/int8_variants.py --model mixnet_s --batch-size 1 --rounds 30
"""

from __future__ import annotations

import argparse
import contextlib
import re
import statistics
import sys
import tempfile
from pathlib import Path

import nncf
import openvino as ov
import torch

from mixnet import create_model
from mixnet.deploy.benchmark import calibration_arrays, measure, randomize_batchnorm
from mixnet.deploy.export import OnnxRuntimeModel, export_model
from mixnet.deploy.runtimes import OpenVinoModel, native_bf16
# benchmarks/, beside this script
from mixconv_merge_choice import block_of_node, block_order, name_nodes_by_block
from openvino_layer_times import layer_times


def depthwise_conv_names(model) -> list:
    """OpenVINO names of the depthwise convs: GroupConvolutions with one channel per group, k > 1."""
    names = []
    for op in model.get_ops():
        if op.get_type_name() == "GroupConvolution":
            groups, out_per_group, in_per_group, k, _ = op.input(1).get_partial_shape().to_shape()
            if out_per_group == in_per_group == 1 and k > 1:
                names.append(op.get_friendly_name())
    return names


def faster_in_float(source: Path, int8: Path, shape, threads: int, hint: str, calls: int = 20) -> list:
    """The blocks whose nodes took less time in the float graph than in the INT8 one, both under the
    precision hint ``hint`` (per-node times summed per block; nodes are named after their block)."""
    float_ms = layer_times(source, hint, shape, threads, calls, key=block_of_node)
    int8_ms = layer_times(int8, hint, shape, threads, calls, key=block_of_node)
    for block in sorted(float_ms, key=block_order):
        print(f"| {block} | {hint} {float_ms[block]:.3f} ms | int8 {int8_ms.get(block, 0.0):.3f} ms |",
              file=sys.stderr)
    return [b for b in float_ms if b != "other" and float_ms[b] <= int8_ms.get(b, float("inf"))]


def quantize(source: Path, output: Path, calibration, float_depthwise: bool, preset, float_blocks=()) -> Path:
    model = ov.Core().read_model(str(source))
    ignored = nncf.IgnoredScope(names=depthwise_conv_names(model) if float_depthwise else [],
                                patterns=[re.escape(b) + r"\|.*" for b in float_blocks], validate=False)
    with contextlib.redirect_stdout(sys.stderr):
        quantized = nncf.quantize(model, nncf.Dataset(list(calibration)), subset_size=len(calibration),
                                  preset=preset, fast_bias_correction=False, ignored_scope=ignored)
    ov.save_model(quantized, str(output), compress_to_fp16=False)
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mixnet_s")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    # bf16 is emulated (slower than fp32) on CPUs without native bf16: there the float parts run in f32
    hints, best = (("f32", "bf16"), "bf16") if native_bf16() else (("f32",), "f32")
    nncf.set_log_level(40)  # errors only: NNCF lists every node it leaves float
    torch.manual_seed(0)
    model = randomize_batchnorm(create_model(args.model)).eval()
    calibration = calibration_arrays(model, 224)
    variants = {"int8 (shipped)": (False, nncf.QuantizationPreset.MIXED),
                "int8, depthwise float": (True, nncf.QuantizationPreset.MIXED),
                "int8, depthwise float, symmetric": (True, nncf.QuantizationPreset.PERFORMANCE)}
    with tempfile.TemporaryDirectory() as tmp:
        source = export_model(model, Path(tmp) / "model.onnx", "onnx").path
        name_nodes_by_block(source)
        runners = {"onnxruntime fp32": OnnxRuntimeModel(source, args.threads),
                   f"openvino {best}": OpenVinoModel(source, best, args.threads)}
        shape = (args.batch_size, 3, 224, 224)
        for i, (label, (float_depthwise, preset)) in enumerate(variants.items()):
            graph = quantize(source, Path(tmp) / f"int8-{i}.xml", calibration, float_depthwise, preset)
            for hint in hints:
                runners[f"openvino {label}, {hint} hint"] = OpenVinoModel(graph, hint, args.threads)
            if i == 0:
                float_blocks = faster_in_float(source, graph, shape, args.threads, best)
                print(f"blocks faster in {best} than in INT8: {', '.join(sorted(float_blocks)) or 'none'}")
                graph = quantize(source, Path(tmp) / "int8-chosen.xml", calibration, False, preset, float_blocks)
                runners[f"openvino int8 where faster, {best} hint"] = OpenVinoModel(graph, best, args.threads)
        x = torch.randn(shape)
        times = measure(runners, x, warmup=3, repeats=args.rounds)
    base = statistics.median(times["onnxruntime fp32"])
    print(f"{args.model} batch {args.batch_size}, {args.rounds} interleaved rounds: images/s (x onnxruntime fp32)")
    for name, seconds in times.items():
        median = statistics.median(seconds)
        print(f"| {name} | {args.batch_size / median:.1f} x{base / median:.2f} |")


if __name__ == "__main__":
    main()
