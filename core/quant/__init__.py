"""Weight-only quantization (int8, int4 RTN and GPTQ) and the calibration data it needs."""
