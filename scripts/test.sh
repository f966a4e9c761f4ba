#!/usr/bin/env bash
# Run the test suite from the repo's own .venv (with the dev extra), creating it on first use.
#   bash scripts/test.sh            everything that needs no GPU (what CI runs)
#   bash scripts/test.sh --fast     the fast lane: unit tests only, no Ray, no servers (~1 minute)
# Other arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh" dev
cd "$root"
if [ "${1:-}" = "--fast" ]; then
    shift
    exec "$root/.venv/bin/python" -m pytest -q -m "not ray" tests/unit tests/gpu "$@"
fi
# The dashboard test evaluates every PromQL query on a real Prometheus (Debian's package).
bash "$root/scripts/install_prometheus.sh"
exec "$root/.venv/bin/python" -m pytest -q tests "$@"
