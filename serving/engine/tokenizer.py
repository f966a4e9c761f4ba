"""Text in and out: `tokenizer.json` through `tokenizers`, the chat template through jinja2.

The chat template is rendered the way Hugging Face renders it: a sandboxed jinja2 environment with
trim_blocks and lstrip_blocks, `raise_exception` available, and bos/eos tokens as variables.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from serving.errors import UserError


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _raise(message: str) -> None:
    raise UserError(f"chat template: {message}")


class TextTokenizer:
    """Encode, decode and apply the chat template of one checkpoint directory."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise UserError(f"{file}: missing file (the checkpoint has no tokenizer)")
        self._tok = Tokenizer.from_file(str(file))
        cfg_file = path / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        self.chat_template = self._pick_template(cfg.get("chat_template"))
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self._template = env.from_string(self.chat_template) if self.chat_template else None

    @staticmethod
    def _pick_template(value: Any) -> str | None:
        # Newer checkpoints may list named templates; "default" is the one chat uses.
        if isinstance(value, list):
            named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
            return named.get("default")
        return value

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def token_id(self, text: str | None) -> int | None:
        return None if text is None else self._tok.token_to_id(text)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def render_chat(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The prompt text for a conversation, as the checkpoint's template writes it."""
        if self._template is None:
            raise UserError("this checkpoint has no chat template (tokenizer_config.json)")
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except TemplateError as exc:
            raise UserError(f"chat template: {exc}") from None

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        # The template writes the BOS itself, so the tokenizer must not add another (as HF does).
        return self.encode(self.render_chat(messages), add_special_tokens=False)
