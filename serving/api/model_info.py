"""What the API needs to know about the served model, without its weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from serving.config import ServeConfig
from serving.engine.tokenizer import TextTokenizer


@dataclass
class ModelInfo:
    """What the ingress needs to know about the served model, without its weights."""

    name: str
    path: str
    tokenizer: TextTokenizer
    context: int  # prompt + output tokens one request may use
    vocab_size: int
    eos_ids: tuple[int, ...]
    _token_texts: dict[int, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str, config: ServeConfig) -> ModelInfo:
        from experts.checkpoint import Checkpoint

        ckpt = Checkpoint(path)
        c = ckpt.config
        ckpt.close()
        return cls(
            name=config.served_model_name or Path(path).name,
            path=path,
            tokenizer=TextTokenizer(path),
            context=min(config.scheduler.max_seq_len, c.max_position_embeddings),
            vocab_size=c.vocab_size,
            eos_ids=c.eos_ids,
        )

    def token_text(self, token: int) -> str:
        if token not in self._token_texts:
            self._token_texts[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return self._token_texts[token]
