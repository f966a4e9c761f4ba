#!/usr/bin/env bash
# Everything GPU-only in one command, on a machine with an NVIDIA GPU: the GPU tests (tests/gpu)
# and the GPU benchmarks (scripts/bench_moe_layer.py at its H200 settings: the issue's shapes, bf16;
# scripts/bench_forward.py: the whole model against transformers' in bf16; scripts/bench_engine.py:
# the engine with decode steps as CUDA graphs and without), plus any reference scripts given as
# arguments. About 3 minutes on an H200 once installed; every step has its own time bound.
#
# Usage: bash scripts/gpu_check.sh [REFERENCE_SCRIPT.py ...]
#   Each REFERENCE_SCRIPT runs with the same Python, from the repo root, after ours; its stdout is
#   saved as ref-NAME.out and its stderr as ref-NAME.log beside our results, so a caller can put a
#   reference measurement in the same run without this repo naming any outside path.
#
# Results go to ${OUT:-bench-results/gpu}/ (bench-results/ is git-ignored): summary.txt (machine,
# versions, the verdict of each step), pytest.txt, bench_moe_layer.jsonl (one JSON line per case),
# bench_forward.json, bench_engine.json, bench.log (our benchmarks' stderr, one after another), and
# ref-NAME.out / ref-NAME.log per reference script: 8 files with one reference script.
#
# A CUDA build of torch must be importable. This script checks for a GPU first (nvidia-smi) and
# stops at once without one. Then it uses, in this order:
#   1. $PYTHON, if set, as it is (nothing is installed);
#   2. the repo's .venv, created if missing. When its torch is missing or has no CUDA, it first runs
#      `pip install torch` there (PyPI's torch is a CUDA build on x86_64 Linux; a CPU build in place
#      is replaced). That must come before `scripts/bootstrap.sh dev`, which installs the CPU pin
#      torch==2.13.0 whenever torch is missing; bootstrap then installs moe-serve and the rest;
#   3. if .venv still has no CUDA torch (an offline machine: pip cannot reach PyPI), the first
#      python3, python, python3.12 or python3.11 on PATH whose torch sees the GPU, as it is, with
#      the repo on PYTHONPATH. The project's modules it lacks are listed (pydantic is needed to
#      start at all; ray only for tests/gpu/test_shards_on_one_gpu.py, skipped without it).
#   It prints what it did at each step.
# Settings (environment): GPU_CHECK_INSTALL=0 skips every install step; GPU_CHECK_INSTALL_S (900),
# GPU_CHECK_PYTEST_S (230), GPU_CHECK_BENCH_S (150, each of our three benchmarks), GPU_CHECK_REF_S
# (60, each script) bound the steps in seconds; GPU_CHECK_BENCH_ARGS adds flags to
# bench_moe_layer.py. GPU_CHECK_WHEELS=DIR, for an offline machine whose Python lacks some of the
# project's modules (pydantic, ray): every *.whl in DIR is installed with `pip install --no-index
# --no-deps --target` into a folder put first on PYTHONPATH (so Ray's workers see it too); DIR must
# hold the wheels' own dependencies that the machine lacks.
#
# Exit status: 0 when every step passed, 1 when one failed, 2 when there is no CUDA device.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# -- 0. a GPU at all: checked before anything is installed ---------------------------------------
if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu_check: no CUDA device available: nvidia-smi not found (an NVIDIA GPU and its driver are needed)" >&2
    exit 2
fi
if ! gpus="$(timeout 60 nvidia-smi -L 2>&1)" || ! grep -q '^GPU ' <<<"$gpus"; then
    echo "gpu_check: no CUDA device available: nvidia-smi -L lists no GPU ($(head -n 1 <<<"$gpus"))" >&2
    exit 2
fi

# Reference scripts by absolute path, before leaving the caller's directory.
refs=()
for ref in "$@"; do
    if [ -f "$ref" ]; then
        refs+=("$(cd "$(dirname "$ref")" && pwd)/$(basename "$ref")")
    else
        refs+=("$ref")
    fi
done
out="${OUT:-$root/bench-results/gpu}"
mkdir -p "$out" && out="$(cd "$out" && pwd)" || exit 1
summary="$out/summary.txt"
cd "$root" || exit 1

install="${GPU_CHECK_INSTALL:-1}"
install_s="${GPU_CHECK_INSTALL_S:-900}"
pytest_s="${GPU_CHECK_PYTEST_S:-230}"
bench_s="${GPU_CHECK_BENCH_S:-150}"
ref_s="${GPU_CHECK_REF_S:-60}"

results=()
failed=0
say() { echo "gpu_check: $*"; }
# record STATUS STEP DETAIL: PASS and FAIL are verdicts (a FAIL makes the exit status 1); NOTE is
# what an install step did.
record() {
    results+=("$(printf '%-4s %-18s %s' "$1" "$2" "$3")")
    if [ "$1" = FAIL ]; then failed=1; fi
    say "$1 $2: $3"
}
cuda_torch() {  # PYTHON: does its torch see a CUDA device?
    timeout 120 "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
        >/dev/null 2>&1
}
torch_of() {  # PYTHON: its torch's version and CUDA, or "none"
    timeout 120 "$1" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)' \
        2>/dev/null || echo none
}
err() { echo "${TMPDIR:-/tmp}/gpu_check.$1.err"; }  # STEP: where a benchmark's stderr goes
keep_err() { { echo "== $1 (stderr)"; cat "$(err "$1")"; } >>"$out/bench.log"; }
finish() {
    {
        echo
        echo "== results ($(date -u +%FT%TZ), ${SECONDS} s)"
        printf '%s\n' "${results[@]}"
        echo "results in $out:"
        ls -l "$out"
    } | tee -a "$summary"
    if [ "$failed" = 0 ]; then say "all steps passed"; else say "some steps FAILED"; fi
    exit "$failed"
}

# -- 1. the Python with a CUDA torch -------------------------------------------------------------
say "GPU: $(head -n 1 <<<"$gpus")"
venv_py="$root/.venv/bin/python"
py=""
if [ -n "${PYTHON:-}" ]; then
    py="$PYTHON"
    say "using \$PYTHON=$py as it is"
else
    if [ "$install" = 1 ]; then
        if [ ! -x "$venv_py" ]; then
            say "creating .venv"
            python3.11 -m venv "$root/.venv" 2>/dev/null || python3 -m venv "$root/.venv"
        fi
        if [ -x "$venv_py" ] && ! cuda_torch "$venv_py"; then
            before="$(torch_of "$venv_py")"
            pip_args=(install --quiet --retries 1 torch)
            [ "$before" = none ] || pip_args+=(--upgrade --force-reinstall)
            say ".venv's torch: $before, no CUDA: pip ${pip_args[*]} (PyPI's torch is a CUDA build on x86_64 Linux; GBs, minutes)"
            if timeout "$install_s" "$venv_py" -m pip "${pip_args[@]}"; then
                record NOTE install-torch "pip ${pip_args[*]} in .venv: torch $before -> $(torch_of "$venv_py")"
            else
                record NOTE install-torch "pip ${pip_args[*]} in .venv failed (rc $?; offline?): torch stays $before"
            fi
        fi
        say "bash scripts/bootstrap.sh dev"
        if timeout "$install_s" env PIP_RETRIES=1 bash "$root/scripts/bootstrap.sh" dev; then
            record NOTE bootstrap "scripts/bootstrap.sh dev: .venv up to date"
        else
            record NOTE bootstrap "scripts/bootstrap.sh dev failed (rc $?; offline?): continuing"
        fi
    fi
    if [ -x "$venv_py" ] && cuda_torch "$venv_py"; then
        py="$venv_py"
    else
        have="no .venv"
        if [ -x "$venv_py" ]; then have="torch $(torch_of "$venv_py")"; fi
        say ".venv has no CUDA torch ($have): looking on PATH for a Python whose torch sees the GPU"
        for name in python3 python python3.12 python3.11; do
            cand="$(command -v "$name" 2>/dev/null)" || continue
            if cuda_torch "$cand"; then
                py="$cand"
                break
            fi
        done
    fi
fi
if [ -z "$py" ] || ! cuda_torch "$py"; then
    echo "gpu_check: no Python with a CUDA build of torch that sees the GPU (${py:-none found}): install one into .venv (pip install torch) or set PYTHON" >&2
    exit 1
fi
if [ -n "${GPU_CHECK_WHEELS:-}" ]; then
    site="${TMPDIR:-/tmp}/moe-serve-gpu-site"
    if timeout "$install_s" "$py" -m pip install --quiet --no-index --no-deps --target "$site" \
        "$GPU_CHECK_WHEELS"/*.whl; then
        record NOTE wheels "$(ls "$GPU_CHECK_WHEELS"/*.whl | wc -l) wheels from $GPU_CHECK_WHEELS into $site"
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    else
        record NOTE wheels "pip install --target $site from $GPU_CHECK_WHEELS failed (rc $?): continuing"
    fi
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# -- 2. the machine and the versions -------------------------------------------------------------
{
    echo "== gpu_check $(date -u +%FT%TZ) on $(uname -n)"
    echo "python: $py"
    echo "git: $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo '?') $(git -C "$root" status --porcelain 2>/dev/null | wc -l | tr -d ' ') changed files"
    timeout 60 nvidia-smi
    timeout 120 "$py" - <<'EOF'
import importlib
import platform

import torch

print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version())
p = torch.cuda.get_device_properties(0)
print(f"device 0: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB,",
      f"{p.multi_processor_count} SMs; torch.nn.functional.grouped_mm:",
      hasattr(torch.nn.functional, "grouped_mm"))
missing = []
for name in ("transformers", "ray", "pydantic", "safetensors", "tokenizers", "numpy", "yaml",
             "jinja2", "pytest", "pytest_timeout"):
    try:
        print(f"{name} {getattr(importlib.import_module(name), '__version__', '?')}")
    except Exception as exc:  # report and go on: the steps below say what it costs
        missing.append(name)
        print(f"{name} MISSING ({type(exc).__name__})")
if missing:
    print("missing:", " ".join(missing))
EOF
} 2>&1 | tee "$summary"
if missing="$(grep '^missing:' "$summary")"; then
    hint="offline: carry them as wheels"
    case " ${missing#missing: } " in *" pydantic "*) hint="$hint; without pydantic no test can start" ;; esac
    record NOTE modules "${missing#missing: } not importable ($hint)"
fi

# -- 3. the GPU tests ----------------------------------------------------------------------------
targs=(-q tests/gpu -rsxX -p no:cacheprovider)
if "$py" -c 'import pytest_timeout' 2>/dev/null; then
    targs+=(--timeout=150)  # per test; the whole step is bounded by `timeout` below
fi
say "pytest ${targs[*]} (at most ${pytest_s} s)"
start=$SECONDS
timeout --kill-after=10 "$pytest_s" "$py" -m pytest "${targs[@]}" 2>&1 | tee "$out/pytest.txt"
rc=${PIPESTATUS[0]}
tally="$(grep -E '[0-9]+ (passed|failed|skipped|errors?|deselected|xfailed|xpassed)|no tests ran' "$out/pytest.txt" | tail -n 1 | tr -d '=' | sed 's/^ *//')"
case $rc in
    0) record PASS pytest "${tally:-?} ($((SECONDS - start)) s)" ;;
    124 | 137) record FAIL pytest "timed out after ${pytest_s} s: ${tally:-no tally}" ;;
    *) record FAIL pytest "rc $rc: ${tally:-no tally} ($((SECONDS - start)) s)" ;;
esac
while IFS= read -r line; do
    results+=("     ${line}")
done < <(grep -E '^(FAILED|ERROR|SKIPPED|XFAIL|XPASS)' "$out/pytest.txt" | cut -c1-200)

# -- 4. the GPU benchmark ------------------------------------------------------------------------
bench_args=()
read -r -a bench_args <<<"${GPU_CHECK_BENCH_ARGS:-}"
jsonl="$out/bench_moe_layer.jsonl"
say "scripts/bench_moe_layer.py${bench_args[*]:+ ${bench_args[*]}} (at most ${bench_s} s) -> $jsonl"
start=$SECONDS
timeout --kill-after=10 "$bench_s" "$py" scripts/bench_moe_layer.py ${bench_args[@]+"${bench_args[@]}"} \
    >"$jsonl" 2>"$(err bench_moe_layer)"
rc=$?
keep_err bench_moe_layer
cat "$jsonl"
cases="$(grep -c '^{' "$jsonl")"
if ! "$py" -c 'import json, sys; [json.loads(l) for l in open(sys.argv[1]) if l.strip()]' "$jsonl"; then
    record FAIL bench_moe_layer "rc $rc: its stdout is not JSON lines (see bench.log)"
elif [ "$rc" = 0 ] && [ "$cases" -gt 0 ]; then
    record PASS bench_moe_layer "$cases cases ($((SECONDS - start)) s) -> $jsonl"
elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    record FAIL bench_moe_layer "timed out after ${bench_s} s with $cases cases done -> $jsonl"
else
    record FAIL bench_moe_layer "rc $rc after $cases cases: $(tail -n 1 "$(err bench_moe_layer)")"
fi

# -- 4b, 4c. the whole model against transformers' (bf16), and the engine with decode steps as CUDA
# graphs and without: each prints one JSON object.
json_bench() {  # STEP FILE SCRIPT [ARGS...]
    local step="$1" file="$2" start=$SECONDS rc
    shift 2
    say "$* (at most ${bench_s} s) -> $file"
    timeout --kill-after=10 "$bench_s" "$py" "$@" >"$file" 2>"$(err "$step")"
    rc=$?
    keep_err "$step"
    cat "$file"
    if [ "$rc" = 0 ] && "$py" -c 'import json, sys; json.load(open(sys.argv[1]))' "$file" 2>/dev/null; then
        record PASS "$step" "($((SECONDS - start)) s) -> $file"
    else
        record FAIL "$step" "rc $rc: $(tail -n 1 "$(err "$step")")"
    fi
}
json_bench bench_forward "$out/bench_forward.json" scripts/bench_forward.py --device cuda \
    --dtype bfloat16 --rounds 3
json_bench bench_engine "$out/bench_engine.json" scripts/bench_engine.py --rounds 3

# -- 5. reference scripts ------------------------------------------------------------------------
for ref in ${refs[@]+"${refs[@]}"}; do
    name="ref-$(printf '%s' "$(basename "$ref" .py)" | tr -c 'A-Za-z0-9._-' '_')"
    if [ ! -f "$ref" ]; then
        record FAIL "$name" "$ref: no such file"
        continue
    fi
    say "reference $ref (at most ${ref_s} s) -> $out/$name.out"
    start=$SECONDS
    GPU_CHECK_OUT="$out" timeout --kill-after=10 "$ref_s" "$py" "$ref" >"$out/$name.out" 2>"$out/$name.log"
    rc=$?
    cat "$out/$name.out"
    case $rc in
        0) record PASS "$name" "$ref ($((SECONDS - start)) s) -> $out/$name.out" ;;
        124 | 137) record FAIL "$name" "$ref timed out after ${ref_s} s" ;;
        *) record FAIL "$name" "$ref: rc $rc: $(tail -n 1 "$out/$name.log")" ;;
    esac
done

# -- 6. summary ----------------------------------------------------------------------------------
finish
