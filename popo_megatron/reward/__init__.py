"""Verifiable rewards: answer extraction, the math verifier, and the process pool that grades safely."""
