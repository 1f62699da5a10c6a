"""fieldlearn.export: a trained model out to the formats a device runs: ONNX with its class
list in the metadata (onnx), TensorRT engines built once and cached (tensorrt), and a
version's deployable files staged, parity-checked against torch and published (deploy).
Imports fieldlearn.runtime, never fieldlearn.device.
"""
