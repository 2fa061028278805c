"""glm's fused attention: a flash-style CUDA kernel (forward and backward) with its PyTorch binding.

- `flash_attn.cu` / `flash_attn.h`: the kernels (tensor cores via mma.sync, tiled online softmax).
- `binding.cpp`: the PyTorch binding (`forward`, `backward`, and `*_out` variants).
- `build.py`: just-in-time build (cached), `python -m glm_cli.cuda_ext.build` ahead of time, nvcc checks.
- `loader.py`: `load_fused_attention()` -> the built module, or None with one log line.
- `flash.py`: `flash_attention(q, k, v, causal)`, the autograd function `core/model/attention.py` calls.

Nothing here imports torch or builds anything at import time.
"""
