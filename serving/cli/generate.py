"""`moe-serve generate`: complete a prompt in-process with the KV cache."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from experts.shard import DTYPES
from serving.errors import UserError

if TYPE_CHECKING:
    from serving.engine.sampling import SamplingParams
    from serving.engine.tokenizer import TextTokenizer


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        metavar="DIR",
        help="Hugging Face Mixtral checkpoint directory (default: demo model)",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    parser.add_argument(
        "--expert-shards", type=int, default=0, metavar="N",
        help="put the experts on N ExpertShard Ray actors (0: in this process)",
    )  # fmt: skip
    parser.add_argument(
        "--redundant-experts", type=int, default=0, metavar="R",
        help="extra copies of the hottest experts, on different shards",
    )  # fmt: skip


def resolve_model_dir(model: str | None) -> str:
    if model:
        return model
    from serving.engine.demo import demo_checkpoint

    return str(demo_checkpoint())


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="complete a prompt in-process (no server)")
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load the model, generate, and print the text as it grows (or, with --json, one object)."""
    from serving.engine.generate import generate
    from serving.engine.load import load_model
    from serving.engine.tokenizer import TextTokenizer

    path = resolve_model_dir(args.model)
    model = load_model(
        path,
        dtype=DTYPES[args.dtype],
        device=args.device,
        expert_shards=args.expert_shards,
        redundant_experts=args.redundant_experts,
    )
    tok = TextTokenizer(path)
    ids = (
        tok.encode_chat([{"role": "user", "content": args.prompt}])
        if args.chat
        else tok.encode(args.prompt)
    )
    params = _sampling_params(args, model.config.eos_ids)
    start = time.perf_counter()
    out = _stream(generate(model, ids, params), tok, echo=not args.json)
    elapsed = time.perf_counter() - start
    finish = "stop" if out and out[-1] in params.stop_token_ids else "length"
    if args.json:
        _print_json(path, ids, out, tok.decode(out), finish, elapsed)
    else:
        print(
            f"\n[{len(out)} tokens in {elapsed:.2f} s, finish: {finish}, model: {path}]",
            file=sys.stderr,
        )
    return 0


def _sampling_params(args: argparse.Namespace, eos_ids: Sequence[int]) -> SamplingParams:
    """The sampling flags as SamplingParams; a value it refuses is one UserError naming the flag."""
    from pydantic import ValidationError

    from serving.engine.sampling import SamplingParams

    try:
        return SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            stop_token_ids=eos_ids,
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        raise UserError(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}") from None


def _stream(tokens: Iterable[int], tok: TextTokenizer, echo: bool) -> list[int]:
    """Collect the generated token ids; with `echo`, write the text to stdout as it grows."""
    out: list[int] = []
    shown = ""
    for token in tokens:
        out.append(token)
        if echo:
            text = tok.decode(out)
            # Print only whole characters: a byte-level token may end inside a UTF-8 sequence.
            if not text.endswith("\ufffd"):
                sys.stdout.write(text[len(shown) :])
                sys.stdout.flush()
                shown = text
    return out


def _print_json(
    path: str, ids: list[int], out: list[int], text: str, finish: str, elapsed: float
) -> None:
    """The --json result: one object, printed once generation has finished."""
    print(
        json.dumps(
            {
                "model": path,
                "prompt_tokens": len(ids),
                "completion_tokens": len(out),
                "token_ids": out,
                "text": text,
                "finish_reason": finish,
                "seconds": round(elapsed, 4),
            }
        )
    )
