"""Token-level KD: one method per registered KD divergence (docs/design.md, baselines).

The divergences are registered in ``losses/divergences.py`` with ``@register_kd_loss``; each becomes
a method of the same name here, so a new divergence needs no change in this module. Off-policy the
rows are the teacher's responses and the teacher's top-k comes from the cache (``pbkd.cache_path``)
or the live teacher; with ``pbkd.on_policy=true`` the rows are student samples scored by the live
teacher (GKD).
"""

from rgkd_megatron.losses.divergences import registered_kd_losses
from rgkd_megatron.methods.registry import register_method
from rgkd_megatron.methods.spec import MethodSpec, TeacherNeed

KD_TRAINER = "rgkd_megatron.pbkd.kd:KDTrainer"


def kd_method(name: str, description: str) -> MethodSpec:
    """The token-level KD method of the divergence ``name``."""
    return MethodSpec(
        name=name,
        description=f"token-level KD: {description}",
        trainer=KD_TRAINER,
        teacher=TeacherNeed.LIVE | TeacherNeed.CACHE,
        rollouts="on_policy",
        kd_loss=name,
    )


KD_METHODS = tuple(register_method(kd_method(loss.name, loss.description)) for loss in registered_kd_losses())
