"""POPO (Positive-Only Policy Optimization) for RLVR on Megatron-Core."""

__version__ = "0.1.0"
