"""Offline checkpoint conversion (`popo convert`): HF <-> Megatron and Megatron at another layout."""
