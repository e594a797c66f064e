"""User judges, found through the ``rgkd_megatron.judges`` entry-point group, never through a config.

A config names a judge that an installed package registered (``pbkd.judge_entry_point=length``);
it can never name a module or function to import, so no code is run because a config says so::

    # pyproject.toml of the user's package
    [project.entry-points."rgkd_megatron.judges"]
    length = "my_judges.scores:longer_is_better"

    # or setup.py
    setup(..., entry_points={"rgkd_megatron.judges": ["length = my_judges.scores:longer_is_better"]})

The registered object must be a callable ``(prompt: str, response: str) -> float``: its signature
is checked before the first call, and every score it returns must be a finite real number.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import math
import numbers
import re
from collections.abc import Callable

__all__ = ["JUDGE_GROUP", "check_judge_name", "load_registered_judge", "registered_judges"]

JUDGE_GROUP = "rgkd_megatron.judges"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
HOW_TO_REGISTER = (
    f"register the function (prompt, response) -> float in the '{JUDGE_GROUP}' entry-point group of "
    f'an installed package, e.g. in its pyproject.toml [project.entry-points."{JUDGE_GROUP}"] '
    f'my_judge = "my_pkg.judges:score" or in its setup.py entry_points={{"{JUDGE_GROUP}": '
    f'["my_judge = my_pkg.judges:score"]}}, pip install it, then set pbkd.judge_entry_point=my_judge '
    "(see docs/guide.md, 'User judges')"
)


def registered_judges() -> dict[str, importlib.metadata.EntryPoint]:
    """Name -> entry point of every judge registered by an installed package."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=JUDGE_GROUP)}


def check_judge_name(name: str) -> str | None:
    """The problem with ``pbkd.judge_entry_point=name`` (None when a judge of that name is
    registered); a ``module:function`` string is refused without importing anything."""
    field = "pbkd.judge_entry_point"
    if ":" in name or not _NAME.match(name):
        return (
            f"{field}: expected the name of a registered judge, got {name!r}; a config never names code "
            f"to import: {HOW_TO_REGISTER}"
        )
    known = registered_judges()
    if name not in known:
        return f"{field}: no judge {name!r} is registered (registered: {sorted(known) or 'none'}); {HOW_TO_REGISTER}"
    return None


def _check_signature(name: str, func: object) -> None:
    if not callable(func):
        raise ValueError(f"judge {name!r} ({JUDGE_GROUP}): expected a callable, got {type(func).__name__}")
    try:
        inspect.signature(func).bind("prompt", "response")
    except TypeError as exc:
        raise ValueError(
            f"judge {name!r} ({JUDGE_GROUP}): expected a callable (prompt: str, response: str) -> float, "
            f"got signature {inspect.signature(func)} ({exc})"
        ) from None
    except ValueError:  # no signature (some builtins): the score check below still guards every call
        pass


def load_registered_judge(name: str) -> Callable[[str, str], float]:
    """The registered judge ``name`` as ``(prompt, response) -> float``, its signature checked and
    each score checked to be a finite real number (ValueError naming the judge otherwise)."""
    problem = check_judge_name(name)
    if problem:
        raise ValueError(problem)
    entry_point = registered_judges()[name]
    try:
        func = entry_point.load()
    except (ImportError, AttributeError) as exc:
        raise ValueError(
            f"judge {name!r}: cannot load {entry_point.value} registered in {JUDGE_GROUP} ({exc})"
        ) from exc
    _check_signature(name, func)

    def score(prompt: str, response: str) -> float:
        value = func(prompt, response)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(
                f"judge {name!r} ({entry_point.value}): expected a finite float score, got {value!r}"
            )
        return float(value)

    return score
