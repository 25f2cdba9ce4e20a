"""Post-training static INT8 quantization of a MixNet, checked against fp32 on held-back photos.

``quantize_model`` exports the model's inference graph to ONNX (deploy/export.py), calibrates INT8
activation ranges on photos read with the model's own eval transform, and writes a *quantized model
folder*: the hub folder ``save_pretrained`` writes (config.json with class names and preprocessing,
model.safetensors with the float weights) plus the INT8 graph and ``quantization.json``. predict,
validate and benchmark take that folder as a model and run its INT8 graph.

Backends (benchmarks/RESULTS.md has the measurements behind these choices):

- ``openvino`` (default): NNCF on the OpenVINO model read from ONNX, MIXED preset (symmetric
  per-channel weights, asymmetric activations: Swish outputs are mostly positive), full bias
  correction (small SE nets need it), run by OpenVINO. It was the faster INT8 runtime, on the merged
  graph (MixConvs merged into one zero-padded depthwise conv): OpenVINO keeps depthwise convs in float
  either way, and the split graph adds Split/Concat copies.
- ``onnxruntime``: ``quantize_static`` with QDQ nodes, per-channel INT8 weights and UINT8
  activations on the convolutions and the classifier only (Swish and SE stay float), run by
  onnxruntime, also on the merged graph. Slower than OpenVINO's INT8, and less accurate (no bias
  correction): the built-in model lost 3.5 points of Imagenette val top-1 with it.

The check runs on photos of the calibration folder; where that is the training set, agreement there
overstates agreement on new photos (the built-in model: 100% on training photos, 98.2% on val).

Both take per-channel weight scales, which depthwise layers need (one scale per 3x3 filter).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..data.images import ImageList, build_eval_transform, collate, folder_classes, list_image_files
from ..errors import MixNetError, require
from ..fileio import PathLike, atomic_write, check_writable_file, current_umask
from .export import OnnxRuntimeModel, export_model
from .runtimes import DEFAULT_INT8_BACKEND as DEFAULT_BACKEND, INT8_BACKENDS as BACKENDS, OpenVinoModel

QUANT_CONFIG = "quantization.json"
GRAPH_FILES = {"openvino": "model_int8.xml", "onnxruntime": "model_int8.onnx"}
DEFAULT_IMAGES = 300
DEFAULT_CHECK_IMAGES = 500
DEFAULT_MIN_AGREEMENT = 98.0  # percent of held-back photos whose top-1 class INT8 and fp32 agree on
SEED = 0


class AgreementTooLow(MixNetError):
    """The INT8 model disagreed with fp32 on more held-back photos than allowed."""


# The modules each backend imports: to run its INT8 graph, and to make one from an ONNX file (making one
# from a model exports it to ONNX first, which needs EXPORTER too); and the pip extra installing each.
RUNTIME_MODULES = {"openvino": ("openvino",), "onnxruntime": ("onnxruntime",)}
QUANTIZER_MODULES = {"openvino": ("openvino", "nncf"), "onnxruntime": ("onnxruntime",)}
EXPORTER = "onnxscript"
EXTRAS = {"openvino": "openvino", "nncf": "openvino", "onnxruntime": "onnx", EXPORTER: "onnx"}


def _require_backend(backend: str, modules: Dict[str, Tuple[str, ...]], purpose: str, *more: str) -> None:
    """A one-line error unless ``backend`` is known and ``modules[backend]`` and ``more`` all import."""
    if backend not in BACKENDS:
        raise MixNetError(f"unknown quantization backend {backend!r}; choose from {', '.join(BACKENDS)}")
    for module in modules[backend] + more:
        require(module, EXTRAS[module], purpose)


def _quantizing(backend: str) -> str:
    return f"INT8 quantization with the {backend} backend"


def quantize_onnx(source: PathLike, output: PathLike, calibration: Sequence[np.ndarray], backend: str) -> Path:
    """Write the INT8 form of the fp32 ONNX file ``source`` to ``output``, calibrated on ``calibration``
    (NCHW float arrays, one image each, already preprocessed). OpenVINO writes ``output`` (.xml) and the
    .bin beside it; onnxruntime writes an ONNX file with QDQ nodes."""
    _require_backend(backend, QUANTIZER_MODULES, _quantizing(backend))
    if not calibration:
        raise MixNetError("INT8 quantization needs at least one calibration image")
    output = Path(output)
    if backend == "openvino":
        import nncf
        import openvino as ov

        model = ov.Core().read_model(str(source))
        with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars; stdout may be JSON output
            quantized = nncf.quantize(model, nncf.Dataset(list(calibration)), subset_size=len(calibration),
                                      preset=nncf.QuantizationPreset.MIXED, fast_bias_correction=False)
        ov.save_model(quantized, str(output), compress_to_fp16=False)
        return output
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    input_name = OnnxRuntimeModel(source, num_threads=1).input_name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(calibration)

        def get_next(self):
            item = next(self.items, None)
            return None if item is None else {input_name: item}

    with tempfile.TemporaryDirectory(prefix="mixnet-quant-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared))  # shape inference and graph clean-up first
        # Only convolutions and the classifier: with Swish, SE's sigmoid/mul and pooling quantized too,
        # the built-in model fell to 89% top-1 agreement with fp32 on Imagenette val (RESULTS.md).
        quantize_static(str(prepared), str(output), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["Conv", "Gemm"])
    return output


def int8_runner(path: PathLike, backend: str, num_threads: Optional[int] = None) -> Callable[[Tensor], Tensor]:
    """The runtime that runs an INT8 graph written by ``quantize_onnx``."""
    _require_backend(backend, RUNTIME_MODULES, f"running the INT8 graph {path}")
    if backend == "openvino":
        return OpenVinoModel(path, "f32", num_threads)
    return OnnxRuntimeModel(path, num_threads)


# ---------------------------------------------------------------------------------------------
# Quantized model folders


def is_quantized_folder(path: Optional[PathLike]) -> bool:
    return path is not None and (Path(path) / QUANT_CONFIG).is_file()


def quantized_folder(*sources: Optional[PathLike]) -> Optional[PathLike]:
    """The first of ``sources`` (a model's --weights and --model) that is a quantized model folder."""
    return next((s for s in sources if is_quantized_folder(s)), None)


def model_precision(precision: Optional[str], *sources: Optional[PathLike]) -> str:
    """The precision a model runs in: ``precision`` when one is asked for, else int8 when one of
    ``sources`` is a quantized model folder (its INT8 graph runs) and fp32 otherwise."""
    return precision or ("int8" if quantized_folder(*sources) else "fp32")


def read_quantization_config(folder: PathLike) -> dict:
    path = Path(folder) / QUANT_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MixNetError(f"{path}: not a readable quantization config ({e})") from None
    if config.get("backend") not in BACKENDS or not isinstance(config.get("graph"), str):
        raise MixNetError(f"{path}: needs a backend ({', '.join(BACKENDS)}) and a graph file name")
    return config


def load_quantized(folder: PathLike, num_threads: Optional[int] = None) -> Callable[[Tensor], Tensor]:
    """The INT8 graph of a folder written by ``quantize_model``, ready to run (NCHW float in, logits out)."""
    config = read_quantization_config(folder)
    graph = Path(folder) / config["graph"]
    if not graph.is_file():
        raise MixNetError(f"{graph}: no such file (named in {Path(folder) / QUANT_CONFIG})")
    return int8_runner(graph, config["backend"], num_threads)


# ---------------------------------------------------------------------------------------------
# Calibration photos and the check against fp32


def min_check_images(min_agreement: float, check_images: int) -> int:
    """The fewest held-back photos on which a ``min_agreement`` percent bar means something: enough that
    one disagreement costs no more than the bar allows (100 / n <= 100 - min_agreement; 50 photos for
    98%). Fewer, and the bar can pass on a handful of photos that say nothing about the rest. A 100%
    bar allows no disagreement at all; it is checked on all ``check_images`` photos asked for."""
    if min_agreement >= 100:
        return check_images
    return math.ceil(100 / (100 - min_agreement) - 1e-9)  # 100 - 99.9 is a little under 0.1 in floats


def split_photos(folder: PathLike, images: int, check_images: int,
                 min_agreement: float = DEFAULT_MIN_AGREEMENT) -> Tuple[List[Path], List[Path]]:
    """Calibration and held-back photos from ``folder``: a fixed shuffle, the first ``images`` for
    calibration and up to ``check_images`` of the rest for the check. Where that would leave fewer than
    ``min_check_images`` held back, a fifth of the photos (at least that many) is held back instead, and
    a folder too small for both is refused."""
    needed = min_check_images(min_agreement, check_images)
    bar = f"checking a {min_agreement:g}% agreement bar needs at least {needed} held-back photos"
    if needed > check_images:
        raise MixNetError(f"--check-images {check_images}: too few; {bar}")
    files = list_image_files([folder])
    if len(files) < needed + 1:
        raise MixNetError(f"{folder}: {len(files)} image file(s); quantization needs at least {needed + 1}: "
                          f"one to calibrate on, and {bar} (add photos or lower --min-agreement)")
    random.Random(SEED).shuffle(files)
    calibrate = images if len(files) - images >= needed else len(files) - max(needed, len(files) // 5)
    return files[:calibrate], files[calibrate:calibrate + check_images]


def photo_labels(folder: PathLike, files: Sequence[Path], model) -> Optional[List[int]]:
    """Each photo's class index when ``folder`` is labelled (class folders named by the model's classes,
    as validate matches them), else None."""
    from ..inference.validate import map_folders_to_classes

    folder = Path(folder)
    try:
        mapping = map_folders_to_classes(folder_classes(folder), model)
    except MixNetError:
        return None
    labels = []
    for f in files:
        top = f.relative_to(folder).parts[0]
        if top not in mapping:
            return None
        labels.append(mapping[top])
    return labels


def load_batches(model, files: Sequence[Path], batch_size: int = 32, workers: int = 0,
                 transform: Optional[Callable] = None):
    """(indices, NCHW tensor) batches of ``files`` through ``transform`` (default: the model's eval
    transform); unreadable photos are dropped, each named on stderr with its problem."""
    loader = DataLoader(ImageList(files, transform or build_eval_transform(model)), batch_size=batch_size,
                        num_workers=workers, collate_fn=collate)
    for batch in loader:
        for failure in batch.failures:
            print(f"skipped: {failure.path}: {failure.problem}", file=sys.stderr)
        if len(batch.targets):
            yield batch.targets.tolist(), batch.images


@dataclass
class CheckResult:
    """Top-1 agreement of INT8 with fp32 (percent) on held-back photos, and accuracies when labelled."""

    images: int
    agreement: float
    fp32_top1: Optional[float] = None
    int8_top1: Optional[float] = None

    def summary(self) -> str:
        text = f"top-1 agreement with fp32 {self.agreement:.2f}% on {self.images} held-back photos"
        if self.fp32_top1 is not None:
            text += f"; top-1 fp32 {self.fp32_top1:.2f}%, INT8 {self.int8_top1:.2f}%"
        return text


@torch.no_grad()
def compare_top1(reference: Callable[[Tensor], Tensor], candidate: Callable[[Tensor], Tensor], model,
                 files: Sequence[Path], labels: Optional[Sequence[int]] = None, batch_size: int = 32,
                 workers: int = 0) -> CheckResult:
    """Run both forwards on ``files`` and count top-1 agreement (and accuracy against ``labels``)."""
    agree = right_ref = right_cand = total = 0
    for indices, x in load_batches(model, files, batch_size, workers):
        ref = reference(x).argmax(1)
        cand = candidate(x).argmax(1)
        agree += int((ref == cand).sum())
        if labels is not None:
            target = torch.tensor([labels[i] for i in indices])
            right_ref += int((ref == target).sum())
            right_cand += int((cand == target).sum())
        total += len(indices)
    if total == 0:
        raise MixNetError(f"none of the {len(files)} held-back photos could be read (the lines above say why)")
    pct = lambda n: 100.0 * n / total  # noqa: E731
    return CheckResult(total, pct(agree), pct(right_ref) if labels is not None else None,
                       pct(right_cand) if labels is not None else None)


@dataclass
class QuantizeResult:
    path: Path
    backend: str
    calibration_images: int
    check: CheckResult
    size_bytes: int
    files: List[str] = field(default_factory=list)


def _replace_folder(new: Path, output: Path) -> None:
    """Put the folder ``new`` in place of ``output`` (there or not) by renames: the old folder is moved
    aside whole and deleted only once the new one is in place, so a crash leaves one of them complete."""
    aside = new.with_name(new.name + ".old")  # ``new`` is a fresh mkdtemp name: nothing else has this one
    if output.exists():
        output.rename(aside)
    try:
        new.rename(output)
    except OSError:
        if aside.exists():
            aside.rename(output)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _prepare_output(output: Path) -> None:
    if output.exists() and not is_quantized_folder(output):
        raise MixNetError(f"{output}: exists and is not a quantized model folder; choose another --output")
    check_writable_file(output, "output", folder=True)  # before the photos are read, not at the first write


def quantize_model(model: nn.Module, calibration: PathLike, output: PathLike, backend: str = DEFAULT_BACKEND,
                   images: int = DEFAULT_IMAGES, check_images: int = DEFAULT_CHECK_IMAGES,
                   min_agreement: float = DEFAULT_MIN_AGREEMENT, workers: int = 0,
                   progress: Optional[Callable[[str], None]] = None) -> QuantizeResult:
    """Quantize ``model`` to INT8, calibrated on ``images`` photos from ``calibration``, and write the
    quantized model folder ``output`` (see the module docstring).

    Before the folder is put in place, fp32 and INT8 classify up to ``check_images`` photos held back
    from calibration; below ``min_agreement`` percent top-1 agreement it raises ``AgreementTooLow`` and
    leaves ``output`` as it was. Too few photos to hold back (or read) for that bar to mean anything
    (``min_check_images``) is a MixNetError, as is a calibration set of which none could be read;
    unreadable photos are named on stderr and left out.
    """
    from ..pretrained.checkpoint import save_pretrained

    _require_backend(backend, QUANTIZER_MODULES, _quantizing(backend), EXPORTER)
    output = Path(output)
    _prepare_output(output)
    say = progress or (lambda message: None)
    calibrate_files, check_files = split_photos(calibration, images, check_images, min_agreement)
    model = model.eval()
    say(f"calibrating on {len(calibrate_files)} photos from {calibration}, checking on {len(check_files)}")
    calibration_arrays = [x[i:i + 1].numpy() for _, x in load_batches(model, calibrate_files, workers=workers)
                          for i in range(len(x))]
    if not calibration_arrays:
        raise MixNetError(f"{calibration}: none of the {len(calibrate_files)} calibration photos could be read "
                          f"(the lines above say why)")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        fp32_onnx = export_model(model, staging / "fp32.onnx", "onnx").path
        graph = quantize_onnx(fp32_onnx, staging / GRAPH_FILES[backend], calibration_arrays, backend)
        fp32_onnx.unlink()
        save_pretrained(model, staging)
        check = compare_top1(model, int8_runner(graph, backend), model, check_files,
                             photo_labels(calibration, check_files, model), workers=workers)
        needed = min_check_images(min_agreement, check_images)
        if check.images < needed:
            raise MixNetError(f"{calibration}: {check.images} of the {len(check_files)} held-back photos could be "
                              f"read (the lines above say why); checking a {min_agreement:g}% agreement bar needs "
                              f"at least {needed}")
        config = dict(backend=backend, graph=graph.name, calibration_images=len(calibration_arrays),
                      calibration_folder=str(calibration), check=asdict(check))
        with atomic_write(staging / QUANT_CONFIG, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        if not check.agreement >= min_agreement:
            raise AgreementTooLow(f"INT8 ({backend}) {check.summary()}, below the required "
                                  f"{min_agreement:g}%; nothing written to {output}")
        staging.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700; the folder gets ordinary permissions
        _replace_folder(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    files = sorted(p.name for p in output.iterdir())
    size = sum(p.stat().st_size for p in output.iterdir() if p.name.startswith(Path(graph.name).stem))
    return QuantizeResult(output, backend, len(calibration_arrays), check, size, files)
