"""mixnet: one subcommand per job, each a thin layer over the Python API.

Exit codes: 0 success; 1 the job ran but some inputs failed (or, for train, the run diverged); 2 usage or
input errors (among them an input of which nothing could be read); 3 a training run stopped at
--max-minutes (checkpointed: --resume continues it); 130 interrupted (a training run checkpoints first);
141 the reader of the output went away.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import warnings
from typing import List, Optional

from . import __version__
from .errors import MixNetError


def cmd_list(args: argparse.Namespace) -> int:
    from .info import format_count, model_stats
    from .models.architectures import MODELS
    from .pretrained.registry import list_pretrained

    stats = model_stats()
    rows = [dict(name=name, params=stats[name]["params"], macs=stats[name]["macs"],
                 pretrained=list_pretrained(name), description=MODELS[name].description)
            for name in MODELS]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'model':<13}{'params':>7}{'MACs':>8}  {'pretrained':<22}description")
    for r in rows:
        tags = ", ".join(t.split(".", 1)[1] for t in r["pretrained"]) or "-"
        print(f"{r['name']:<13}{format_count(r['params']):>7}{format_count(r['macs']):>8}  {tags:<22}"
              f"{r['description']}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .info import format_card, model_card

    cards = [model_card(name) for name in args.names]
    if args.json:
        print(json.dumps(cards if len(cards) > 1 else cards[0], indent=2))
    else:
        print("\n\n".join(format_card(c) for c in cards))
    return 0


def inference_model(args: argparse.Namespace):
    """``(model, forward)`` for predict / validate: the model gives the preprocessing and the classes,
    ``forward`` (any callable from an NCHW tensor to logits) runs the network."""
    from .inference.predict import resolve_model

    model = resolve_model(args.model, args.weights)
    forward = low_precision_forward(args, model)
    if forward is not None:
        return model, forward
    if args.backend == "onnxruntime":
        from .deploy.export import onnxruntime_forward

        return model, onnxruntime_forward(model, args.onnx)
    if args.onnx:
        raise MixNetError("--onnx FILE needs --backend onnxruntime")
    if args.fast:
        from .models.fusion import optimize_for_inference

        return model, optimize_for_inference(model)
    return model, model


def low_precision_forward(args: argparse.Namespace, model):
    """The forward for --precision bf16 / int8 (OpenVINO bf16, or a quantized folder's INT8 graph); None
    for fp32. A quantized folder from `mixnet quantize` given as the model runs INT8 unless --precision
    says otherwise (fp32 / bf16 then run the float weights stored beside the INT8 graph)."""
    from .deploy.quantize import load_quantized, model_precision, quantized_folder

    asked = getattr(args, "precision", None)
    quantized = quantized_folder(args.weights, args.model)
    precision = model_precision(asked, args.weights, args.model)
    if precision == "fp32":
        return None
    if args.backend != "torch" or args.onnx or args.fast:
        if asked is None:  # chosen by the folder, not on the command line
            raise MixNetError(f"{quantized} is a quantized model folder: it runs its INT8 graph in a runtime of "
                              f"its own; drop --backend/--onnx/--fast, or add --precision fp32 to run its float "
                              f"weights with them")
        raise MixNetError(f"--precision {precision} chooses its own runtime; drop --backend/--onnx/--fast")
    if precision == "bf16":
        from .deploy.runtimes import check_bf16_cpu, openvino_forward

        check_bf16_cpu()
        return openvino_forward(model, "bf16")
    if quantized is None:
        raise MixNetError("--precision int8 needs a quantized model folder (`mixnet quantize ... --output DIR`) "
                          "as --model or --weights")
    return load_quantized(quantized)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="NAME", help="architecture or weights tag (default: the built-in "
                                                   "mixnet_s.imagenette)")
    p.add_argument("--weights", metavar="FILE|DIR|TAG", help="weights file, hub folder, run directory or tag")
    p.add_argument("--workers", type=non_negative_int, default=min(4, os.cpu_count() or 1), metavar="N",
                   help="image loading processes (0: in this process; default: %(default)s)")
    add_backend_arguments(p)


def add_backend_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``inference_model`` that choose how the network runs (predict, validate, serve)."""
    p.add_argument("--fast", action="store_true", help="run the inference form (batch norm folded, MixConvs "
                                                       "merged, channels_last); same outputs to 1e-4")
    p.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch",
                   help="onnxruntime runs the model exported to ONNX (default: %(default)s)")
    p.add_argument("--onnx", metavar="FILE", help="with --backend onnxruntime: an ONNX file from `mixnet export` "
                                                  "(default: export the model to a temporary file)")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="bf16: OpenVINO in bf16 (CPUs with avx512_bf16/amx_bf16); int8: the INT8 graph of a "
                        "folder from `mixnet quantize` (default: int8 for such a folder, else fp32)")


PRECISIONS = ("fp32", "bf16", "int8")


def add_preprocessing_arguments(p: argparse.ArgumentParser) -> None:
    """Overrides of the evaluation transform the model's config gives (predict, validate)."""
    p.add_argument("--image-size", type=input_size, metavar="PX",
                   help="side of the square input in pixels, 32 to 8192 (default: the model's own)")
    p.add_argument("--crop-pct", type=crop_fraction, metavar="F",
                   help="center-crop fraction: photos are resized to PX/F before the crop (default: the model's own)")


def number_in(low: float, high: float, *, low_open: bool = False, high_open: bool = False):
    """An argparse type: a number in the interval from ``low`` to ``high`` (open at either end); NaN is
    in none."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        value = float(text)
        if not ((value > low if low_open else value >= low) and (value < high if high_open else value <= high)):
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {text}")
        return value
    parse.__name__ = "float"  # argparse names the type in "invalid float value: 'x'"
    return parse


crop_fraction = number_in(0, 1, low_open=True)
positive_number = number_in(0, math.inf, low_open=True, high_open=True)
percentage = number_in(0, 100)
# serve's upload limit, in MiB: bounded, so that it counts in bytes (1e308 MB overflowed int())
body_megabytes = number_in(0, 1e6, low_open=True)
# LitServe answers 504 to a request that waits 30 s, so a batch must be sent well before that.
batch_wait_ms = number_in(0, 30_000, high_open=True)


def at_least(low: int, high: Optional[int] = None):
    def parse(text: str) -> int:
        value = int(text)
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}" if high is None else
                                             f"must be from {low} to {high}, got {value}")
        return value
    parse.__name__ = "int"  # argparse names the type in "invalid int value: 'x'"
    return parse


positive_int, non_negative_int = at_least(1), at_least(0)
# MixNet's five stride-2 layers take 32 pixels to 1 (models.network.MIN_INPUT_SIZE); above 8192 px (the
# exported graphs' range) one image is gigabytes of activations: a typo, refused before any work.
input_size = at_least(32, 8192)


def cmd_predict(args: argparse.Namespace) -> int:
    from .data.images import list_image_files
    from .inference.predict import iter_predictions

    files = list_image_files(args.paths)  # a missing path is a usage error, before the model loads
    if not files:
        raise MixNetError(f"no image files in {', '.join(args.paths)}")
    model, forward = inference_model(args)
    failed = []
    for p in iter_predictions(model, files, topk=args.topk, batch_size=args.batch_size, workers=args.workers,
                              forward=forward, progress=len(files) > args.batch_size, image_size=args.image_size,
                              crop_pct=args.crop_pct):
        if not p.ok:
            failed.append(p)
        if args.json:
            print(json.dumps(p.to_dict()), flush=True)
        elif p.ok:
            print(p.source)
            for s in p.top:
                print(f"  {100 * s.probability:6.2f}%  {s.name} ({s.index})")
    for p in failed:
        print(f"mixnet predict: failed: {p.source}: {p.error}", file=sys.stderr)
    if failed:
        print(f"mixnet predict: {len(failed)} of {len(files)} images could not be classified", file=sys.stderr)
    if len(failed) == len(files):  # nothing usable: an input error, as validate and quantize say it
        return 2
    return 1 if failed else 0


def cmd_validate(args: argparse.Namespace) -> int:
    from .data.images import folder_classes
    from .inference.validate import validate
    from .fileio import atomic_write, check_writable_file

    folder_classes(args.folder)  # a wrong folder is reported before any weights are fetched
    if args.out:
        check_writable_file(args.out, "--out")
    model, forward = inference_model(args)
    result = validate(model, args.folder, batch_size=args.batch_size, workers=args.workers, forward=forward,
                      progress=True, image_size=args.image_size, crop_pct=args.crop_pct)
    report = result.to_dict()
    if args.out:
        with atomic_write(args.out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(result.summary())
    for f in result.failures:
        print(f"mixnet validate: failed: {f['image']}: {f['error']}", file=sys.stderr)
    return 1 if result.failures else 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve.app import serve  # a one-line error naming the pip extra when it is missing

    args.model, args.weights = args.source, None  # what inference_model reads, as predict --model gives it
    return serve(args, inference_model)


STOPPED_AT_TIME_LIMIT = 3  # train's status for a run stopped by --max-minutes (checkpointed)


def cmd_train(args: argparse.Namespace) -> int:
    from .training.config import TrainConfig, overrides_from_args
    from .training.loop import resume, train

    overrides = overrides_from_args(args)
    if args.resume:
        if args.recipe:
            raise MixNetError("--recipe cannot change a run being resumed; give single settings instead")
        result = resume(args.resume, **overrides)
    else:
        result = train(TrainConfig.from_recipe(args.recipe, **overrides))
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    # A stop at --max-minutes is not a failure, but a script must not take the run for a finished one.
    return 0 if result.completed else STOPPED_AT_TIME_LIMIT


def export_source_model(args: argparse.Namespace):
    """The model ``mixnet export`` writes: random weights for an architecture with --random-weights,
    else whatever ``--weights`` / the NAME|RUN_DIR resolves to (a tag, file, hub folder or run)."""
    if args.random_weights:
        if args.weights:
            raise MixNetError("--random-weights and --weights contradict each other: give one")
        from .factory import create_model
        from .models.architectures import MODELS

        if args.source not in MODELS:
            raise MixNetError(f"--random-weights needs an architecture name, got {args.source!r}")
        from .deploy.benchmark import randomize_batchnorm

        # Not the default zero init: zero residual branches and a zero classifier give all-zero logits, so
        # the check after writing would compare nothing. The paper's init with random batch-norm statistics
        # gives logits of order 1 and batch norm that folding really changes.
        return randomize_batchnorm(create_model(args.source, init="reference")).eval()
    from .inference.predict import resolve_model

    if args.weights:
        return resolve_model(args.source, args.weights)
    return resolve_model(None, args.source)


def cmd_export(args: argparse.Namespace) -> int:
    from .deploy.export import export_model, format_from_path

    from .fileio import check_writable_file

    fmt = args.format or format_from_path(args.output)
    check_writable_file(args.output, "--output")
    result = export_model(export_source_model(args), args.output, fmt, tolerance=args.tolerance,
                          check=not args.no_check)
    report = dict(path=str(result.path), format=result.format, size_bytes=result.size_bytes,
                  max_diff=result.max_diff if result.checked_shapes else None, checked_shapes=[list(s) for s in result.checked_shapes])
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        checked = (f"checked at {', '.join('x'.join(map(str, s)) for s in result.checked_shapes)}: "
                   f"max |diff| {result.max_diff:.2g} of the logit scale" if result.checked_shapes else "not checked")
        print(f"wrote {result.path} ({result.format}, {result.size_bytes / 2**20:.1f} MiB); {checked}")
    return 0


def int_list(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def cmd_benchmark(args: argparse.Namespace) -> int:
    from .deploy.benchmark import default_paths, format_table, run_benchmark, to_json

    paths = (args.paths.split(",") if args.paths
             else default_paths(args.fast, "timm" in (args.compare or []), args.train, args.precision))
    results = run_benchmark(args.model or ["mixnet_s"], args.batch_size, paths, train=args.train,
                            image_size=args.image_size, warmup=args.warmup, repeats=args.repeats,
                            num_threads=args.threads, show_progress=not args.json, calibration=args.calibration)
    print(json.dumps(to_json(results), indent=2) if args.json else format_table(results))
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from .deploy.quantize import AgreementTooLow, quantize_model
    from .inference.predict import resolve_model

    from .fileio import check_writable_file

    check_writable_file(args.output, "--output", folder=True)
    model = resolve_model(args.weights and args.source, args.weights or args.source)
    try:
        result = quantize_model(model, args.calibration, args.output, backend=args.backend, images=args.images,
                                check_images=args.check_images, min_agreement=args.min_agreement,
                                workers=args.workers, progress=print)
    except AgreementTooLow as e:  # the job ran and its result failed the check: exit 1, not a usage error
        print(f"mixnet quantize: failed: {e}", file=sys.stderr)
        return 1
    print(f"wrote {result.path} (INT8 {result.backend}, {result.size_bytes / 2**20:.1f} MiB graph, "
          f"{result.calibration_images} calibration photos); {result.check.summary()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixnet", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"mixnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("list", help="list the model architectures")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("info", help="model card: parameters, MACs, preprocessing, pretrained weights")
    p.add_argument("names", nargs="+", metavar="NAME", help="architecture (or weights tag)")
    p.add_argument("--json", action="store_true", help="machine-readable output: the card, or a list of cards "
                                                       "for several names")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("predict", help="classify images: top-k classes with probabilities")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or directories (searched recursively)")
    add_model_arguments(p)
    add_preprocessing_arguments(p)
    p.add_argument("--topk", type=positive_int, default=5, help="classes per image (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=32, metavar="N", help="default: %(default)s")
    p.add_argument("--json", action="store_true", help="one JSON object per image, one per line")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("validate", help="score a model on a labelled folder (ImageFolder layout)")
    p.add_argument("folder", metavar="DIR", help="DIR/<class>/<images>; class folders named by the model's "
                                                 "classes or by ImageNet wnids")
    add_model_arguments(p)
    add_preprocessing_arguments(p)
    p.add_argument("--batch-size", type=positive_int, default=64, metavar="N", help="default: %(default)s")
    p.add_argument("--json", action="store_true", help="print the full results as JSON")
    p.add_argument("--out", metavar="FILE", help="write the full results (per-class accuracy, confusion "
                                                 "matrix, failures) as JSON")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("export", help="export to ONNX, TorchScript or torch.export (pt2), checked after writing")
    p.add_argument("source", metavar="NAME|RUN_DIR", help="architecture, weights tag, weights file, hub folder "
                                                          "or training run directory")
    p.add_argument("--format", choices=["onnx", "torchscript", "pt2"],
                   help="default: from the output suffix (.onnx, .ts/.pt, .pt2)")
    p.add_argument("--output", "-o", required=True, metavar="FILE")
    p.add_argument("--weights", metavar="FILE|DIR|TAG", help="weights for the architecture NAME")
    p.add_argument("--random-weights", action="store_true", help="export the architecture NAME untrained")
    p.add_argument("--tolerance", type=positive_number, default=1e-4,
                   help="largest logit difference from PyTorch accepted, as a fraction of the logit scale "
                        "(max |logit|) where that exceeds 1 (default: %(default)g)")
    p.add_argument("--no-check", action="store_true", help="skip running the exported file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_export)

    from .deploy.runtimes import DEFAULT_INT8_BACKEND, INT8_BACKENDS

    p = sub.add_parser("quantize", help="post-training INT8 quantization, checked against fp32 on held-back photos")
    p.add_argument("source", metavar="MODEL|RUN_DIR|FILE", help="weights tag, training run, hub folder or weights "
                                                                "file (an architecture with --weights)")
    p.add_argument("--weights", metavar="FILE|DIR|TAG", help="weights for the architecture MODEL")
    p.add_argument("--calibration", required=True, metavar="DIR",
                   help="photos (searched recursively; class folders named by the model's classes add accuracy)")
    p.add_argument("--images", type=positive_int, default=300, metavar="N",
                   help="calibration photos, a fixed random sample (default: %(default)s)")
    p.add_argument("--check-images", type=positive_int, default=500, metavar="N",
                   help="held-back photos scored in fp32 and INT8 (default: %(default)s)")
    p.add_argument("--min-agreement", type=percentage, default=98.0, metavar="PCT",
                   help="least top-1 agreement with fp32 accepted, in percent (default: %(default)s)")
    p.add_argument("--output", "-o", required=True, metavar="DIR",
                   help="quantized model folder (hub folder + INT8 graph): use as --model")
    p.add_argument("--backend", choices=INT8_BACKENDS, default=DEFAULT_INT8_BACKEND,
                   help="openvino (NNCF; pip install 'mixnet[openvino]') or onnxruntime (default: %(default)s)")
    p.add_argument("--workers", type=non_negative_int, default=min(4, os.cpu_count() or 1), metavar="N",
                   help="image loading processes (0: in this process; default: %(default)s)")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("benchmark", help="images/s, latency and memory; side by side with timm")
    p.add_argument("--model", nargs="+", metavar="NAME", help="architectures (default: mixnet_s)")
    p.add_argument("--batch-size", type=int_list, default=[1, 32], metavar="N,N",
                   help="comma-separated batch sizes (default: 1,32)")
    p.add_argument("--image-size", type=input_size, default=224, metavar="PX", help="32 to 8192 (default: %(default)s)")
    p.add_argument("--fast", action="store_true", help="also our optimized paths (fused eager, "
                                                       "torch.compile, onnxruntime) and timm's")
    p.add_argument("--train", action="store_true", help="time a training step instead of inference")
    p.add_argument("--compare", nargs="+", choices=["timm"], help="run timm's same model alongside")
    p.add_argument("--precision", nargs="+", choices=PRECISIONS, default=["fp32"],
                   help="bf16 / int8: our OpenVINO bf16 / INT8 (OpenVINO, onnxruntime) paths against our fp32 "
                        "runtime paths, and timm's peers with --compare timm (default: fp32)")
    p.add_argument("--calibration", metavar="DIR", help="photos calibrating the INT8 paths, ours and timm's "
                                                        "(default: random images, enough for timing)")
    p.add_argument("--paths", metavar="P,P", help="exactly these paths (overrides --fast/--compare/--precision), "
                   "from: mixnet, mixnet-fast, mixnet-fast-compile, mixnet-onnxruntime, mixnet-openvino[-bf16|-int8], "
                   "mixnet-onnxruntime-int8, timm, timm-cl, timm-compile, timm-onnxruntime, "
                   "timm-openvino[-bf16|-int8], timm-onnxruntime-int8; with --train: mixnet, mixnet-cl, timm, timm-cl, "
                   "mixnet-cl-compile, timm-cl-compile")
    p.add_argument("--warmup", type=non_negative_int, default=3, metavar="N",
                   help="untimed calls per path (default: 3)")
    p.add_argument("--repeats", type=positive_int, default=20, metavar="N",
                   help="interleaved timed rounds (default: %(default)s)")
    p.add_argument("--threads", type=positive_int, metavar="N", help="torch/onnxruntime threads")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_benchmark)

    p = sub.add_parser("serve", help="predictions over HTTP (POST /predict), with a page to try it at /")
    p.add_argument("source", nargs="?", metavar="MODEL|RUN_DIR|FILE",
                   help="architecture, weights tag, training run, hub folder or weights file (default: the "
                        "built-in mixnet_s.imagenette)")
    p.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (this machine only), 0.0.0.0 or :: "
                                                       "(default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    p.add_argument("--max-batch-size", type=positive_int, default=16, metavar="N",
                   help="requests classified together (1: no batching; default: %(default)s)")
    p.add_argument("--batch-timeout-ms", type=batch_wait_ms, default=10, metavar="MS",
                   help="longest wait for a batch to fill (default: %(default)s)")
    p.add_argument("--workers", type=positive_int, default=1, metavar="N",
                   help="inference processes, each with its own copy of the model (default: %(default)s)")
    p.add_argument("--threads", type=positive_int, metavar="N",
                   help="torch/onnxruntime threads in each inference process (default: (cores - 1) / workers, "
                        "at least 1: a core is left to the HTTP process)")
    p.add_argument("--topk", type=positive_int, default=5, help="classes per answer (default: %(default)s)")
    p.add_argument("--max-body-mb", type=body_megabytes, default=20, metavar="MB",
                   help="largest upload accepted (default: %(default)s)")
    add_backend_arguments(p)
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="warning",
                   help="server log; info logs every request (default: %(default)s)")
    p.set_defaults(func=cmd_serve)

    from .training.config import add_arguments as add_train_arguments

    p = sub.add_parser("train", help="train or fine-tune on an ImageFolder dataset (resumable; torchrun for DDP)",
                       epilog="exit status: 0 all epochs trained; 1 the loss diverged; 2 a setting or input that "
                              "cannot work; 3 stopped at --max-minutes; 130 interrupted (Ctrl-C, SIGTERM). After 3 "
                              "and 130 the run is checkpointed: --resume RUN_DIR continues it.")
    add_train_arguments(p)
    p.add_argument("--json", action="store_true", help="print the run's result as JSON at the end (best top-1, "
                                                       "epochs done, the final model's folder, every epoch's row)")
    p.set_defaults(func=cmd_train)
    return parser


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings as the command line shows them: the message, not the source line that raised it."""
    return f"warning: {message}\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    formatwarning, warnings.formatwarning = warnings.formatwarning, one_line_warning
    try:
        return args.func(args)
    except MixNetError as e:
        print(f"mixnet {args.command}: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`mixnet ... | head`): stop quietly, as cat does
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    finally:
        warnings.formatwarning = formatwarning
