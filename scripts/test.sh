#!/usr/bin/env bash
# Run the test suite from the repo's own .venv (with the dev extra), creating it on first use.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh" dev
cd "$root"
exec "$root/.venv/bin/python" -m pytest -q tests "$@"
