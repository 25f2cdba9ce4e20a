"""Deploying a model: export (ONNX, TorchScript, PT2), INT8 quantization, the optional runtimes
(OpenVINO), and benchmarks against timm."""
