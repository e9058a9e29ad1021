#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian machine (run as root): the system packages Tessera's tests
# and main job need. Rust (cargo) must already be on PATH.
set -euo pipefail

need=()
command -v verilator >/dev/null 2>&1 || need+=(verilator)
command -v yosys >/dev/null 2>&1 || need+=(yosys)
# Verilator compiles C++ with these.
command -v g++ >/dev/null 2>&1 || need+=(g++)
command -v make >/dev/null 2>&1 || need+=(make)

if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "error: missing ${need[*]}; run this script as root or: sudo apt-get install -y ${need[*]}" >&2
    exit 2
  fi
  echo "setup: installing ${need[*]} (Debian packages)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "error: cargo not found on PATH; install Rust (rustup) first" >&2
  exit 2
fi
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt clippy >/dev/null 2>&1 || true
echo "setup: verilator $(verilator --version | awk '{print $2}'), yosys $(yosys -V | awk '{print $2}'), $(cargo --version)"

# The real LLM for `tessera run` and the runtime's real-model tests (optional: warn, never fail).
if model=$(bash "$(dirname "$0")/fetch-model.sh"); then
  echo "setup: model $model"
else
  echo "setup: warning: could not fetch the SmolLM2 model; real-model tests will be skipped" >&2
fi
