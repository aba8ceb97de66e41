"""vmoe: Vision Mixture-of-Experts (V-MoE) in PyTorch."""

__version__ = "0.1.0"
