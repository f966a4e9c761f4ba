#!/usr/bin/env bash
# Create .venv at the repo root and install moe-serve into it, once per pyproject.toml version.
# Usage: bootstrap.sh [EXTRA]   (EXTRA=dev adds the test tools)
# torch==2.13.0 goes first: on a CPU machine that pin resolves to a local CPU build; any looser
# spec would pull a multi-GB CUDA build. GPU users install their own torch before this script.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.moe-serve-installed"
extra="${1:-}"
hash="$(sha1sum "$root/pyproject.toml" | cut -c1-12)"
installed="$(cat "$stamp" 2>/dev/null || true)"
# Up to date when the stamp names this pyproject and the wanted extra (a dev install also serves
# a plain one).
case "$installed" in
    "$hash $extra" | "$hash dev") [ -z "$extra" ] || [ "$installed" = "$hash $extra" ] && exit 0 ;;
esac
if [ ! -x "$venv/bin/python" ]; then
    python3.11 -m venv "$venv" 2>/dev/null || python3 -m venv "$venv"
fi
echo "moe-serve: installing into $venv (first run only; a few minutes)" >&2
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -c "import torch" 2>/dev/null || "$venv/bin/python" -m pip install --quiet "torch==2.13.0"
"$venv/bin/python" -m pip install --quiet -e "$root${extra:+[$extra]}"
# Build the packed CPU GEMM now (about a minute, once per machine) rather than at the first
# request; where it cannot be built here, serving uses torch's GEMM and says so.
"$venv/bin/python" -c "from experts import cpu_kernels; cpu_kernels.available()" || true
echo "$hash $extra" > "$stamp"
