"""Export a MixNet to ONNX, TorchScript or a torch.export program (pt2), and run exported files.

Every export has a dynamic batch size and image height/width (tf_ models included: their "SAME"
padding is computed from the input's size inside the graph) and is checked after writing: the file
is loaded back, run on random images of two sizes, and compared with the PyTorch model.

The exported graph is the inference form (batch norm folded, MixConvs merged: see optimize.py), which
is also the form onnxruntime runs fastest.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..errors import MixNetError, first_line, require
from ..fileio import PathLike, atomic_write
from ..models.network import MixNet
from ..models.fusion import MergeChoice, optimize_for_inference

FORMATS = ("onnx", "torchscript", "pt2")
SUFFIXES = {".onnx": "onnx", ".ts": "torchscript", ".pt": "torchscript", ".pt2": "pt2"}
DEFAULT_TOLERANCE = 1e-4
# torch.export specialises a dimension of size 1, so trace with batch 2; and at 32 pixels the last
# feature map is 1x1, which makes torch.export add a guard, so the dynamic range starts at 33.
EXAMPLE_SHAPE = (2, 3, 64, 64)
MIN_DYNAMIC_SIZE = 33
INPUT_NAME, OUTPUT_NAME = "images", "logits"


def format_from_path(path: PathLike) -> str:
    """The export format implied by a file's suffix (.onnx, .ts/.pt, .pt2)."""
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise MixNetError(f"{path}: cannot tell the format from the suffix {suffix!r}; "
                          f"use one of {', '.join(SUFFIXES)} or pass the format explicitly")
    return SUFFIXES[suffix]


def _input_channels(model: nn.Module) -> int:
    return getattr(model, "in_chans", 3)


def _check_shapes(model: nn.Module) -> List[Tuple[int, int, int, int]]:
    """Batch 1 at the model's own input size and batch 3 at an odd, non-square size."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    _, height, width = cfg.get("input_size", (3, 224, 224))
    channels = _input_channels(model)
    return [(1, channels, height, width), (3, channels, 97, 131)]


def _dynamic_dims():
    batch = torch.export.Dim("batch", min=1, max=4096)
    height = torch.export.Dim("height", min=MIN_DYNAMIC_SIZE, max=8192)
    width = torch.export.Dim("width", min=MIN_DYNAMIC_SIZE, max=8192)
    return {"x": {0: batch, 2: height, 3: width}}


def _onnx_bytes(module: nn.Module, example: Tensor) -> bytes:
    try:
        import onnxscript  # noqa: F401  (the exporter needs it; fail with a clear message)
    except ImportError:
        raise MixNetError("ONNX export needs onnxscript: pip install 'mixnet[onnx]'") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (example,), dynamo=True, verbose=False,
                                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamic_shapes=_dynamic_dims())
    return program.model_proto.SerializeToString()


def _torchscript_bytes(module: nn.Module, example: Tensor) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    return buffer.getvalue()


def _pt2_bytes(module: nn.Module, example: Tensor) -> bytes:
    program = torch.export.export(module, (example,), dynamic_shapes=_dynamic_dims())
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


EXPORTERS: dict[str, Callable[[nn.Module, Tensor], bytes]] = {
    "onnx": _onnx_bytes, "torchscript": _torchscript_bytes, "pt2": _pt2_bytes,
}


class OnnxRuntimeModel:
    """An exported ONNX file run by onnxruntime, called like the PyTorch model: NCHW float in, logits out."""

    def __init__(self, path: PathLike, num_threads: Optional[int] = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise MixNetError("running ONNX files needs onnxruntime: pip install 'mixnet[onnx]'") from None
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Same thread budget as PyTorch, so comparisons between the two are fair.
        options.intra_op_num_threads = num_threads or torch.get_num_threads()
        options.log_severity_level = 3
        self.path = Path(path)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for unreadable files
            raise MixNetError(f"{path}: not a loadable ONNX model ({first_line(e)})") from None
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: Tensor) -> Tensor:
        array = x.detach().cpu().contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])

    def eval(self) -> "OnnxRuntimeModel":
        return self


def load_exported(path: PathLike, fmt: Optional[str] = None) -> Callable[[Tensor], Tensor]:
    """A callable running an exported file (any of FORMATS) on NCHW float tensors."""
    fmt = fmt or format_from_path(path)
    if not Path(path).is_file():
        raise MixNetError(f"{path}: no such file")
    if fmt == "onnx":
        return OnnxRuntimeModel(path)
    try:
        if fmt == "torchscript":
            return torch.jit.load(str(path), map_location="cpu").eval()
        if fmt == "pt2":
            return torch.export.load(str(path)).module()
    except Exception as e:
        raise MixNetError(f"{path}: not a loadable {fmt} file ({first_line(e)})") from None
    raise MixNetError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")


@dataclass
class ExportResult:
    path: Path
    format: str
    size_bytes: int
    max_diff: float  # relative to the logit scale (max |logit|, at least 1)
    checked_shapes: List[Tuple[int, ...]] = field(default_factory=list)


@torch.no_grad()
def compare_with_model(runner: Callable[[Tensor], Tensor], model: nn.Module,
                       shapes: Sequence[Tuple[int, int, int, int]], seed: int = 0,
                       relative: bool = False) -> float:
    """The largest difference between ``runner`` and ``model`` outputs on random images: absolute, or
    with ``relative`` divided by the logits' scale (max |logit|, at least 1). A trained model's logits on
    noise input reach the hundreds, where fp32 rounding alone exceeds 1e-4 absolute."""
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for shape in shapes:
        x = torch.randn(shape, generator=generator)
        expected = model(x).float()
        diff = (runner(x).float() - expected).abs().max().item()
        if relative:
            diff /= max(1.0, expected.abs().max().item())
        worst = max(worst, diff)
    return worst


def export_model(model: nn.Module, output: PathLike, fmt: Optional[str] = None,
                 tolerance: float = DEFAULT_TOLERANCE, check: bool = True,
                 check_shapes: Optional[Sequence[Tuple[int, int, int, int]]] = None,
                 merge_mixconv: MergeChoice = True) -> ExportResult:
    """Write ``model`` (eval mode, inference form) to ``output`` and check the file reproduces it.

    The check runs the written file on random input of ``check_shapes`` (default: batch 1 at the
    model's input size and batch 3 at an odd size). Raises MixNetError, and leaves no file behind,
    when the exported model differs from the PyTorch model by more than ``tolerance`` on any logit
    (relative to the logits' scale when that exceeds 1). ``merge_mixconv=False`` keeps each MixConv as
    its separate depthwise convs (the graph some runtimes run faster, see deploy/quantize.py).
    """
    if not isinstance(model, MixNet):
        raise MixNetError(f"export expects a MixNet classifier, got {type(model).__name__}")
    fmt = fmt or format_from_path(output)
    if fmt not in EXPORTERS:
        raise MixNetError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    if check and fmt == "onnx":  # the check runs the file in onnxruntime: say so before the export, not after
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise MixNetError("checking an ONNX export runs it in onnxruntime: pip install 'mixnet[onnx]' "
                              "(or skip the check: --no-check, check=False)") from None
    output = Path(output)
    model = model.eval()
    module = optimize_for_inference(model, merge_mixconv=merge_mixconv, channels_last=False)
    example = torch.randn(EXAMPLE_SHAPE[0], _input_channels(model), *EXAMPLE_SHAPE[2:])
    data = EXPORTERS[fmt](module, example)

    shapes = list(check_shapes or _check_shapes(model))
    diff = float("nan")
    if check:
        # Check a temporary copy first, so a bad export never replaces a good file at ``output``.
        check_path = output.with_name(f".{output.stem}.check{output.suffix}")
        with atomic_write(check_path) as f:
            f.write(data)
        try:
            diff = compare_with_model(load_exported(check_path, fmt), model, shapes, relative=True)
        finally:
            check_path.unlink(missing_ok=True)
        if not diff <= tolerance:
            raise MixNetError(f"{output}: exported {fmt} model differs from PyTorch by {diff:.3g} of the logit scale "
                              f"(tolerance {tolerance:g}); file not written")
    with atomic_write(output) as f:
        f.write(data)
    return ExportResult(output, fmt, len(data), diff, shapes if check else [])


def onnxruntime_forward(model: nn.Module, path: Optional[PathLike] = None) -> OnnxRuntimeModel:
    """onnxruntime running ``path`` (an ONNX file exported from ``model``), or, without a path, ``model``
    exported (and checked) to a temporary file first. The model's class count must match the file's."""
    require("onnxruntime", "onnx", "running ONNX files")  # before any export: the same line as OnnxRuntimeModel's
    if path is None:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="mixnet-onnx-") as tmp:
            exported = export_model(model, Path(tmp) / "model.onnx", "onnx")
            return OnnxRuntimeModel(exported.path)  # the session holds the graph; the file may go
    runner = OnnxRuntimeModel(path)
    width = runner.session.get_outputs()[0].shape[-1]
    expected = getattr(model, "num_classes", None)
    if isinstance(width, int) and expected is not None and width != expected:
        raise MixNetError(f"{path}: the ONNX model has {width} outputs but the model's config has "
                          f"{expected} classes; pass the --model/--weights it was exported from")
    return runner
