"""Export a trained student (a megatron-core checkpoint written by ``save_model_weights``) as a
complete Hugging Face checkpoint, and make the megatron checkpoint self-describing.

- ``export_hf(ckpt, model_section, tokenizer, dst)``: ``dst`` gets ``config.json``,
  ``generation_config.json``, the tokenizer files (chat template included) and
  ``model.safetensors`` (shards + index when large), loadable with
  ``transformers.AutoModelForCausalLM`` / ``AutoTokenizer``. The tensors are converted by
  ``mcore_to_hf.convert_mcore_to_hf``; this module only prepares the config and the tokenizer
  side. The result is assembled beside ``dst`` and renamed onto it; an existing ``dst`` is
  replaced only once the new one is complete.
- ``write_checkpoint_sidecar(ckpt, model_section, tokenizer)``: writes into the megatron checkpoint
  what ``tools/convert_checkpoint.py --to mcore`` writes beside its output (``model_config.yaml``
  with ``load`` set, ``hf_config.json``, the tokenizer files), so that
  ``tools/convert_checkpoint.py --to hf --input CKPT --output OUT`` needs no other flag and
  ``model.load=CKPT data.tokenizer=CKPT`` trains from it.

``model_section`` is the run's ``model`` config: ``config_to_dict(cfg)["model"]`` (a dict, as in
the resolved ``config.yaml``), a ``ModelConfig``, or the whole config dict / ``RGKDConfig``.
``vocab_size: null`` (the default: "take it from the tokenizer") is resolved exactly as the
training run does, ``load_tokenizer(tokenizer).vocab_size``.

The tokenizer side: the files beside the tokenizer (``common.AUX_FILES``) are copied. When the
tokenizer has no chat template, one is generated from its prompt template (``prompt_template`` of
``tokenizer_config.json``, else ``DEFAULT_PROMPT_TEMPLATE``), so that ``apply_chat_template`` on
one user message gives the prompt the student was trained on. ``generation_config.json`` (when the
tokenizer has none) and ``config.json`` carry the tokenizer's bos/eos/pad ids.

Called inside a ``torch.distributed`` job (e.g. rank 0 at the end of ``rgkd-distill``), the export
runs in a child process: the conversion needs a world of one process, and the child neither touches
the job's process groups nor allocates GPU memory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import string
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from rgkd_megatron.convert.common import ConversionError, copy_aux_files, dtype_name
from rgkd_megatron.utils.logging import get_logger

logger = get_logger(__name__)

__all__ = ["export_hf", "student_model_fields", "write_checkpoint_sidecar"]

_TOKENIZER_MODEL_FILES = ("tokenizer.json", "tokenizer.model")
_LAUNCHER_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)


# ------------------------------------------------------------------------------------------ model


def _section_dict(model_section: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(model_section) and not isinstance(model_section, type):
        model_section = dataclasses.asdict(model_section)
    if not isinstance(model_section, Mapping):
        raise TypeError(
            f"model_section: expected a dict (config_to_dict(cfg)['model']) or a ModelConfig, "
            f"got {type(model_section).__name__}"
        )
    if isinstance(model_section.get("model"), Mapping):  # the whole config
        model_section = model_section["model"]
    return dict(model_section)


def student_model_fields(model_section: Any, tokenizer: str | os.PathLike | None) -> dict[str, Any]:
    """The architecture fields of ``model_section`` (as ``--to mcore`` writes them in
    ``model_config.yaml``), validated for export, ``vocab_size`` resolved from the tokenizer when null."""
    from rgkd_megatron.config.schema import ModelConfig
    from rgkd_megatron.convert.hf_mapping import (
        hf_config_from_model_fields,
        model_config_fields,
        parse_hf_config,
    )

    section = _section_dict(model_section)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise ConversionError(f"model.{unknown[0]}: unknown model field (expected one of {sorted(known)})")
    fields = {**vars(ModelConfig()), **section}
    if fields["vocab_size"] is None:
        if tokenizer is None:
            raise ConversionError("model.vocab_size is null and no tokenizer was given to take it from")
        from rgkd_megatron.data.tokenizer import load_tokenizer

        fields["vocab_size"] = load_tokenizer(os.fspath(tokenizer)).vocab_size
    arch = parse_hf_config(hf_config_from_model_fields(fields, dtype=None))  # refuses what HF cannot run
    return model_config_fields(arch, fields["make_vocab_size_divisible_by"])


def _hf_config(fields: dict[str, Any], tok: Any) -> dict[str, Any]:
    from rgkd_megatron.convert.hf_mapping import hf_config_from_model_fields

    cfg = hf_config_from_model_fields(fields, dtype=None)
    if tok is not None:
        cfg.update(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    return cfg


# -------------------------------------------------------------------------------------- tokenizer


def chat_template_from_prompt_template(prompt_template: str) -> str | None:
    """A Jinja chat template equivalent to a ``str.format`` prompt template (``{prompt}`` = the user
    message; an assistant message is its content then EOS, as in training); None if the template
    uses format specs or conversions."""
    parts = []
    for literal, field, spec, conversion in string.Formatter().parse(prompt_template):
        if literal:
            parts.append("{{ " + json.dumps(literal) + " }}")
        if field is not None:
            if field != "prompt" or spec or conversion:
                return None
            parts.append("{{ message['content'] }}")
    return (
        "{% for message in messages %}{% if message['role'] == 'user' %}" + "".join(parts) + "{% elif "
        "message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}{% else %}{{ raise_exception("
        "'this template (the prompt template of training) has user and assistant messages only') }}"
        "{% endif %}{% endfor %}"
    )


def _has_chat_template(directory: Path) -> bool:
    if (directory / "chat_template.jinja").is_file() or (directory / "chat_template.json").is_file():
        return True
    config = directory / "tokenizer_config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("chat_template"))


def _write_tokenizer_files(tokenizer: str | os.PathLike, out: Path) -> tuple[list[str], Any]:
    """Copy the tokenizer (a directory, a tokenizer.json or a sentencepiece .model) into ``out``
    under the Hugging Face names, add a chat template / generation config when it has none;
    returns (file names written, our Tokenizer)."""
    from rgkd_megatron.data.tokenizer import load_tokenizer

    path = Path(tokenizer)
    if not path.exists():
        raise ConversionError(f"tokenizer {tokenizer}: no such file or directory")
    tok = load_tokenizer(os.fspath(path))
    main = Path(tok.path)
    canonical = "tokenizer.model" if main.suffix == ".model" else "tokenizer.json"
    written = [canonical]
    if main.parent.resolve() != out.resolve():  # (a sidecar written twice: nothing to copy)
        written += [n for n in copy_aux_files(main.parent, out) if n not in _TOKENIZER_MODEL_FILES]
        shutil.copy2(main, out / canonical)  # only the file our runs read, under its HF name
    if not (out / "tokenizer_config.json").is_file() and canonical == "tokenizer.json":
        names = {
            k: tok.decode([i])
            for k, i in (("eos_token", tok.eos_id), ("bos_token", tok.bos_id))
            if i is not None
        }
        if tok.pad_id != tok.eos_id:
            names["pad_token"] = tok.decode([tok.pad_id])
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **names}
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        written.append("tokenizer_config.json")
    if tok.chat_template is None and not _has_chat_template(out):
        template = chat_template_from_prompt_template(tok.prompt_template)
        if template is None:
            logger.warning(
                "prompt template %r has no chat-template equivalent: none written", tok.prompt_template
            )
        else:
            (out / "chat_template.jinja").write_text(template)
            written.append("chat_template.jinja")
    elif tok.chat_template is None:
        logger.warning(
            "%s: the chat template copied to %s is not the prompt_template the runs use (%r)",
            main.parent,
            out,
            tok.prompt_template,
        )
    if not (out / "generation_config.json").is_file():
        ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
        gen = {k: v for k, v in ids.items() if v is not None}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        written.append("generation_config.json")
    return sorted(set(written)), tok


# ---------------------------------------------------------------------------------------- sidecar


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_checkpoint_sidecar(
    ckpt_dir: str | os.PathLike, model_section: Any, tokenizer_dir: str | os.PathLike | None
) -> Path:
    """Write ``model_config.yaml``, ``hf_config.json`` and the tokenizer files into the megatron
    checkpoint ``ckpt_dir`` (checked against ``model_section`` first); returns the YAML's path."""
    from rgkd_megatron.convert.hf_mapping import mapping_rules, parse_hf_config
    from rgkd_megatron.convert.hf_to_mcore import model_config_yaml
    from rgkd_megatron.convert.mcore_to_hf import _check_checkpoint, read_checkpoint_metadata

    ckpt = Path(ckpt_dir)
    fields = student_model_fields(model_section, tokenizer_dir)
    hf_cfg = _hf_config(fields, None)
    arch = parse_hf_config(hf_cfg)
    _check_checkpoint(read_checkpoint_metadata(ckpt), arch, mapping_rules(arch), ckpt)
    tok = None
    if tokenizer_dir is not None:
        _, tok = _write_tokenizer_files(tokenizer_dir, ckpt)
        note = f"The tokenizer files (from {Path(tokenizer_dir).resolve()}) are in this directory too: data.tokenizer={ckpt.resolve()}"
    else:
        note = "No tokenizer was given: set data.tokenizer yourself."
    comment = (
        f"Model section for rgkd-train of the megatron checkpoint {ckpt.resolve()}\n"
        f"({arch.architecture}, vocabulary {arch.vocab_size}), written with it by the training run.\n"
        "Use: copy this block into your recipe, or pass the fields as dotted overrides.\n"
        f"tools/convert_checkpoint.py --to hf --input {ckpt.resolve()} --output OUT needs no other flag\n"
        "(it reads hf_config.json, the same architecture as Hugging Face config.json).\n" + note
    )
    _write_atomic(ckpt / "hf_config.json", json.dumps(_hf_config(fields, tok), indent=2) + "\n")
    _write_atomic(
        ckpt / "model_config.yaml", model_config_yaml({**fields, "load": str(ckpt.resolve())}, comment)
    )
    return ckpt / "model_config.yaml"


# ----------------------------------------------------------------------------------------- export


def _dtype_arg(dtype: str | torch.dtype | None) -> str:
    if dtype is None:
        return "auto"
    return dtype_name(dtype) if isinstance(dtype, torch.dtype) else str(dtype)


def _replace_dir(new: Path, dst: Path) -> None:
    """Rename ``new`` onto ``dst``; an existing ``dst`` is removed only after the rename."""
    if not dst.exists():
        os.replace(new, dst)
        return
    if not dst.is_dir():
        raise ConversionError(f"{dst}: exists and is not a directory")
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    if old.exists():
        shutil.rmtree(old)
    os.replace(dst, old)
    try:
        os.replace(new, dst)
    except BaseException:
        os.replace(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)


def export_hf(
    ckpt_dir: str | os.PathLike,
    model_section: Any,
    tokenizer_dir: str | os.PathLike | None,
    dst: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    max_shard_size: str | int = "5GB",
) -> Path:
    """Write a complete Hugging Face checkpoint of the megatron checkpoint ``ckpt_dir`` to ``dst``
    (replacing it only once complete); ``dtype`` None keeps the stored dtype. Returns ``dst``."""
    import torch.distributed as dist

    dst = Path(dst).absolute()
    if dist.is_available() and dist.is_initialized():
        return _export_in_child(ckpt_dir, model_section, tokenizer_dir, dst, dtype, max_shard_size)
    from rgkd_megatron.convert.mcore_to_hf import convert_mcore_to_hf

    fields = student_model_fields(model_section, tokenizer_dir)
    if dst.exists() and not dst.is_dir():
        raise ConversionError(f"{dst}: exists and is not a directory")
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = dst.with_name(f".{dst.name}.export-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    try:
        with tempfile.TemporaryDirectory(prefix=f".{dst.name}.aux-", dir=dst.parent) as aux:
            tok = _write_tokenizer_files(tokenizer_dir, Path(aux))[1] if tokenizer_dir is not None else None
            (Path(aux) / "config.json").write_text(json.dumps(_hf_config(fields, tok), indent=2) + "\n")
            convert_mcore_to_hf(
                ckpt_dir,
                staging,
                hf_config=str(Path(aux) / "config.json"),
                tokenizer=aux if tok is not None else None,
                dtype=_dtype_arg(dtype),
                max_shard_size=max_shard_size,
            )
        _replace_dir(staging, dst)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("exported %s as a Hugging Face checkpoint: %s", ckpt_dir, dst)
    return dst


def _export_in_child(ckpt_dir, model_section, tokenizer_dir, dst, dtype, max_shard_size) -> Path:
    spec = {
        "ckpt_dir": os.fspath(Path(ckpt_dir).absolute()),
        "model_section": _section_dict(model_section),
        "tokenizer_dir": None if tokenizer_dir is None else os.fspath(Path(tokenizer_dir).absolute()),
        "dst": os.fspath(dst),
        "dtype": _dtype_arg(dtype),
        "max_shard_size": max_shard_size,
    }
    env = {
        k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS and not k.startswith("TORCHELASTIC_")
    }
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU only: leave the job's GPU memory alone
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "rgkd_megatron.convert.export", json.dumps(spec)]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = proc.stdout[-4000:]
        error = ConversionError if proc.returncode == 2 else RuntimeError
        raise error(
            f"export_hf of {ckpt_dir} to {dst} failed in its child process (exit {proc.returncode}):\n{tail}"
        )
    logger.info("exported %s as a Hugging Face checkpoint (child process): %s", ckpt_dir, dst)
    return dst


def _main(argv: list[str]) -> int:
    from rgkd_megatron.utils.logging import setup_logging

    setup_logging("INFO")
    spec = json.loads(argv[0])
    try:
        export_hf(
            spec["ckpt_dir"],
            spec["model_section"],
            spec["tokenizer_dir"],
            spec["dst"],
            dtype=spec["dtype"],
            max_shard_size=spec["max_shard_size"],
        )
    except ConversionError as exc:
        print(f"export_hf: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
