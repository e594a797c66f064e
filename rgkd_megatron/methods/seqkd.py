"""Sequence-level KD: cross-entropy on the teacher's responses (docs/design.md, baselines)."""

from rgkd_megatron.methods.registry import register_method
from rgkd_megatron.methods.spec import MethodSpec

SEQKD = register_method(
    MethodSpec(
        name="seqkd",
        description="sequence-level KD: cross-entropy on the teacher's responses",
        trainer="rgkd_megatron.pbkd.seqkd:SeqKDTrainer",
    )
)
