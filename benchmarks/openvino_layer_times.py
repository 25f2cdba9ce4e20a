"""Where OpenVINO spends the time of one MixNet forward in fp32, bf16 and INT8 (see RESULTS.md).

Exports the model's inference graph (merged MixConvs, or split with --split), quantizes it as
`mixnet quantize --backend openvino` does (NNCF, MIXED preset, full bias correction; random calibration
images, which change no kernel choice), runs each form (bf16 on CPUs with native bf16 only) with
OpenVINO's performance counters on, and
prints the time per (layer type, kernel) summed over the graph, median over the timed calls.

    python benchmarks/openvino_layer_times.py --model mixnet_s --batch-size 1
"""

from __future__ import annotations

import argparse
import collections
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

from mixnet import create_model
from mixnet.deploy.benchmark import calibration_arrays, randomize_batchnorm
from mixnet.deploy.export import export_model
from mixnet.deploy.quantize import quantize_onnx
from mixnet.deploy.runtimes import OpenVinoModel, native_bf16


def by_kernel(p) -> tuple:
    return p.node_type, p.exec_type


def layer_times(path: Path, precision: str, shape, threads: int, calls: int, warmup: int = 3,
                key=by_kernel) -> dict:
    """{key(node): ms per call}, median over ``calls``, from OpenVINO's performance counters; by default
    keyed by (layer type, kernel)."""
    runner = OpenVinoModel(path, precision, threads)
    runner.config["PERF_COUNT"] = True
    x = torch.randn(shape)
    runner(x)
    request = runner.request(tuple(shape))
    times = collections.defaultdict(list)
    for i in range(warmup + calls):
        request.infer({0: x.numpy()})
        if i < warmup:
            continue
        per_call = collections.Counter()
        for p in request.profiling_info:
            if p.status == p.Status.EXECUTED:
                per_call[key(p)] += p.real_time.total_seconds() * 1e3
        for group, ms in per_call.items():
            times[group].append(ms)
    return {group: statistics.median(v) for group, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mixnet_s")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--split", action="store_true", help="MixConvs as separate depthwise convs")
    parser.add_argument("--top", type=int, default=8, help="rows per form")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = randomize_batchnorm(create_model(args.model)).eval()
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_model(model, Path(tmp) / "model.onnx", "onnx", merge_mixconv=not args.split).path
        int8 = quantize_onnx(fp32, Path(tmp) / "int8.xml", calibration_arrays(model, args.image_size), "openvino")
        # bf16 only where native: elsewhere OpenVINO quietly runs the bf16 hint in f32
        forms = [("fp32", fp32, "f32")] + [("bf16", fp32, "bf16")] * native_bf16() + [("int8", int8, "f32")]
        for label, path, precision in forms:
            times = layer_times(path, precision, shape, args.threads, args.calls)
            total = sum(times.values())
            print(f"\n{args.model} {'split' if args.split else 'merged'} batch {args.batch_size} {label}: "
                  f"{total:.2f} ms summed over layers")
            print("| layer type | kernel | ms | share |\n|---|---|---:|---:|")
            for (node, kernel), ms in sorted(times.items(), key=lambda kv: -kv[1])[:args.top]:
                print(f"| {node} | {kernel} | {ms:.2f} | {100 * ms / total:.0f}% |")


if __name__ == "__main__":
    np.random.seed(0)
    main()
