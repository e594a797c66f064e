"""Tokenizers behind one small interface: Hugging Face ``tokenizers`` JSON and sentencepiece ``.model``.

Design choices:
- ``load_tokenizer(path)`` accepts a ``tokenizer.json`` file, a sentencepiece ``.model`` file, or a
  directory holding one of them (``tokenizer.json`` wins), optionally next to a ``tokenizer_config.json``
  (the Hugging Face file) that names the eos/bos/pad tokens and a prompt template.
- ``encode`` never adds special tokens: the data pipeline decides where BOS/EOS go
  (``batching.make_sft_sample`` appends EOS), so the same ids come out of every tokenizer kind.
- ``fingerprint`` is the sha256 of the canonical tokenizer file (``tokenizer.json`` or the ``.model``);
  datasets and the teacher cache record it so a mismatch is caught before training.
- ``vocab_size`` counts added tokens too (and is at least ``max id + 1``), so every id ``encode`` can
  return is ``< vocab_size``. The model's (padded) embedding size is a separate, larger-or-equal number.
- Prompt template, in order of precedence: the ``prompt_template`` argument of ``load_tokenizer``; the
  ``prompt_template`` key of ``tokenizer_config.json`` (a ``str.format`` string with ``{prompt}``); the
  Hugging Face ``chat_template`` (Jinja, rendered with one user message and ``add_generation_prompt``);
  else ``DEFAULT_PROMPT_TEMPLATE``. Every option is a pure function of the prompt (deterministic).

Usage::

    tok = load_tokenizer("examples/tokenizer")
    ids = tok.encode(tok.apply_prompt_template("What is 2 plus 3?"))
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional, Sequence

__all__ = [
    "DEFAULT_PROMPT_TEMPLATE",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "file_sha256",
    "load_tokenizer",
]

DEFAULT_PROMPT_TEMPLATE = "User: {prompt}\nAssistant:"

# Tried in order when no config names the EOS token of a tokenizers JSON.
_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<|eot_id|>", "<eos>", "<|im_end|>")
_HF_FILE = "tokenizer.json"
_SP_FILE = "tokenizer.model"
_CONFIG_FILE = "tokenizer_config.json"


def file_sha256(path: str, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


class Tokenizer:
    """Common interface and shared behaviour; use ``load_tokenizer`` to build one.

    Attributes:
        vocab_size: number of ids the tokenizer can produce, added tokens included.
        eos_id: end-of-sequence id (appended after every response).
        pad_id: padding id; the EOS id unless a pad token is configured.
        bos_id: beginning-of-sequence id, or None when the tokenizer has none.
        fingerprint: sha256 of the canonical tokenizer file.
        path: the file the tokenizer was read from.
        prompt_template: ``str.format`` template with ``{prompt}``, or None when a chat template is used.
        chat_template: the Jinja chat template in use, or None.
    """

    vocab_size: int
    eos_id: int
    pad_id: int
    bos_id: Optional[int]
    fingerprint: str
    path: str
    prompt_template: Optional[str]

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, with no special tokens added."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (special tokens kept as text)."""
        raise NotImplementedError

    def apply_prompt_template(self, prompt: str) -> str:
        """Wrap a user prompt the way the model sees it at training and generation time."""
        return self.render_conversation([{"role": "user", "content": prompt}])

    def render_conversation(self, messages: list[dict[str, str]]) -> str:
        """The prompt text of a conversation (``[{"role", "content"}, ...]``, before the reply): the
        chat template with ``add_generation_prompt``; a ``str.format`` prompt template takes one user
        message only (ValueError otherwise)."""
        if self.chat_template is not None:
            return _render_chat_template(self.chat_template, messages, self._special_token_strings, self.path)
        assert self.prompt_template is not None
        if len(messages) != 1 or messages[0]["role"] != "user":
            roles = [m["role"] for m in messages]
            raise ValueError(
                f"tokenizer {self.path} has a prompt_template (one user message), not a chat template: "
                f"cannot render a conversation with roles {roles}"
            )
        return self.prompt_template.format(prompt=messages[0]["content"])

    chat_template: Optional[str] = None
    _special_token_strings: dict[str, str]

    def _configure_template(self, override: Optional[str], config: dict[str, Any], config_path: str) -> None:
        template = override if override is not None else config.get("prompt_template")
        if template is not None:
            _check_prompt_template(template, config_path if override is None else "prompt_template argument")
            self.prompt_template, self.chat_template = template, None
        elif isinstance(config.get("chat_template"), str):
            self.prompt_template, self.chat_template = None, config["chat_template"]
        elif os.path.isfile(jinja := os.path.join(os.path.dirname(config_path), "chat_template.jinja")):
            # transformers >= 4.43 saves the chat template beside tokenizer_config.json
            with open(jinja, encoding="utf-8") as f:
                self.prompt_template, self.chat_template = None, f.read()
        else:
            self.prompt_template, self.chat_template = DEFAULT_PROMPT_TEMPLATE, None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(path={self.path!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id}, "
            f"pad_id={self.pad_id}, bos_id={self.bos_id}, fingerprint={self.fingerprint[:12]}...)"
        )


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` JSON file (BPE / WordPiece / Unigram, byte-level or not)."""

    def __init__(self, path: str, config: dict[str, Any], config_path: str, prompt_template: Optional[str]):
        from tokenizers import Tokenizer as _HFTok

        try:
            self._tok = _HFTok.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception on parse errors
            raise ValueError(f"cannot read Hugging Face tokenizer file {path}: {e}") from e
        self.path = path
        self.fingerprint = file_sha256(path)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        max_id = max(vocab.values(), default=-1)
        self.vocab_size = max(self._tok.get_vocab_size(with_added_tokens=True), max_id + 1)

        def token_id(field: str) -> Optional[int]:
            name = _config_token(config, field, config_path)
            if name is None:
                return None
            tid = self._tok.token_to_id(name)
            if tid is None:
                raise ValueError(
                    f"{config_path}: field '{field}' names token {name!r}, not in the vocab of {path}"
                )
            return tid

        eos = token_id("eos_token")
        if eos is None:
            eos = next(
                (self._tok.token_to_id(t) for t in _EOS_CANDIDATES if self._tok.token_to_id(t) is not None),
                None,
            )
        if eos is None:
            raise ValueError(
                f"cannot determine the EOS token of {path}: no 'eos_token' in {config_path} and none of "
                f"{list(_EOS_CANDIDATES)} in the vocab"
            )
        self.eos_id = eos
        pad = token_id("pad_token")
        self.pad_id = eos if pad is None else pad
        self.bos_id = token_id("bos_token")
        self._special_token_strings = {
            k: v
            for k in ("eos_token", "bos_token", "pad_token")
            if (v := _config_token(config, k, config_path))
        }
        self._configure_template(prompt_template, config, config_path)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece ``.model`` (Llama-2 style); ids and specials come from the model proto."""

    def __init__(self, path: str, config: dict[str, Any], config_path: str, prompt_template: Optional[str]):
        import sentencepiece as spm

        try:
            self._sp = spm.SentencePieceProcessor(model_file=path)
        except Exception as e:  # OSError / RuntimeError depending on the failure
            raise ValueError(f"cannot read sentencepiece model {path}: {e}") from e
        self.path = path
        self.fingerprint = file_sha256(path)
        self.vocab_size = int(self._sp.get_piece_size())

        def token_id(field: str, default: int) -> Optional[int]:
            name = _config_token(config, field, config_path)
            if name is None:
                return default if default >= 0 else None
            tid = int(self._sp.piece_to_id(name))
            if tid == self._sp.unk_id() and name != self._sp.id_to_piece(tid):
                raise ValueError(
                    f"{config_path}: field '{field}' names token {name!r}, not in the vocab of {path}"
                )
            return tid

        eos = token_id("eos_token", int(self._sp.eos_id()))
        if eos is None:
            raise ValueError(
                f"sentencepiece model {path} has no EOS piece and {config_path} names no 'eos_token'"
            )
        self.eos_id = eos
        pad = token_id("pad_token", int(self._sp.pad_id()))
        self.pad_id = eos if pad is None else pad
        self.bos_id = token_id("bos_token", int(self._sp.bos_id()))
        self._special_token_strings = {
            "eos_token": self._sp.id_to_piece(self.eos_id),
            **({"bos_token": self._sp.id_to_piece(self.bos_id)} if self.bos_id is not None else {}),
        }
        self._configure_template(prompt_template, config, config_path)

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text, out_type=int))

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


def load_tokenizer(path: str, prompt_template: Optional[str] = None) -> Tokenizer:
    """Load a tokenizer from a ``tokenizer.json``, a sentencepiece ``.model``, or a directory holding one.

    Args:
        path: file or directory. A directory is searched for ``tokenizer.json`` then ``tokenizer.model``
            (then a single ``*.model``); a ``tokenizer_config.json`` next to the file is read if present.
        prompt_template: overrides any configured template; a ``str.format`` string with ``{prompt}``.

    Raises:
        FileNotFoundError: the path (or a tokenizer file inside the directory) does not exist.
        ValueError: the file cannot be parsed, or the config names tokens the vocab lacks.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer path {path} does not exist")
    if os.path.isdir(path):
        file = _find_tokenizer_file(path)
    else:
        file = path
    config_path = os.path.join(os.path.dirname(os.path.abspath(file)), _CONFIG_FILE)
    config = _read_config(config_path)
    if file.endswith(".model"):
        return SentencePieceTokenizer(file, config, config_path, prompt_template)
    if file.endswith(".json"):
        return HFTokenizer(file, config, config_path, prompt_template)
    raise ValueError(
        f"unrecognised tokenizer file {file}: expected a tokenizers '.json' or a sentencepiece '.model'"
    )


def _find_tokenizer_file(directory: str) -> str:
    for name in (_HF_FILE, _SP_FILE):
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate):
            return candidate
    models = sorted(f for f in os.listdir(directory) if f.endswith(".model"))
    if len(models) == 1:
        return os.path.join(directory, models[0])
    raise FileNotFoundError(
        f"tokenizer directory {directory} holds no {_HF_FILE} or {_SP_FILE}"
        + (f" (several .model files, name one: {models})" if models else "")
    )


def _read_config(config_path: str) -> dict[str, Any]:
    if not os.path.isfile(config_path):
        return {}
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read tokenizer config {config_path}: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(
            f"tokenizer config {config_path} must hold a JSON object, got {type(config).__name__}"
        )
    return config


def _config_token(config: dict[str, Any], field: str, config_path: str) -> Optional[str]:
    """A special token string from tokenizer_config.json: a string, {"content": str} or null."""
    value = config.get(field)
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str) or not value:
        raise ValueError(f"{config_path}: field '{field}' must be a token string, got {config.get(field)!r}")
    return value


def _check_prompt_template(template: Any, where: str) -> None:
    if not isinstance(template, str):
        raise ValueError(f"{where}: prompt_template must be a string, got {type(template).__name__}")
    try:
        rendered = template.format(prompt="\0")
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(
            f"{where}: prompt_template {template!r} is not a str.format template with only {{prompt}}: {e}"
        ) from e
    if "\0" not in rendered:
        raise ValueError(f"{where}: prompt_template {template!r} does not contain '{{prompt}}'")


def _render_chat_template(
    template: str, messages: list[dict[str, str]], special_tokens: dict[str, str], path: str
) -> str:
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # pragma: no cover - jinja2 ships with transformers
        raise ValueError(
            f"tokenizer {path} has a Jinja chat_template but jinja2 is not installed; install jinja2 or set "
            "'prompt_template' in tokenizer_config.json"
        ) from e

    def raise_exception(message: str) -> None:
        raise ValueError(f"chat_template of {path}: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(
            messages=messages,
            add_generation_prompt=True,
            **special_tokens,
        )
    except jinja2.TemplateError as e:
        raise ValueError(f"cannot render the chat_template of {path}: {e}") from e
