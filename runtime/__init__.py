"""fieldlearn.runtime: what an inference-only device needs, and the resources every part of
fieldlearn shares: engines (torch, ONNX Runtime, TensorRT) that behave like a model,
`fieldlearn classify`, the state directory's layout (layout), atomic writes (atomic), model
metadata and the version (metadata), safe file reads (files) and the user-facing error
(errors). Imports nothing from fieldlearn.device and runs without torch.
"""
