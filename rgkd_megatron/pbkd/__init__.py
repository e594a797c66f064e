"""Reward-guided preference-based KD: judges, the RM/policy steps, online rounds (docs/design.md, the algorithm)."""
