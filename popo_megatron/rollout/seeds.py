"""The sampling seeds of a run's rollouts, so that a resumed run samples exactly what the uninterrupted
one would have: step s samples prompt j of dynamic-sampling round r with

    seed + STEP_SEED_STRIDE * s + ROUND_SEED_STRIDE * r + j
"""

STEP_SEED_STRIDE = 1_000_003
ROUND_SEED_STRIDE = 100_003
MAX_ROUNDS = 9  # MAX_ROUNDS * ROUND_SEED_STRIDE < STEP_SEED_STRIDE: rounds stay below the next step's seeds


def step_seed(seed: int, step: int) -> int:
    """The seed of prompt 0, round 0 of `step`."""
    return seed + STEP_SEED_STRIDE * step


def round_seed(step_seed: int, round_index: int) -> int:
    """The seed of prompt 0 of a dynamic-sampling round."""
    return step_seed + ROUND_SEED_STRIDE * round_index
