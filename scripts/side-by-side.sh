#!/usr/bin/env bash
# Tessera's CPU runtime next to llama.cpp, in one sitting (issue 7; docs/performance.md).
#
#   scripts/side-by-side.sh [LLAMA_BUILD_BIN]
#
# LLAMA_BUILD_BIN: a llama.cpp `build/bin` folder holding `llama-bench` (and, optionally,
# `llama-quantize`). Build it from the `llama-cpp-python` sdist on PyPI, which carries llama.cpp's
# sources (`pip download --no-binary :all: --no-deps llama-cpp-python`, unpack, then
# `cmake -S vendor/llama.cpp -B build && cmake --build build --target llama-bench llama-quantize`).
# Without it only tessera's rows are measured.
#
# Rows: llama.cpp on the Q4_1 GGUF and, when `llama-quantize` is there, on Q4_0 and Q2_K files
# re-quantized from it (speed only: re-quantizing a Q4_1 file loses accuracy, not speed), so
# "llama.cpp's best decode on this model" is measured, not assumed; then `tessera bench run` for
# w2a8kv4, w8a8kv8 and f32 at 1 and 2 threads, and the w2a8kv4 roofline and decode profile.
# Everything goes to stdout and to $OUT/side-by-side-<date>.md with the machine, the load
# average before and after, and the commit. Run it on a quiet machine: the figures are only
# comparable within one run.
set -euo pipefail
cd "$(dirname "$0")/.."
LLAMA_BIN=${1:-}
OUT=${OUT:-build/bench}
THREADS=${THREADS:-"1 2"}
MODES=${MODES:-"w2a8kv4 w8a8kv8 f32"}
MODEL=${MODEL:-${TESSERA_CACHE:-$HOME/.cache/tessera}/models/SmolLM2-135M-Instruct.Q4_1.gguf}
if [ ! -f "$MODEL" ]; then
  echo "error: model $MODEL not found; run scripts/fetch-model.sh (or set MODEL=...)" >&2
  exit 2
fi
mkdir -p "$OUT"
[ -n "${NO_BUILD:-}" ] || cargo build --release --quiet
T=./target/release/tessera
LOG="$OUT/side-by-side-$(date -u +%Y%m%dT%H%MZ).md"
exec > >(tee "$LOG") 2>&1

echo "# side by side, $(date -u '+%Y-%m-%d %H:%M UTC'), tessera $(git rev-parse --short HEAD)"
echo
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)," \
  "$(lscpu | sed -n 's/^Model name:[[:space:]]*//p')"
echo "flags: $(grep -o -w -E 'avx2|fma|bmi2|avx512f|avx512_vnni|avx_vnni' /proc/cpuinfo | sort -u | tr '\n' ' ')"
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo

if [ -n "$LLAMA_BIN" ]; then
  if [ ! -x "$LLAMA_BIN/llama-bench" ]; then
    echo "error: $LLAMA_BIN/llama-bench not found; pass llama.cpp's build/bin folder" >&2
    exit 2
  fi
  export LD_LIBRARY_PATH="$LLAMA_BIN${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  ggufs=("$MODEL")
  if [ -x "$LLAMA_BIN/llama-quantize" ]; then
    for t in Q4_0 Q2_K; do
      f="$OUT/smollm2-requant-$t.gguf"
      [ -f "$f" ] || "$LLAMA_BIN/llama-quantize" --allow-requantize "$MODEL" "$f" "$t" 1 \
        > "$OUT/llama-quantize-$t.log" 2>&1
      ggufs+=("$f")
    done
  fi
  for f in "${ggufs[@]}"; do
    echo "## llama.cpp $(basename "$f")"
    "$LLAMA_BIN/llama-bench" -m "$f" -p 128 -n 64 -t "${THREADS// /,}" -r 3 2>/dev/null
    echo
  done
fi

echo "## tessera (bench run: pp128, tg64, 3 repetitions)"
echo
echo "| mode | threads | prefill | decode |"
echo "|---|---|---|---|"
for mode in $MODES; do
  for t in $THREADS; do
    r=$("$T" bench run --model "$MODEL" --mode "$mode" --threads "$t" 2>/dev/null)
    pre=$(sed -n 's/^prefill: //p' <<< "$r" | head -1)
    dec=$(sed -n 's/^decode: //p' <<< "$r" | head -1)
    echo "| $mode | $t | $pre | $dec |"
  done
done
echo
echo "## tessera w2a8kv4, 2 threads: roofline and decode profile"
"$T" bench run --model "$MODEL" --mode w2a8kv4 --threads 2 --roofline --profile 2>/dev/null
echo
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "written: $LOG"
