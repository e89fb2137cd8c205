"""Fused ONNX / TensorRT export (installed as dsah_rt.export)."""
