#!/usr/bin/env bash
# Run the test suite from the repo's own .venv (with the dev extra), creating it on first use.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh" dev
# The dashboard test evaluates every PromQL query on a real Prometheus (Debian's package).
bash "$root/scripts/install_prometheus.sh"
cd "$root"
exec "$root/.venv/bin/python" -m pytest -q tests "$@"
