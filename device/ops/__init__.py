"""Fused ops with their pure-PyTorch twins."""

from fieldlearn.device.ops.attention_distill import attention_distill, attention_distill_ref

__all__ = ["attention_distill", "attention_distill_ref"]
