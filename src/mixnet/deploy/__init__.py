"""Deploying a model: export to ONNX / TorchScript / PT2, and benchmarks against timm."""
