"""Fused kernels of the harness: the LRM reward head (Triton, with its PyTorch reference)."""
from lpo_kernels.reference import reward_head_reference
from lpo_kernels.reward_head import reward_head

__all__ = ["reward_head", "reward_head_reference"]
