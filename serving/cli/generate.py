"""`moe-serve generate`: complete a prompt in-process with the KV cache."""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from serving.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    from serving.demo import demo_checkpoint

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
    from pydantic import ValidationError

    from serving.generate import SamplingParams, generate
    from serving.load import load_model
    from serving.tokenizer import TextTokenizer

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
    try:
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            stop_token_ids=model.config.eos_ids,
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        raise UserError(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}") from None
    start = time.perf_counter()
    out: list[int] = []
    shown = ""
    for token in generate(model, ids, params):
        out.append(token)
        if not args.json:
            text = tok.decode(out)
            # Print only whole characters: a byte-level token may end inside a UTF-8 sequence.
            if not text.endswith("\ufffd"):
                sys.stdout.write(text[len(shown) :])
                sys.stdout.flush()
                shown = text
    elapsed = time.perf_counter() - start
    finish = "stop" if out and out[-1] in params.stop_token_ids else "length"
    if args.json:
        print(
            json.dumps(
                {
                    "model": path,
                    "prompt_tokens": len(ids),
                    "completion_tokens": len(out),
                    "token_ids": out,
                    "text": tok.decode(out),
                    "finish_reason": finish,
                    "seconds": round(elapsed, 4),
                }
            )
        )
    else:
        print(
            f"\n[{len(out)} tokens in {elapsed:.2f} s, finish: {finish}, model: {path}]",
            file=sys.stderr,
        )
    return 0
