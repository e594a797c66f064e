"""Model builders (policy, reward model, teacher) on megatron-core GPTModel."""
