#!/usr/bin/env bash
# Install a Prometheus server (Debian's `prometheus` package, 2.42 on bookworm) for
# tests/integration/test_prometheus.py, which starts it on 127.0.0.1 with its own config.
# Idempotent: does nothing when a `prometheus` binary is already on PATH.
# --no-install-recommends: only the server; the node exporter and the web assets are not needed.
set -euo pipefail
if command -v prometheus >/dev/null 2>&1; then
    exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "install_prometheus.sh: needs root or sudo" >&2; exit 1; }
    sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
# The package's post-install would start a system service; there is none to start in a container,
# and the test runs its own server, so service starts are refused for the duration of the install.
policy=/usr/sbin/policy-rc.d
created_policy=""
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
    $sudo chmod +x "$policy"
    created_policy=1
fi
trap '[ -z "$created_policy" ] || $sudo rm -f "$policy"' EXIT
echo "install_prometheus.sh: installing Debian's prometheus package" >&2
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
command -v prometheus >/dev/null
