#!/usr/bin/env bash
# Regenerates the bits-per-weight vs perplexity table of docs/accuracy.md.
#
#   scripts/accuracy.sh [CHUNKS] [MODE]     # defaults: 2 chunks, mode w2a8kv4
#
# Every row of ROWS (`method:group:options`, `@` for spaces in options) is one `tessera quantize`
# (RTN or GPTQ, group 32/64/128, clipping, mixed 2/4-bit tensors under a bpw cap; with
# `--sweep-bpw` one run writes the model at several caps), then `tessera ppl` on every model it
# wrote: data/gpl-3.txt, ctx 512, second-half scoring, the first CHUNKS chunks (14 = the whole
# text) in MODE (`w2a8kv4`: the engine's integer arithmetic; `f32`: dequantized weights, f32
# activations and cache, "fake quant"). Calibration: CALIB_TOKENS (default 8192) tokens of
# data/calibration.txt; the one-pass Hessians are cached in $OUT/hessians.bin (rows with
# `--sequential` recompute theirs). Every default row is feasible: its cap is at or above the
# pure 2-bit cost of its group (g128 2.42, g64 2.42, g32 2.80 bpw). Rows go to $OUT/table.md
# (OUT=build/accuracy) with the commit and the command.
set -euo pipefail
cd "$(dirname "$0")/.."
CHUNKS=${1:-2}
MODE=${2:-w2a8kv4}
OUT=${OUT:-build/accuracy}
CALIB_TOKENS=${CALIB_TOKENS:-8192}
MODEL=${MODEL:-$HOME/.cache/tessera/models/SmolLM2-135M-Instruct.Q4_1.gguf}
mkdir -p "$OUT"
[ -n "${NO_BUILD:-}" ] || cargo build --release --quiet
T=./target/release/tessera
COMMIT=$(git rev-parse --short HEAD)
ROWS=${ROWS:-"rtn:64:: \
gptq:128:--clip@--max-bpw@2.6@--sweep-bpw@2.45,2.8,3.0 \
gptq:64:--clip@--max-bpw@2.6@--sweep-bpw@2.45,2.8,3.0 \
gptq:32:--clip@--max-bpw@3.0 \
gptq:64:--clip@--sequential@--max-bpw@2.6@--sweep-bpw@2.45,2.8,3.0"}
{
  echo "| method | group | options | bpw (linear) | 4-bit share | ppl ($MODE, $CHUNKS chunks) | commit | command |"
  echo "|---|---|---|---|---|---|---|---|"
} >> "$OUT/table.md"
for row in $ROWS; do
  IFS=: read -r method group opts <<< "$row"
  opts=${opts//@/ }
  f="$OUT/${method}_g${group}_c${CALIB_TOKENS}_$(echo "$opts" | tr -c 'a-z0-9.' '_').tsr"
  cmd="tessera quantize MODEL --method $method --group $group $opts --act-order --calib-tokens $CALIB_TOKENS"
  # shellcheck disable=SC2086
  log=$($T quantize "$MODEL" --method "$method" --group "$group" $opts --act-order \
        --calib-tokens "$CALIB_TOKENS" --hessian-cache "$OUT/hessians.bin" --out "$f")
  # One "wrote FILE ..." line, then its "bits per linear-layer weight" line, per model written.
  echo "$log" | awk '/^wrote /{f=$2} /^bits per linear-layer weight:/{
      share=$0; sub(/% of the weights at 4 bits.*/, "", share);
      sub(/.* /, "", share); print f, $5, share}' |
  while read -r file bpw share; do
    ppl=$($T ppl --model "$file" --text data/gpl-3.txt --ctx 512 --chunks "$CHUNKS" --mode "$MODE" </dev/null \
          2>/dev/null | sed -n 's/^perplexity: \([0-9.]*\).*/\1/p')
    echo "| $method | $group | ${opts:-} act-order | $bpw | $share% | $ppl | $COMMIT | \`$cmd\` ($(basename "$file")) |" \
      | tee -a "$OUT/table.md"
  done
done
