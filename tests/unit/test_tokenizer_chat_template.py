"""A chat template saved as chat_template.jinja (transformers >= 4.43 layout) is picked up."""

from __future__ import annotations

import shutil
from pathlib import Path

from rgkd_megatron.data.tokenizer import load_tokenizer

SHIPPED = Path(__file__).resolve().parents[2] / "examples" / "tokenizer"


def test_chat_template_jinja_beside_the_tokenizer(tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SHIPPED / name, tmp_path / name)
    assert load_tokenizer(str(tmp_path)).apply_prompt_template("hi") == "User: hi\nAssistant:"
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    tok = load_tokenizer(str(tmp_path))
    assert tok.apply_prompt_template("hi") == "[user] hi\n[assistant] "
    assert tok.prompt_template is None and tok.chat_template.startswith("{% for m")
