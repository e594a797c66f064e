"""rgkd_megatron: reward-guided preference-based LLM distillation on megatron-core."""

__version__ = "0.1.0"
