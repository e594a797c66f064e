"""A user-style reward function for the entry-point judge test (imported by name)."""


def longer_is_better(prompt: str, response: str) -> float:
    return float(len(response))
