"""fieldlearn.device.ops: fused ops with their pure-PyTorch twins. Each op is one module
holding the `_ref` reference, the autograd Function and the dispatcher side by side
(attention_distill), with the compiled kernel's launcher in a module of its own below it
(cuda_attention), which the op imports only when a CUDA tensor arrives."""

from fieldlearn.device.ops.attention_distill import attention_distill, attention_distill_ref

__all__ = ["attention_distill", "attention_distill_ref"]
