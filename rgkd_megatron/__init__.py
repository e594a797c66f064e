"""rgkd_megatron: reward-guided preference-based LLM distillation on megatron-core.

The Python API (imported on first use, so ``import rgkd_megatron`` stays light)::

    import rgkd_megatron

    cfg = rgkd_megatron.load_config("examples/tiny_sft.yaml", ["train.train_iters=5"])
    rgkd_megatron.train(cfg)        # what rgkd-train does
    rgkd_megatron.distill(cfg)      # what rgkd-distill does

See ``rgkd_megatron.api`` for the details.
"""

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "distill", "load_config", "train"]

_API = ("distill", "load_config", "train")


def __getattr__(name: str) -> Any:
    if name in _API:
        from rgkd_megatron import api

        return getattr(api, name)
    raise AttributeError(f"module 'rgkd_megatron' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
