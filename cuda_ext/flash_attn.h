// Interface between the CUDA kernels (flash_attn.cu, compiled by nvcc, no torch headers) and the
// PyTorch binding (binding.cpp). Plain pointers and element strides only, so the kernel translation
// unit compiles on its own and the binding owns every tensor check.
#pragma once

#include <cstdint>
#ifdef GLM_FLASH_EMULATE
#include "flash_emulate.h"
#else
#include <cuda_runtime.h>
#endif

namespace glm_flash {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1 };

// Strides are in elements; the last (head-dim) stride is 1 for every tensor. Layout (B, H, T, D).
struct TensorRef {
  void* ptr = nullptr;
  int64_t batch_stride = 0;
  int64_t head_stride = 0;
  int64_t seq_stride = 0;
};

struct FwdParams {
  TensorRef q, k, v;  // q (B, H, Tq, D); k, v (B, Hkv, Tk, D)
  TensorRef o;        // (B, H, Tq, D), written in full
  float* lse = nullptr;  // (B, H, Tq) contiguous fp32, natural log; -inf for a row that sees no key
  int batch = 0, heads = 0, kv_heads = 0, seq_q = 0, seq_k = 0, head_dim = 0;
  float scale = 0.f;  // softmax scale applied to q.k
  bool causal = false;  // bottom-right aligned: query i sees keys j <= i + (Tk - Tq)
};

struct BwdParams {
  TensorRef q, k, v, o, dout;
  const float* lse = nullptr;  // (B, H, Tq) from the forward
  float* delta = nullptr;      // (B, H, Tq) scratch: rowsum(dO * O)
  float* dq_accum = nullptr;   // (B, H, Tq, D) contiguous fp32, zeroed by the caller, scaled result
  TensorRef dk, dv;            // (B, Hkv, Tk, D), written in full (no accumulation across calls)
  int batch = 0, heads = 0, kv_heads = 0, seq_q = 0, seq_k = 0, head_dim = 0;
  float scale = 0.f;
  bool causal = false;
};

// Both return the launch error (cudaSuccess when the kernels were queued). head_dim must be 64 or 128,
// heads a multiple of kv_heads, the device of compute capability 8.0 or newer.
cudaError_t flash_fwd(const FwdParams& params, DType dtype, cudaStream_t stream);
cudaError_t flash_bwd(const BwdParams& params, DType dtype, cudaStream_t stream);

}  // namespace glm_flash
