"""glm's fused attention: a flash-style CUDA kernel (forward and backward) with its PyTorch binding.

- `flash_attn.cu` / `flash_attn.h`: the kernels (tensor cores via mma.sync, tiled online softmax).
- `binding.cpp`: the PyTorch binding (`forward`, `backward`, and `*_out` variants).
- `build.py`: just-in-time build (cached), `python -m glm_cli.cuda_ext.build` ahead of time, nvcc checks.
- `loader.py`: `load_fused_attention()` -> the built module, or None with one log line.
- `flash.py`: the custom ops `glm::flash_attention` / `glm::flash_attention_backward` (torch.library, with
  fake implementations and the autograd formula) behind `flash_attention(q, k, v, causal)`, which
  `core/model/attention.py` calls; `ReferenceKernel`, the module's contract in plain torch ops, for tests.

Nothing here imports torch or builds anything at import time.
"""
