"""glm's native CPU kernels: weight-only int8/int4 matrix-vector products and a whole decode step, and the
data kernels dedup runs on.

- `decode.cpp`: the decode kernels (AVX2 + FMA, OpenMP), a plain C ABI without torch headers, and
  `decode.py`, their typed face (tensors in, tensors out; `core/quant/native.py` decides when they run).
- `data.cpp`: dedup's byte kernels (lowercase-and-collapse, word shingle hashes, MinHash), and `data.py`,
  their typed face: numpy arrays in, arrays out, None where the library does not run.
- `build.py`: compiles it with the system C++ compiler into a cache directory, once per source and
  compiler; `python -m glm_cli.cpu_ext.build` does it ahead of time.
- `loader.py`: `load_cpu_kernels()` / `load_data_kernels()` -> the loaded library (ctypes), or None where
  it cannot run here.

Importing the package imports neither torch nor builds anything; `decode.py` imports torch when imported.
"""
