"""shoal: a deep-learning training platform. This package gives a Python training script
shoal's data plane; `shoal.torch` is the PyTorch interface (Horovod's shape:
`init`, `allreduce_`, `broadcast_parameters`, `DistributedOptimizer`)."""

from ._native import ShoalError  # noqa: F401

__all__ = ["ShoalError"]
