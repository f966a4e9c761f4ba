"""The built-in demo model: a small, deterministic, random-weight Mixtral checkpoint.

It is written by our own code (safetensors + tokenizers, not transformers) in Hugging Face's
format: config.json, model.safetensors with Mixtral's tensor names, a byte-level BPE
tokenizer.json and a tokenizer_config.json with a chat template. Its weights are random, so what it
says is noise; it exists so that every command works on a fresh machine with nothing downloaded.
It is written once per version into the user's cache directory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

DEMO_VERSION = 1
DEMO_DIMS = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 2048,
}

# Mixtral's prompt format, plus an optional system message folded into the first user turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\n\n' %}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + ns.system + message['content'] + ' [/INST]' }}"
    "{% set ns.system = '' %}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}"
    "{% endfor %}"
)

# A few sentences to learn byte-pair merges from, so that tokens are not all single bytes.
_CORPUS = """\
A mixture of experts model routes each token to two of its experts. The router picks the experts
with the highest scores, and the layer adds their outputs, weighted by those scores. Serving such a
model means placing the experts on devices, keeping every device busy, and measuring what it does.
The quick brown fox jumps over the lazy dog. Hello, world! What is the capital of France? Paris.
Throughput is measured in tokens per millisecond; a target above the ceiling is impossible.
[INST] Tell me a story. [/INST] Once upon a time, there was a small model that said only noise.
"""


def demo_dir() -> Path:
    """Where the demo checkpoint lives: the user's cache directory (XDG_CACHE_HOME or ~/.cache)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "moe-serve" / f"demo-v{DEMO_VERSION}"


def demo_checkpoint() -> Path:
    """The demo checkpoint directory, written on first use."""
    target = demo_dir()
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=target.parent))
    try:
        write_checkpoint(tmp)
        os.replace(tmp, target)  # atomic: a concurrent writer either wins or finds it done
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_tokenizer() -> Tokenizer:
    """A byte-level BPE tokenizer (GPT-2 style bytes, so every string round-trips) with <s>, </s>."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tok


def demo_config(vocab_size: int) -> dict:
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": vocab_size,
        **DEMO_DIMS,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }


def random_weights(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Mixtral tensors with N(0, 0.02) weights and unit norms, from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * 0.02

    out = {
        "model.embed_tokens.weight": w(v, d),
        "model.norm.weight": torch.ones(d),
        "lm_head.weight": w(v, d),
    }
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out |= {
            f"{p}.input_layernorm.weight": torch.ones(d),
            f"{p}.post_attention_layernorm.weight": torch.ones(d),
            f"{p}.self_attn.q_proj.weight": w(hd, d),
            f"{p}.self_attn.k_proj.weight": w(kv, d),
            f"{p}.self_attn.v_proj.weight": w(kv, d),
            f"{p}.self_attn.o_proj.weight": w(d, hd),
            f"{p}.block_sparse_moe.gate.weight": w(config["num_local_experts"], d),
        }
        for e in range(config["num_local_experts"]):
            q = f"{p}.block_sparse_moe.experts.{e}"
            out |= {f"{q}.w1.weight": w(f, d), f"{q}.w3.weight": w(f, d), f"{q}.w2.weight": w(d, f)}
    return out


def write_checkpoint(path: Path, seed: int = 0) -> Path:
    """Write the demo checkpoint (config, weights, tokenizer, chat template) into `path`."""
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    config = demo_config(tok.get_vocab_size())
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(
        random_weights(config, seed), str(path / "model.safetensors"), metadata={"format": "pt"}
    )
    tok.save(str(path / "tokenizer.json"))
    tokenizer_config = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": config["max_position_embeddings"],
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return path
