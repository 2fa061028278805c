#!/usr/bin/env bash
# Stage 70: quantize the aligned model to INT8 and INT4-GPTQ checkpoints and to a Q8_0 GGUF file, and
# report size and held-out perplexity change of each.
#   in:  the aligned checkpoint ($DEMO/aligned; else the newest checkpoint of an earlier stage),
#        token shards (calibration: train split; perplexity: val split, never seen by calibration)
#   out: $DEMO/quantized-int8, $DEMO/quantized-int4 (glm checkpoints), $DEMO/model-q8_0.gguf,
#        $DEMO/quantize-report.json
set -euo pipefail
: "${DEMO:=runs/demo}"
if command -v glm >/dev/null 2>&1; then GLM=glm; else GLM=.venv/bin/glm; fi

is_ckpt() { [ -f "$1/config.json" ] && [ -f "$1/model.safetensors" ] && ! grep -q quantization_config "$1/config.json"; }

# The model: the aligned one if the align stage ran, else the newest full-precision checkpoint in $DEMO.
MODEL=""
for candidate in "$DEMO/aligned" "$DEMO/align/final" "$DEMO/align" "$DEMO/sft" "$DEMO/finetune/final" \
                 "$DEMO/finetune" "$DEMO/pretrain/final" "$DEMO/pretrain"; do
  if is_ckpt "$candidate"; then MODEL=$candidate; break; fi
done
if [ -z "$MODEL" ]; then
  MODEL=$(find "$DEMO" -name config.json -not -path "*/quantized-*" -printf '%T@ %h\n' 2>/dev/null \
          | sort -rn | while read -r _ dir; do if is_ckpt "$dir"; then echo "$dir"; break; fi; done)
fi
if [ -z "$MODEL" ]; then
  echo "70_quantize: no checkpoint under $DEMO (run the pretrain stage first)" >&2
  exit 1
fi

# Calibration/evaluation data: the demo's token shards.
SHARDS=""
for candidate in "$DEMO/shards" "$DEMO/tokens"; do
  if [ -f "$candidate/index.json" ]; then SHARDS=$candidate; break; fi
done
if [ -z "$SHARDS" ]; then
  SHARDS=$(find "$DEMO" -name index.json -printf '%h\n' 2>/dev/null | head -n 1)
fi
if [ -z "$SHARDS" ]; then
  echo "70_quantize: no token shards under $DEMO (run the tokenize stage first)" >&2
  exit 1
fi
echo "70_quantize: model $MODEL, calibration/eval shards $SHARDS" >&2

EVAL="--eval-data $SHARDS --eval-tokens 16384"
$GLM quantize "$MODEL" -o "$DEMO/quantized-int8" --bits 8 --method rtn $EVAL --json > "$DEMO/quantize-int8.json"
$GLM quantize "$MODEL" -o "$DEMO/quantized-int4" --bits 4 --method gptq --group-size 128 \
  --calibration "$SHARDS" --calibration-samples 64 $EVAL --json > "$DEMO/quantize-int4.json"
$GLM quantize "$MODEL" -o "$DEMO/model-q8_0.gguf" --format gguf --gguf-type q8_0 $EVAL \
  --json > "$DEMO/quantize-gguf.json"

# One report: size ratio and held-out perplexity change of each output.
.venv/bin/python - "$DEMO" <<'PY'
import json, sys
from pathlib import Path
demo = Path(sys.argv[1])
rows = [json.loads((demo / f"quantize-{n}.json").read_text()) for n in ("int8", "int4", "gguf")]
(demo / "quantize-report.json").write_text(json.dumps(rows, indent=2) + "\n")
print(f"{'output':32s} {'MB':>7s} {'ratio':>6s} {'ppl fp32':>9s} {'ppl quant':>9s} {'change':>8s}")
for r in rows:
    ppl = (f"{r['perplexity_fp32']:9.3f} {r['perplexity_quantized']:9.3f} {r['perplexity_change_pct']:+7.2f}%"
           if "perplexity_quantized" in r else f"{'-':>9s} {'-':>9s} {'-':>8s}")
    print(f"{Path(r['output']).name:32s} {r['output_bytes'] / 1e6:7.2f} {r['compression']:6.2f} {ppl}")
PY
