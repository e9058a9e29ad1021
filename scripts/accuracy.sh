#!/usr/bin/env bash
# Regenerates the bits-per-weight vs perplexity table of docs/accuracy.md.
#
#   scripts/accuracy.sh [CHUNKS] [MODE]     # defaults: 2 chunks, mode w2a8kv4
#
# Every row: `tessera quantize` (RTN or GPTQ, group 32/64/128, clipping, mixed 2/4-bit tensors
# under a bpw cap) then `tessera ppl` on data/gpl-3.txt (ctx 512, second-half scoring, the first
# CHUNKS chunks) in MODE: `f32` evaluates the dequantized weights with f32 activations and cache
# ("fake quant", fast); `w2a8kv4` runs the engine's integer arithmetic (A8 activations, KV4
# cache). The calibration Hessians (CALIB_TOKENS=4096 tokens of data/calibration.txt) are computed
# once and cached in $OUT/hessians.bin. Rows go to $OUT/table.md (OUT=build/accuracy).
set -euo pipefail
cd "$(dirname "$0")/.."
CHUNKS=${1:-2}
MODE=${2:-w2a8kv4}
OUT=${OUT:-build/accuracy}
CALIB_TOKENS=${CALIB_TOKENS:-4096}
MODEL=${MODEL:-$HOME/.cache/tessera/models/SmolLM2-135M-Instruct.Q4_1.gguf}
mkdir -p "$OUT"
[ -n "${NO_BUILD:-}" ] || cargo build --release --quiet
T=./target/release/tessera
ROWS=${ROWS:-"rtn:64:: rtn:128:: rtn:128:--clip gptq:64:: gptq:128:: gptq:128:--clip gptq:32:--clip \
gptq:64:--clip@--max-bpw@2.6 gptq:128:--clip@--max-bpw@2.6 rtn:128:--clip@--max-bpw@2.6"}
echo "| method | group | options | bpw (linear) | 4-bit share | ppl ($MODE, $CHUNKS chunks) |" >> "$OUT/table.md"
echo "|---|---|---|---|---|---|" >> "$OUT/table.md"
for row in $ROWS; do
  IFS=: read -r method group opts <<< "$row"
  opts=${opts//@/ }
  f="$OUT/${method}_g${group}_$(echo "$opts" | tr -c 'a-z0-9.' '_').tsr"
  # shellcheck disable=SC2086
  log=$($T quantize "$MODEL" --method "$method" --group "$group" $opts --act-order \
        --calib-tokens "$CALIB_TOKENS" --hessian-cache "$OUT/hessians.bin" --out "$f")
  bpw=$(echo "$log" | sed -n 's/^bits per linear-layer weight: \([0-9.]*\).*/\1/p')
  share=$(echo "$log" | sed -n 's/.* \([0-9.]*\)% of the weights at 4 bits.*/\1/p')
  ppl=$($T ppl --model "$f" --text data/gpl-3.txt --ctx 512 --chunks "$CHUNKS" --mode "$MODE" 2>/dev/null \
        | sed -n 's/^perplexity: \([0-9.]*\).*/\1/p')
  echo "| $method | $group | ${opts:-} act-order | $bpw | $share% | $ppl |" | tee -a "$OUT/table.md"
done
