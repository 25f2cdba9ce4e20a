"""Optional inference runtimes (OpenVINO) and the CPU checks for lower precision.

Heavy runtimes are pip extras: ``require`` turns a missing one into a one-line error naming the pip
command. bf16 is offered only on CPUs with native bf16 dot products (AVX512_BF16 or AMX): elsewhere the
runtimes emulate it, slower than fp32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

from ..errors import MixNetError, first_line, require
from ..fileio import PathLike

# Kept free of torch at import: the CLI reads these constants to build its parser.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
CPUINFO = Path("/proc/cpuinfo")
INT8_BACKENDS = ("openvino", "onnxruntime")  # runtimes of deploy/quantize.py's INT8 graphs
DEFAULT_INT8_BACKEND = "openvino"  # the faster INT8 runtime measured (benchmarks/RESULTS.md)


def cpu_flags(cpuinfo: Optional[PathLike] = None) -> set:
    """The feature flags of the first CPU listed in /proc/cpuinfo (empty where it cannot be read)."""
    try:
        for line in Path(cpuinfo or CPUINFO).read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (elsewhere bf16 is emulated, slower than fp32)."""
    return bool(cpu_flags() & set(BF16_CPU_FLAGS))


def check_bf16_cpu(option: str = "--precision bf16", instead: str = "fp32 or int8") -> None:
    """Raise a MixNetError naming ``option`` unless this CPU computes bf16 natively."""
    if not native_bf16():
        raise MixNetError(f"{option} needs a CPU with {' or '.join(BF16_CPU_FLAGS)} (not in {CPUINFO}); "
                          f"this one would emulate bf16, slower than fp32: use {instead}")


class OpenVinoModel:
    """An ONNX file or OpenVINO IR run by OpenVINO on the CPU, called like the PyTorch model.

    ``precision`` is OpenVINO's inference precision hint ("f32" or "bf16"): with "bf16" the float parts
    of the graph run in bf16 (an INT8 graph's quantized layers stay INT8). The graph is compiled once per
    input shape (static shapes are what the CPU plugin runs fastest); one infer request per shape.
    """

    def __init__(self, path: PathLike, precision: str = "f32", num_threads: Optional[int] = None):
        import torch

        ov = require("openvino", "openvino", "running models in OpenVINO")
        self.path = Path(path)
        self.precision = precision
        self.core = ov.Core()
        self.config = {"INFERENCE_NUM_THREADS": num_threads or torch.get_num_threads(),
                       "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision}
        try:
            self.model = self.core.read_model(str(path))
        except Exception as e:  # OpenVINO raises RuntimeError subclasses of its own
            raise MixNetError(f"{path}: not a model OpenVINO can read ({first_line(e)})") from None
        self._requests: Dict[Tuple[int, ...], object] = {}

    def request(self, shape: Tuple[int, ...]):
        if shape not in self._requests:
            model = self.model.clone()
            model.reshape(list(shape))
            self._requests[shape] = self.core.compile_model(model, "CPU", self.config).create_infer_request()
        return self._requests[shape]

    def __call__(self, x):
        import torch

        array = x.detach().cpu().float().contiguous().numpy()
        result = self.request(tuple(array.shape)).infer({0: array})
        return torch.from_numpy(result[0].copy())

    def eval(self) -> "OpenVinoModel":
        return self


def openvino_forward(model, precision: str, path: Optional[PathLike] = None,
                     merge_mixconv: bool = True) -> OpenVinoModel:
    """OpenVINO running ``path`` (an ONNX file or IR), or ``model`` exported to a temporary ONNX file."""
    if path is not None:
        return OpenVinoModel(path, precision)
    import tempfile

    from .export import export_model

    require("openvino", "openvino", "running models in OpenVINO")
    with tempfile.TemporaryDirectory(prefix="mixnet-openvino-") as tmp:
        exported = export_model(model, Path(tmp) / "model.onnx", "onnx", merge_mixconv=merge_mixconv)
        return OpenVinoModel(exported.path, precision)  # an ONNX file is read whole: the file may go
