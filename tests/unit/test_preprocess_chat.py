"""Chat-format input of tools/preprocess_data.py (``{"messages": [...]}``, as Hugging Face datasets
export chats): the last assistant message is the response, the conversation before it, rendered
with the tokenizer's chat template, the prompt.

References: the equivalent ``{prompt, response}`` record (same tokens, byte for byte) and, for a
multi-turn conversation, ``transformers``' own ``apply_chat_template`` on the same tokenizer folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from rgkd_megatron.data.indexed_dataset import IndexedDataset
from rgkd_megatron.data.preprocess import preprocess_jsonl

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / "examples" / "tokenizer"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "You add numbers."},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "And 4 plus 4?"},
    {"role": "assistant", "content": "8"},
]


def _jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _samples(prefix: Path) -> list[tuple[list[int], int]]:
    ds = IndexedDataset(str(prefix))
    return [(ds[i][0].tolist(), ds[i][1]) for i in range(len(ds))]


@pytest.fixture
def chat_tokenizer(tmp_path) -> Path:
    """The example tokenizer with a Jinja chat template instead of its prompt template."""
    out = tmp_path / "chat_tok"
    shutil.copytree(TOKENIZER, out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    return out


@pytest.mark.parametrize("templated", [False, True])
def test_single_turn_chat_equals_the_prompt_response_record(tmp_path, chat_tokenizer, templated):
    tok = str(chat_tokenizer if templated else TOKENIZER)
    pairs = [("What is 2 plus 3?", "5"), ("Name a colour.", "Blue")]
    plain = _jsonl(tmp_path / "plain.jsonl", [{"prompt": p, "response": r} for p, r in pairs])
    chat = _jsonl(
        tmp_path / "chat.jsonl",
        [
            {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]}
            for p, r in pairs
        ],
    )
    preprocess_jsonl(plain, tok, str(tmp_path / "plain"))
    preprocess_jsonl(chat, tok, str(tmp_path / "chat"))
    assert _samples(tmp_path / "chat") == _samples(tmp_path / "plain")
    assert (tmp_path / "chat.bin").read_bytes() == (tmp_path / "plain.bin").read_bytes()


def test_multi_turn_prompt_is_the_chat_template_rendering(tmp_path, chat_tokenizer):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    preprocess_jsonl(
        _jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION}]), str(chat_tokenizer), str(tmp_path / "c")
    )
    ((tokens, prompt_len),) = _samples(tmp_path / "c")
    text = AutoTokenizer.from_pretrained(chat_tokenizer).apply_chat_template(
        CONVERSATION[:-1], add_generation_prompt=True, tokenize=False
    )
    raw = Tokenizer.from_file(str(chat_tokenizer / "tokenizer.json"))
    prompt = raw.encode(text, add_special_tokens=False).ids
    response = raw.encode("8", add_special_tokens=False).ids
    assert tokens == prompt + response + [raw.token_to_id("<|endoftext|>")]
    assert prompt_len == len(prompt)
    assert np.asarray(tokens).size > prompt_len


@pytest.mark.parametrize(
    "record, message",
    [
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "x"}]},
            "messages[1].role",
        ),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "at least 2 messages"),
        ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, "messages[0].content"),
    ],
)
def test_bad_chat_records_name_file_line_and_field(tmp_path, record, message):
    src = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "response": "b"}, record])
    with pytest.raises(ValueError, match=rf"bad\.jsonl.*2.*{message.replace('[', '.').replace(']', '.')}"):
        preprocess_jsonl(src, str(TOKENIZER), str(tmp_path / "out"))
    assert not list(tmp_path.glob("out*"))


def test_multi_turn_chat_needs_a_chat_template(tmp_path):
    src = _jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION}])
    with pytest.raises(ValueError, match="not a chat template"):
        preprocess_jsonl(src, str(TOKENIZER), str(tmp_path / "out"))
