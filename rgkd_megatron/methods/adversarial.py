"""The reward-guided methods: black-box PbKD and white-box MM-PbKD (docs/design.md, the algorithm)."""

from rgkd_megatron.methods.registry import register_method
from rgkd_megatron.methods.spec import MethodSpec, TeacherNeed

PBKD = register_method(
    MethodSpec(
        name="pbkd",
        description="black-box min-max: a bounded sequence reward model against the student (RLOO policy gradient)",
        trainer="rgkd_megatron.pbkd.trainer:PbKDTrainer",
        reward_head="scalar",
        teacher=TeacherNeed.SAMPLES,
        collects=True,
        rollouts="always",
        policy_gradient=True,
    )
)

MM_PBKD = register_method(
    MethodSpec(
        name="mm_pbkd",
        description="white-box min-max: a token-level Q-function read through the live teacher's top-k",
        trainer="rgkd_megatron.pbkd.mm:MMPbKDTrainer",
        reward_head="q",
        teacher=TeacherNeed.LIVE | TeacherNeed.SAMPLES,
        collects=True,
        rollouts="always",
        policy_gradient=True,
        adversary_pipeline=False,
    )
)
