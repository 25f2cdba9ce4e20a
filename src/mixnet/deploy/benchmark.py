"""Throughput, latency and peak memory of MixNet, ours against timm's, measured side by side.

Every way of running a model ("path": eager, optimized, compiled, onnxruntime, and timm's forms) is
built once, warmed up, and then timed in interleaved rounds (one call of each path per round), so
load from other processes hits all paths alike; medians are reported. Ratios are ours / timm's.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ..errors import MixNetError, require
from ..factory import check_model_name, create_model
from ..models.fusion import optimize_for_inference
from ..models.network import MIN_INPUT_SIZE

# Inference paths. "mixnet*" are ours, "timm*" the oracle's; "-cl" = channels_last,
# "-compile" = torch.compile, "-onnxruntime" / "-openvino" = exported to ONNX and run by that runtime,
# "-bf16" = OpenVINO's bf16 precision hint, "-int8" = quantized (deploy/quantize.py: NNCF for OpenVINO,
# quantize_static for onnxruntime) on the same calibration images for ours and timm's.
OURS_EAGER = "mixnet"
OURS_FAST = ("mixnet-fast", "mixnet-fast-compile", "mixnet-onnxruntime")
TIMM_EAGER = ("timm", "timm-cl")
TIMM_FAST = ("timm-compile", "timm-onnxruntime")
# Per precision: our paths and timm's peers; the fp32 runtime paths are the baselines they are read against.
PRECISION_PATHS = {
    "fp32": (("mixnet-onnxruntime", "mixnet-openvino"), ("timm-onnxruntime", "timm-openvino")),
    "bf16": (("mixnet-openvino-bf16",), ("timm-openvino-bf16",)),
    "int8": (("mixnet-openvino-int8", "mixnet-onnxruntime-int8"), ("timm-openvino-int8", "timm-onnxruntime-int8")),
}
INFER_PATHS = (OURS_EAGER,) + OURS_FAST + TIMM_EAGER + TIMM_FAST  # the fp32 paths of PyTorch and onnxruntime
RUNTIME_PATHS = tuple(p for ours, timm in PRECISION_PATHS.values() for p in ours + timm if p not in INFER_PATHS)
CALIBRATION_IMAGES = 32  # per INT8 path; speed does not depend on the calibration images
TRAIN_PATHS = ("mixnet", "mixnet-cl", "timm", "timm-cl")
# Only when named in --paths: compiling a training step takes over a minute on a small CPU.
COMPILED_TRAIN_PATHS = ("mixnet-cl-compile", "timm-cl-compile")
SETTLE_S = 0.05  # idle time before each timed call (see measure)


def default_paths(fast: bool, compare_timm: bool, train: bool,
                  precisions: Sequence[str] = ("fp32",)) -> List[str]:
    """The paths measured for the given CLI flags. A precision other than fp32 measures our paths of
    that precision against our fp32 runtime paths (and timm's peers of each, with ``compare_timm``)."""
    if train:
        return [p for p in TRAIN_PATHS if compare_timm or p.startswith("mixnet")]
    if list(precisions) == ["fp32"]:
        paths = [OURS_EAGER] + (list(OURS_FAST) if fast else [])
        if compare_timm:
            paths += list(TIMM_EAGER) + (list(TIMM_FAST) if fast else [])
        return paths
    paths = []
    for precision in ["fp32"] + [p for p in precisions if p != "fp32"]:
        ours, timm = PRECISION_PATHS[precision]
        paths += list(ours) + (list(timm) if compare_timm else [])
    return paths


@dataclass
class Measurement:
    model: str
    path: str
    mode: str  # "infer" or "train"
    batch_size: int
    image_size: int
    images_per_s: float
    latency_p50_ms: float
    latency_p95_ms: float
    peak_memory_mb: Optional[float]  # peak resident memory above the level before the call
    setup_s: float  # building, compiling or exporting the path, and its first call


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics and affine parameters, so that folding them is really exercised."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                m.bias.copy_(torch.rand(n, generator=generator) * 0.4 - 0.2)
    return model


def _import_timm():
    try:
        import timm
    except ImportError:
        raise MixNetError("--compare timm needs timm installed (pip install timm)") from None
    return timm


def _timm_model(name: str, reference: nn.Module) -> nn.Module:
    model = _import_timm().create_model(name, pretrained=False)
    model.load_state_dict(reference.state_dict())  # same weights, so outputs are comparable
    return model


def _onnx_file(model: nn.Module, workdir: Path, tag: str, optimize: bool) -> Path:
    """``model`` exported to ONNX in ``workdir`` (once per tag): ours through export_model, timm's as it is."""
    from .export import EXAMPLE_SHAPE, export_model, _dynamic_dims

    path = workdir / f"{tag}.onnx"
    if path.is_file():
        return path
    if optimize:
        export_model(model, path, "onnx", check=False)
    else:  # timm's model as it is, through the same exporter
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (torch.randn(EXAMPLE_SHAPE),), dynamo=True,
                                        verbose=False, dynamic_shapes=_dynamic_dims())
        program.save(str(path))
    return path


def _onnxruntime_runner(model: nn.Module, workdir: Path, tag: str, optimize: bool):
    from .export import OnnxRuntimeModel

    return OnnxRuntimeModel(_onnx_file(model, workdir, tag, optimize))


def _runtime_path(path: str, model: nn.Module, workdir: Path, tag: str, optimize: bool,
                  calibration: Sequence) -> Callable[[Tensor], Tensor]:
    """The -openvino[-bf16|-int8] and -onnxruntime-int8 paths, of ours (optimize) or timm's model."""
    from .quantize import int8_runner, quantize_onnx
    from .runtimes import OpenVinoModel, check_bf16_cpu

    source = _onnx_file(model, workdir, tag, optimize)
    if path.endswith("-int8"):
        backend = "openvino" if "-openvino" in path else "onnxruntime"
        graph = workdir / f"{tag}_{backend}_int8{'.xml' if backend == 'openvino' else '.onnx'}"
        if not graph.is_file():
            quantize_onnx(source, graph, calibration, backend)
        return int8_runner(graph, backend)
    if path.endswith("-bf16"):
        check_bf16_cpu()
    return OpenVinoModel(source, "bf16" if path.endswith("-bf16") else "f32")


def calibration_arrays(model: nn.Module, image_size: int, folder=None, count: int = CALIBRATION_IMAGES,
                       seed: int = 0) -> List:
    """Images for the INT8 paths: ``count`` photos of ``folder`` through the eval transform at
    ``image_size``, or without a folder random normal images (enough to time a graph, not to use it)."""
    if folder is None:
        generator = torch.Generator().manual_seed(seed)
        return [torch.randn(1, 3, image_size, image_size, generator=generator).numpy() for _ in range(count)]
    from ..data.images import build_eval_transform, list_image_files
    from .quantize import load_batches

    files = list_image_files([folder])[:count]
    transform = build_eval_transform(model, image_size=image_size)
    arrays = [x[i:i + 1].numpy() for _, x in load_batches(model, files, transform=transform) for i in range(len(x))]
    if not arrays:
        raise MixNetError(f"{folder}: no readable image files for calibration")
    return arrays


def build_path(path: str, model: nn.Module, name: str, workdir: Path,
               calibration: Sequence = ()) -> Callable[[Tensor], Tensor]:
    """A callable for one inference path of ``model`` (ours, eval mode, random weights);
    ``calibration`` (NCHW arrays) feeds the INT8 paths."""
    if path == "mixnet":
        return model
    if path == "mixnet-fast":
        return optimize_for_inference(model)
    if path == "mixnet-fast-compile":
        return optimize_for_inference(model, compile=True)
    if path == "mixnet-onnxruntime":
        return _onnxruntime_runner(model, workdir, name, optimize=True)
    if path in RUNTIME_PATHS and path.startswith("mixnet"):
        return _runtime_path(path, model, workdir, name, True, calibration)
    timm_model = _timm_model(name, model).eval()
    if path == "timm":
        return timm_model
    if path == "timm-cl":
        return timm_model.to(memory_format=torch.channels_last)
    if path == "timm-compile":  # the better eager memory format is unknown in advance; use NCHW
        return torch.compile(timm_model)
    if path == "timm-onnxruntime":
        return _onnxruntime_runner(timm_model, workdir, f"timm_{name}", optimize=False)
    if path in RUNTIME_PATHS:
        return _runtime_path(path, timm_model, workdir, f"timm_{name}", False, calibration)
    raise MixNetError(f"unknown benchmark path {path!r}; choose from {', '.join(INFER_PATHS + RUNTIME_PATHS)}")


def build_train_step(path: str, model: nn.Module, name: str, batch_size: int):
    """One SGD step (forward, cross-entropy, backward, update) of ours or timm's model; ``-cl``: in
    channels_last, ``-compile``: forward (and so backward) compiled with torch.compile, as ``--compile``
    trains."""
    if path.startswith("timm"):
        model = _timm_model(name, model)
    else:
        model = copy.deepcopy(model)
    if "-cl" in path:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    forward = torch.compile(model) if path.endswith("-compile") else model
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    targets = torch.randint(0, 1000, (batch_size,), generator=torch.Generator().manual_seed(0))
    loss_fn = nn.CrossEntropyLoss()

    def step(x: Tensor) -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(forward(x), targets)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def _rss_mb(field: str) -> Optional[float]:
    """VmRSS or VmHWM (peak) of this process from /proc, in MiB; None where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:  # Linux: writing 5 to clear_refs resets the peak resident set size (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory_mb(fn: Callable[[], object]) -> Optional[float]:
    """Peak resident memory one call of ``fn`` adds to the process (CPU), in MiB."""
    if not _reset_peak_rss():
        return None
    before = _rss_mb("VmRSS")
    fn()
    peak = _rss_mb("VmHWM")
    return None if before is None or peak is None else max(peak - before, 0.0)


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(runners: Dict[str, Callable[[Tensor], object]], x: Tensor, warmup: int, repeats: int,
            progress: Optional[Callable[[], None]] = None, settle_s: float = SETTLE_S) -> Dict[str, List[float]]:
    """Seconds per call of each runner, timed in interleaved rounds after ``warmup`` calls each.

    Before each timed call the process sleeps ``settle_s``: PyTorch's OpenMP threads and onnxruntime's
    thread pool spin-wait for a while after their work, and without the pause one runtime's spinning
    threads take the cores from the next path (measured: mixnet_s batch 1 under onnxruntime ran at a
    third of its own speed when timed right after torch calls)."""
    for run in runners.values():
        for _ in range(warmup):
            run(x)
    times: Dict[str, List[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            time.sleep(settle_s)
            start = time.perf_counter()
            run(x)
            times[name].append(time.perf_counter() - start)
        if progress:
            progress()
    return times


def check_path_requirements(paths: Sequence[str]) -> None:
    """Refuse, in one line and before any path is built, paths this machine cannot run: bf16 on a CPU
    without native bf16, and paths whose optional package (timm, onnxscript, onnxruntime, OpenVINO, NNCF)
    is missing. Otherwise the refusal comes only when the path's turn to be built comes, after the
    paths before it were built (minutes, with torch.compile or INT8 calibration among them)."""
    from .runtimes import check_bf16_cpu

    if any(p.endswith("-bf16") for p in paths):
        check_bf16_cpu()
    if any(p.startswith("timm") for p in paths):
        _import_timm()
    for path in paths:
        if "-onnxruntime" in path or "-openvino" in path:  # exported to ONNX first
            require("onnxscript", "onnx", f"the benchmark path {path}")
        if "-onnxruntime" in path:
            require("onnxruntime", "onnx", f"the benchmark path {path}")
        if "-openvino" in path:
            require("openvino", "openvino", f"the benchmark path {path}")
        if "-openvino" in path and path.endswith("-int8"):
            require("nncf", "openvino", f"the benchmark path {path}")


def run_benchmark(models: Sequence[str], batch_sizes: Sequence[int], paths: Sequence[str],
                  train: bool = False, image_size: int = 224, warmup: int = 3, repeats: int = 20,
                  num_threads: Optional[int] = None, seed: int = 0,
                  show_progress: bool = True, calibration=None) -> List[Measurement]:
    """Measure every path on every model and batch size; one Measurement per combination.
    ``calibration`` (a folder of photos) calibrates the INT8 paths, ours and timm's alike."""
    from tqdm import tqdm

    if num_threads:
        torch.set_num_threads(num_threads)
    known = TRAIN_PATHS + COMPILED_TRAIN_PATHS if train else INFER_PATHS + RUNTIME_PATHS
    unknown = [p for p in paths if p not in known]
    if unknown:
        raise MixNetError(f"unknown benchmark path(s) {', '.join(unknown)} for "
                          f"{'training' if train else 'inference'}; choose from {', '.join(known)}")
    for name in models:  # before any model is built or the progress bar drawn
        check_model_name(name)
    if image_size < MIN_INPUT_SIZE:
        raise MixNetError(f"image size {image_size} is too small: MixNet needs at least {MIN_INPUT_SIZE} px")
    check_path_requirements(paths)
    results: List[Measurement] = []
    bar = tqdm(total=len(models) * len(batch_sizes) * repeats, desc="benchmark", unit="round",
               disable=not show_progress)
    with tempfile.TemporaryDirectory(prefix="mixnet-bench-") as tmp:
        for name in models:
            # the reference head: random logits, so checking each path against the model means something
            torch.manual_seed(seed)
            model = randomize_batchnorm(create_model(name, init="reference"), seed).eval()
            calib = (calibration_arrays(model, image_size, calibration, seed=seed)
                     if any(p.endswith("-int8") for p in paths) else [])
            for batch_size in batch_sizes:
                x = torch.randn(batch_size, 3, image_size, image_size,
                                generator=torch.Generator().manual_seed(seed))
                runners, setup_s, memory = {}, {}, {}
                context = contextlib.nullcontext() if train else torch.inference_mode()
                with context:
                    for path in paths:
                        bar.set_postfix_str(f"{name} b{batch_size} building {path}")
                        start = time.perf_counter()
                        run = (build_train_step(path, model, name, batch_size) if train
                               else build_path(path, model, name, Path(tmp), calib))
                        run(x)  # the first call (compilation happens here) counts as setup
                        setup_s[path] = time.perf_counter() - start
                        memory[path] = peak_memory_mb(lambda: run(x))
                        runners[path] = run
                    bar.set_postfix_str(f"{name} b{batch_size}")
                    times = measure(runners, x, warmup, repeats, bar.update)
                for path, seconds in times.items():
                    p50 = statistics.median(seconds)
                    results.append(Measurement(
                        model=name, path=path, mode="train" if train else "infer",
                        batch_size=batch_size, image_size=image_size,
                        images_per_s=batch_size / p50, latency_p50_ms=p50 * 1e3,
                        latency_p95_ms=_percentile(seconds, 0.95) * 1e3,
                        peak_memory_mb=memory[path], setup_s=setup_s[path]))
                del runners
    bar.close()
    return results


def ratios(results: Iterable[Measurement]) -> List[dict]:
    """Per model and batch size: our best path against timm's best eager form and each timm path."""
    groups: Dict[tuple, List[Measurement]] = {}
    for r in results:
        groups.setdefault((r.model, r.mode, r.batch_size), []).append(r)
    rows = []
    for (model, mode, batch_size), group in groups.items():
        ours = [r for r in group if r.path.startswith("mixnet")]
        timm = [r for r in group if r.path.startswith("timm")]
        if not ours or not timm:
            continue
        best = max(ours, key=lambda r: r.images_per_s)
        row = dict(model=model, mode=mode, batch_size=batch_size, ours=best.path)
        eager = [r for r in timm if r.path in ("timm", "timm-cl")]
        if eager:
            best_eager = max(eager, key=lambda r: r.images_per_s)
            row["vs_timm_best_eager"] = best.images_per_s / best_eager.images_per_s
        for r in timm:
            row[f"vs_{r.path}"] = best.images_per_s / r.images_per_s
        rows.append(row)
    return rows


def format_table(results: Sequence[Measurement]) -> str:
    """A plain-text table of the measurements followed by the ours/timm ratios."""
    lines = [f"{'model':<14}{'mode':<6}{'batch':>6}  {'path':<22}{'img/s':>9}{'p50 ms':>9}"
             f"{'p95 ms':>9}{'peak MiB':>10}{'setup s':>9}"]
    for r in results:
        memory = "-" if r.peak_memory_mb is None else f"{r.peak_memory_mb:.0f}"
        lines.append(f"{r.model:<14}{r.mode:<6}{r.batch_size:>6}  {r.path:<22}{r.images_per_s:>9.1f}"
                     f"{r.latency_p50_ms:>9.1f}{r.latency_p95_ms:>9.1f}{memory:>10}{r.setup_s:>9.1f}")
    for row in ratios(results):
        parts = ", ".join(f"{k[3:]} x{v:.2f}" for k, v in row.items() if k.startswith("vs_"))
        lines.append(f"ours/timm {row['model']} {row['mode']} batch {row['batch_size']} "
                     f"({row['ours']}): {parts}")
    return "\n".join(lines)


def to_json(results: Sequence[Measurement]) -> dict:
    return dict(torch=torch.__version__, num_threads=torch.get_num_threads(),
                results=[asdict(r) for r in results], ratios=ratios(results))
