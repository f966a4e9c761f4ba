#!/usr/bin/env bash
# Run `moe-serve` from the repo's own .venv, creating and installing it on first use.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
exec "$root/.venv/bin/moe-serve" "$@"
