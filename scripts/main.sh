#!/usr/bin/env bash
# The main job on embedded defaults: set up, build, then `tessera demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --quiet
exec ./target/release/tessera demo "$@"
