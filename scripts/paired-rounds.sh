#!/usr/bin/env bash
# Tessera's w2a8kv4 runtime and llama.cpp's fastest formats in alternating rounds (issue 7;
# docs/performance.md). One `side-by-side.sh` sitting compares single runs, and on a shared
# machine a run moves by 20% within minutes; here each round runs llama.cpp (Q4_0 and Q2_K,
# re-quantized from the shipped Q4_1 file) and tessera back to back, so each round gives one
# ratio measured under the same load, and the summary is the distribution of those ratios.
#
#   scripts/paired-rounds.sh LLAMA_BUILD_BIN [ROUNDS]
#
# Env: THREADS (default 2), OUT (default build/bench; the re-quantized files are made there
# with llama-quantize when missing), MODEL, NO_BUILD=1 to skip `cargo build --release`.
# Prints one line per round and the median, minimum and maximum of the prefill (pp128) and
# decode (tg64) ratios against the faster llama.cpp format of that round.
set -euo pipefail
cd "$(dirname "$0")/.."
LLAMA_BIN=${1:-}
ROUNDS=${2:-8}
THREADS=${THREADS:-2}
OUT=${OUT:-build/bench}
MODEL=${MODEL:-${TESSERA_CACHE:-$HOME/.cache/tessera}/models/SmolLM2-135M-Instruct.Q4_1.gguf}
if [ -z "$LLAMA_BIN" ] || [ ! -x "$LLAMA_BIN/llama-bench" ]; then
  echo "error: pass llama.cpp's build/bin folder (with llama-bench) as the first argument" >&2
  exit 2
fi
if [ ! -f "$MODEL" ]; then
  echo "error: model $MODEL not found; run scripts/fetch-model.sh (or set MODEL=...)" >&2
  exit 2
fi
case "$ROUNDS" in '' | *[!0-9]* | 0)
  echo "error: ROUNDS must be a positive integer, got '$ROUNDS'" >&2
  exit 2
  ;;
esac
export LD_LIBRARY_PATH="$LLAMA_BIN${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
mkdir -p "$OUT"
ggufs=()
for t in Q4_0 Q2_K; do
  f="$OUT/smollm2-requant-$t.gguf"
  if [ ! -f "$f" ]; then
    if [ ! -x "$LLAMA_BIN/llama-quantize" ]; then
      echo "error: $f missing and no llama-quantize in $LLAMA_BIN to make it" >&2
      exit 2
    fi
    "$LLAMA_BIN/llama-quantize" --allow-requantize "$MODEL" "$f" "$t" 1 \
      > "$OUT/llama-quantize-$t.log" 2>&1
  fi
  ggufs+=("$f")
done
[ -n "${NO_BUILD:-}" ] || cargo build --release --quiet
T=./target/release/tessera

# llama-bench's mean tokens/s of its pp and tg tests (CSV: avg_ts is the next-to-last field).
llama() {
  "$LLAMA_BIN/llama-bench" -m "$1" -p 128 -n 64 -t "$THREADS" -r 1 -o csv 2>/dev/null |
    awk -F, 'NR > 1 { gsub(/"/, ""); printf "%s ", $(NF - 1) }'
}

echo "# paired rounds, $(date -u '+%Y-%m-%d %H:%M UTC'), tessera $(git rev-parse --short HEAD)," \
  "$THREADS threads, $ROUNDS rounds"
echo "machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name:[[:space:]]*//p'), flags:" \
  "$(grep -o -w -E 'avx2|fma|bmi2|avx512f|avx512_vnni|avx_vnni' /proc/cpuinfo | sort -u | tr '\n' ' ')"
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "round | llama Q4_0 pp / tg | llama Q2_K pp / tg | tessera w2a8kv4 pp / tg | prefill ratio | decode ratio"
ratios=$(mktemp)
trap 'rm -f "$ratios"' EXIT
for r in $(seq 1 "$ROUNDS"); do
  read -r q4pp q4tg <<< "$(llama "${ggufs[0]}")"
  read -r q2pp q2tg <<< "$(llama "${ggufs[1]}")"
  out=$("$T" bench run --model "$MODEL" --mode w2a8kv4 --threads "$THREADS" --reps 1 2>/dev/null)
  tpp=$(sed -n 's/^prefill: \([0-9.]*\).*/\1/p' <<< "$out" | head -1)
  ttg=$(sed -n 's/^decode: \([0-9.]*\).*/\1/p' <<< "$out" | head -1)
  if [ -z "$q4pp" ] || [ -z "$q2pp" ] || [ -z "$tpp" ] || [ -z "$ttg" ]; then
    echo "error: round $r: a benchmark printed no figure (llama-bench or tessera bench run failed)" >&2
    exit 1
  fi
  awk -v r="$r" -v a="$q4pp" -v b="$q4tg" -v c="$q2pp" -v d="$q2tg" -v e="$tpp" -v f="$ttg" \
    'BEGIN { bp = (a > c ? a : c); bt = (b > d ? b : d);
             printf "%d | %.1f / %.1f | %.1f / %.1f | %.1f / %.1f | %.3f | %.3f\n",
                    r, a, b, c, d, e, f, e / bp, f / bt }'
  awk -v a="$q4pp" -v b="$q4tg" -v c="$q2pp" -v d="$q2tg" -v e="$tpp" -v f="$ttg" \
    'BEGIN { bp = (a > c ? a : c); bt = (b > d ? b : d); print e / bp, f / bt }' >> "$ratios"
done
summary() {
  sort -g | awk '{ v[NR] = $1 } END {
    m = (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2);
    printf "median %.3f, min %.3f, max %.3f", m, v[1], v[NR] }'
}
echo "prefill ratio (tessera / llama.cpp's faster format, same round): $(cut -d' ' -f1 "$ratios" | summary)"
echo "decode ratio (tessera / llama.cpp's faster format, same round): $(cut -d' ' -f2 "$ratios" | summary)"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
