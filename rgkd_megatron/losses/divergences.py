"""The KD divergences on the "top-k + tail" buckets, registered by name (docs/adding_a_method.md).

Each divergence is a function of the teacher's and the student's bucket log-probs (and their
exps), per token, summed over the buckets b (p the teacher, q the student)::

    fkl       KL(p || q)       = sum p (log p - log q)
    rkl       KL(q || p)       = sum q (log q - log p)
    jsd       beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q   (GKD/TRL, 0 < beta < 1)
    skew_fkl  KL(p || alpha p + (1 - alpha) q)          (DistiLLM skew KL, 0 <= alpha < 1)
    skew_rkl  KL(q || alpha q + (1 - alpha) p)          (DistiLLM skew reverse KL, 0 <= alpha < 1)
    tvd       0.5 sum |p - q|

``@register_kd_loss(name, params=..., description=...)`` adds one: ``losses/topk_kd.py`` (and the
fused and Triton paths) look the divergence up here, ``KD_KINDS`` is the registered names, and
``methods/kd.py`` makes each one a ``pbkd.method`` of the same name. ``params`` names the mixture
weights the divergence reads (``beta``: ``pbkd.kd_beta`` in (0, 1); ``alpha``: ``pbkd.kd_alpha``
in [0, 1)), which ``topk_kd._check_options`` range-checks.

This module imports no torch (the functions use tensor methods only), so the method registry and
the config loader can read the names without loading torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

Divergence = Callable[..., "Tensor"]
"""``fn(log_p_tb, log_q_tb, p_tb, q_tb, *, beta, alpha) -> [*]``: per-token divergence over the last dim."""
MIXTURE_PARAMS = ("beta", "alpha")


@dataclass(frozen=True)
class KDLoss:
    """A registered KD divergence."""

    name: str
    fn: Divergence
    params: tuple[str, ...]
    """The mixture weights it reads: a subset of ("beta", "alpha")."""
    description: str


_KD_LOSSES: dict[str, KDLoss] = {}


def register_kd_loss(name: str, *, params: tuple[str, ...] = (), description: str = "") -> Callable:
    """Decorator: register ``fn(log_p_tb, log_q_tb, p_tb, q_tb, *, beta, alpha)`` as the KD divergence
    ``name`` (an identifier not yet registered; it also becomes the ``pbkd.method`` of that name)."""
    if not name.isidentifier() or name in _KD_LOSSES:
        raise ValueError(f"KD loss {name!r}: expected a new identifier (registered: {kd_loss_names()})")
    unknown = [p for p in params if p not in MIXTURE_PARAMS]
    if unknown:
        raise ValueError(f"KD loss {name!r}: params {unknown} are not among {MIXTURE_PARAMS}")

    def wrap(fn: Divergence) -> Divergence:
        _KD_LOSSES[name] = KDLoss(name, fn, tuple(params), description or name)
        return fn

    return wrap


def get_kd_loss(kind: str) -> KDLoss:
    """The divergence registered as ``kind`` (raises ValueError listing the registered names)."""
    if kind not in _KD_LOSSES:
        raise ValueError(f"kind={kind!r}: expected one of {kd_loss_names()}")
    return _KD_LOSSES[kind]


def kd_loss_names() -> tuple[str, ...]:
    """Registered divergence names, in registration order."""
    return tuple(_KD_LOSSES)


def registered_kd_losses() -> tuple[KDLoss, ...]:
    return tuple(_KD_LOSSES.values())


def log_mix(log_a: Tensor, log_b: Tensor, w: float) -> Tensor:
    """log(w * a + (1 - w) * b) from log a and log b."""
    if w == 0.0:
        return log_b
    return (log_a + math.log(w)).logaddexp(log_b + math.log1p(-w))


@register_kd_loss("fkl", description="forward KL(p || q)")
def forward_kl(log_p_tb: Tensor, log_q_tb: Tensor, p_tb: Tensor, q_tb: Tensor, **_: float) -> Tensor:
    return (p_tb * (log_p_tb - log_q_tb)).sum(-1)


@register_kd_loss("rkl", description="reverse KL(q || p)")
def reverse_kl(log_p_tb: Tensor, log_q_tb: Tensor, p_tb: Tensor, q_tb: Tensor, **_: float) -> Tensor:
    return (q_tb * (log_q_tb - log_p_tb)).sum(-1)


@register_kd_loss("jsd", params=("beta",), description="generalised Jensen-Shannon JSD(beta)")
def jensen_shannon(
    log_p_tb: Tensor, log_q_tb: Tensor, p_tb: Tensor, q_tb: Tensor, *, beta: float, **_: float
) -> Tensor:
    log_m_tb = log_mix(log_p_tb, log_q_tb, beta)
    kl_pm_t = (p_tb * (log_p_tb - log_m_tb)).sum(-1)
    kl_qm_t = (q_tb * (log_q_tb - log_m_tb)).sum(-1)
    return beta * kl_pm_t + (1.0 - beta) * kl_qm_t


@register_kd_loss("skew_fkl", params=("alpha",), description="skew KL(p || alpha p + (1 - alpha) q)")
def skew_forward_kl(
    log_p_tb: Tensor, log_q_tb: Tensor, p_tb: Tensor, q_tb: Tensor, *, alpha: float, **_: float
) -> Tensor:
    return (p_tb * (log_p_tb - log_mix(log_p_tb, log_q_tb, alpha))).sum(-1)


@register_kd_loss("skew_rkl", params=("alpha",), description="skew reverse KL(q || alpha q + (1 - alpha) p)")
def skew_reverse_kl(
    log_p_tb: Tensor, log_q_tb: Tensor, p_tb: Tensor, q_tb: Tensor, *, alpha: float, **_: float
) -> Tensor:
    return (q_tb * (log_q_tb - log_mix(log_q_tb, log_p_tb, alpha))).sum(-1)


@register_kd_loss("tvd", description="total variation 0.5 sum |p - q|")
def total_variation(log_p_tb: Tensor, log_q_tb: Tensor, p_tb: Tensor, q_tb: Tensor, **_: float) -> Tensor:
    return 0.5 * (p_tb - q_tb).abs().sum(-1)
