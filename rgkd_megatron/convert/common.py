"""Shared pieces of the checkpoint tools: the error type, atomic output directories, dtypes, the
single-process group megatron's checkpointing needs, and copying tokenizer files along.

Design choices:
- Every user-facing problem is a ``ConversionError`` (a ``ValueError``) whose message starts with the
  offending tensor, field or path; the CLIs print it and exit with status 2.
- Outputs are built in a hidden sibling directory (``.NAME.tmp-PID``) and renamed onto the
  destination only when complete; a failure removes the temporary directory, so the destination is
  either absent (or untouched) or complete. A destination that exists and is not empty is refused.
- megatron-core ``dist_checkpointing`` needs ``torch.distributed``: converters run as ONE process
  and create a gloo group on an in-memory store (no port, no launcher) when none exists.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch

__all__ = [
    "AUX_FILES",
    "DTYPE_NAMES",
    "ConversionError",
    "atomic_output_dir",
    "check_destination",
    "copy_aux_files",
    "dtype_name",
    "format_bytes",
    "parse_dtype",
    "single_process_group",
]


class ConversionError(ValueError):
    """A bad input to a conversion tool; the message names the tensor, field or path."""


DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""--dtype choices of the tools (plus 'auto' = keep the source dtype)."""

_TORCH_DTYPE_STRINGS = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}

AUX_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
"""Files carried along unchanged between HF and Megatron directories (tokenizer, generation config)."""


def parse_dtype(name: str | None, field: str = "--dtype") -> torch.dtype | None:
    """'auto'/None -> None (keep the source dtype); fp32|bf16|fp16 or a torch dtype string."""
    if name is None or name == "auto":
        return None
    if name in DTYPE_NAMES:
        return DTYPE_NAMES[name]
    if name.removeprefix("torch.") in _TORCH_DTYPE_STRINGS:
        return _TORCH_DTYPE_STRINGS[name.removeprefix("torch.")]
    raise ConversionError(f"{field}: unknown dtype {name!r} (expected auto, fp32, bf16 or fp16)")


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16' (the spelling of HF config.json)."""
    return str(dtype).removeprefix("torch.")


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def check_destination(dst: str | os.PathLike) -> Path:
    """The destination must not exist, or be an empty directory."""
    dst = Path(dst)
    if dst.exists():
        if not dst.is_dir():
            raise ConversionError(f"--output {dst}: exists and is not a directory")
        if any(dst.iterdir()):
            raise ConversionError(f"--output {dst}: destination is not empty (choose a new directory)")
    if not dst.parent.exists():
        raise ConversionError(f"--output {dst}: parent directory {dst.parent} does not exist")
    return dst


@contextlib.contextmanager
def atomic_output_dir(dst: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``dst`` on success and vanishes on failure."""
    dst = check_destination(dst)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        check_destination(dst)  # nobody filled it meanwhile
        if dst.exists():
            dst.rmdir()
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_aux_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy the tokenizer / generation-config files found in ``src`` into ``dst``; returns their names."""
    copied = []
    for name in AUX_FILES:
        path = Path(src) / name
        if path.is_file():
            shutil.copy2(path, Path(dst) / name)
            copied.append(name)
    return copied


@contextlib.contextmanager
def single_process_group() -> Iterator[Any]:
    """A world of one process (gloo on an in-memory store) with megatron's TP=1/PP=1 state, for the
    duration of a conversion; yields the role's ``RoleGroups``. An existing group is reused if it
    has exactly one rank."""
    import torch.distributed as dist

    from rgkd_megatron.parallel.groups import layout_for_world
    from rgkd_megatron.training.setup import init_role, teardown_roles

    created = False
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise ConversionError(
                f"checkpoint conversion runs as a single process; this one is rank "
                f"{dist.get_rank()} of {dist.get_world_size()} (launch the tool without torchrun/srun)"
            )
    else:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        created = True
    try:
        yield init_role(layout_for_world(1, 1, 1), seed=0)
    finally:
        teardown_roles()
        if created:
            dist.destroy_process_group()
