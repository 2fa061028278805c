"""Does llama.cpp run glm's GGUF as glm runs the checkpoint? Same text, same ids, same greedy output.

`glm quantize --format gguf` writes llama.cpp's tensor names, metadata and tokenizer. This script loads
the GGUF in llama.cpp (through `llama-cpp-python`, which compiles llama.cpp from source on install:
`pip install llama-cpp-python`, a few minutes on 2 cores) and the source checkpoint in glm, and compares
the tokenization, the logits of every position (Q8_0/Q4_0 rounding is the only expected difference) and
the greedy continuation.

    .venv/bin/python bench/gguf_llamacpp.py runs/demo/model-q8_0.gguf runs/demo/align/final
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

TEXT = "HAMLET.\nTo be, or not to be, that is the question:\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf")
    parser.add_argument("checkpoint", help="the glm checkpoint the GGUF was made from")
    parser.add_argument("--text", default=TEXT)
    parser.add_argument("--new-tokens", type=int, default=20)
    args = parser.parse_args()
    try:
        from llama_cpp import Llama
    except ImportError:
        sys.exit("needs llama-cpp-python: .venv/bin/pip install llama-cpp-python")

    from glm_cli.core.infer.generation import GenerationConfig, generate
    from glm_cli.core.load import load_model
    from glm_cli.core.tokens.tokenizer import load_tokenizer

    llm = Llama(model_path=args.gguf, logits_all=True, n_ctx=128, verbose=False, n_threads=2)
    ll_ids = llm.tokenize(args.text.encode(), add_bos=False, special=False)
    llm.eval(ll_ids)
    ll_logits = np.array(llm.scores[: len(ll_ids)])
    ll_text = llm(args.text, max_tokens=args.new_tokens, temperature=0.0)["choices"][0]["text"]

    tok = load_tokenizer(args.checkpoint)
    ids = tok.encode(args.text, add_special_tokens=False).ids
    model = load_model(args.checkpoint)
    with torch.inference_mode():
        logits = model(torch.tensor([ll_ids]))[0].numpy()
    eos = [model.config.eos_token_id] if model.config.eos_token_id is not None else []
    out = generate(model, [ids], GenerationConfig(max_new_tokens=args.new_tokens, eos_ids=eos), tokenizer=tok)
    glm_text = out[0].text

    report = {
        "same_token_ids": ids == ll_ids,
        "positions": len(ids),
        "max_abs_logit_diff": float(np.abs(logits - ll_logits).max()),
        "max_abs_logit": float(np.abs(logits).max()),
        "top1_agreement": float((logits.argmax(-1) == ll_logits.argmax(-1)).mean()),
        "llama_cpp_greedy": ll_text,
        "glm_greedy": glm_text,
        "same_greedy_text": ll_text == glm_text,
    }
    print(json.dumps(report, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
