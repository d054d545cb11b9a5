"""Rollout engines: generation from the current policy and weight updates from the trainer."""
