"""PT2E INT8 (torchao's X86InductorQuantizer) under torch.compile, against fp32 eager, compiled and onnxruntime.

The third INT8 backend issue 14 asked to evaluate (the others, OpenVINO/NNCF and onnxruntime QDQ, ship
in ``mixnet quantize``). Calibrates on photos read with the model's own eval transform, checks top-1
agreement with fp32 (and accuracy, for a labelled folder) on held-back photos, then times every form (at the
model's own input size) side by side in one process, interleaved rounds, medians. Needs ``pip install torchao``.

    python benchmarks/pt2e_int8.py --model mixnet_s.imagenette --calibration ../shared/data/imagenette2-224/train \
        --check ../shared/data/imagenette2-224/val --json pt2e.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import mixnet
from mixnet.deploy.export import OnnxRuntimeModel, export_model
from mixnet.deploy.quantize import compare_top1, load_batches, photo_labels, split_photos


def quantize_pt2e(model: torch.nn.Module, batches) -> torch.nn.Module:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    example = next(iter(batches))[:2]  # batch 1 would be specialised to a constant
    batch = torch.export.Dim("batch", min=1, max=256)
    graph = torch.export.export(model, (example,), dynamic_shapes=({0: batch},)).module()
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for images in batches:
            prepared(images)
    return convert_pt2e(prepared)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mixnet_s.imagenette")
    parser.add_argument("--calibration", required=True)
    parser.add_argument("--check", help="labelled folder of held-back photos (default: held back from --calibration)")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--check-images", type=int, default=500)
    parser.add_argument("--batch-size", default="1,32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # constant-fold the weights: what makes INT8 convs use oneDNN's kernels
    model = mixnet.load_model(args.model).eval()
    calib_files, check_files = split_photos(args.calibration, args.images, args.check_images)
    if args.check:
        _, check_files = split_photos(args.check, 0, args.check_images)
    calib = [x for _, x in load_batches(model, calib_files, batch_size=32)]
    t0 = time.perf_counter()
    int8 = quantize_pt2e(model, calib)
    quantize_s = time.perf_counter() - t0
    onnx_file = Path(tempfile.mkdtemp()) / "model.onnx"
    export_model(model, onnx_file)  # our fastest fp32 path: the merged graph under onnxruntime
    forms = {"fp32-eager": model, "fp32-compiled": torch.compile(model),
             "fp32-onnxruntime": OnnxRuntimeModel(onnx_file, args.threads),
             "int8-pt2e-compiled": torch.compile(int8)}
    labels = photo_labels(args.check or args.calibration, check_files, model)
    result = dict(model=args.model, quantize_s=round(quantize_s, 1), check_images=len(check_files))
    with torch.no_grad():
        t0 = time.perf_counter()
        check = compare_top1(model, forms["int8-pt2e-compiled"], model, check_files, labels)
        result["check"] = dataclasses.asdict(check)
        result["int8_first_compile_and_check_s"] = round(time.perf_counter() - t0, 1)
        timings = {}
        for bs in [int(b) for b in args.batch_size.split(",")]:
            x = torch.randn(bs, *model.pretrained_cfg["input_size"])  # the exported graph's image size
            for f in forms.values():  # compile for this shape, warm up
                f(x), f(x)
            times = {name: [] for name in forms}
            for _ in range(args.rounds):
                for name, f in forms.items():
                    t0 = time.perf_counter()
                    f(x)
                    times[name].append(time.perf_counter() - t0)
            timings[bs] = {name: round(bs / statistics.median(t), 1) for name, t in times.items()}
        result["images_per_s"] = timings
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
