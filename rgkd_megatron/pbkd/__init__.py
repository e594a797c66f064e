"""Reward-guided preference-based KD: judges, the RM/policy steps, online rounds (DESIGN.md s.4)."""
