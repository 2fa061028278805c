// C entry points for running flash_attn.cu's kernels under the host emulation (flash_emulate.h), for
// tests/test_cuda_ext.py through ctypes. Built only by build.build_emulator(); never part of the
// CUDA extension.
#include "flash_attn.h"

#if !defined(GLM_EMU_UCONTEXT)
// The fiber switch of flash_emulate.h (System V x86-64): push the callee-saved registers, save the
// stack pointer, load the other fiber's, pop its registers, return into it.
asm(R"(
    .text
    .globl glm_emu_switch
    .type glm_emu_switch, @function
glm_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size glm_emu_switch, .-glm_emu_switch
)");
#endif

namespace {

glm_flash::TensorRef ref(void* ptr, const int64_t* strides) {
  glm_flash::TensorRef r;
  r.ptr = ptr;
  r.batch_stride = strides[0];
  r.head_stride = strides[1];
  r.seq_stride = strides[2];
  return r;
}

}  // namespace

extern "C" {

// device_major picks the tile configuration (>= 9: Hopper's); copies_at_wait makes cp.async data land
// only at the covering cp.async.wait_group instead of at issue; descending runs the last warp first.
void glm_emu_configure(int device_major, int copies_at_wait, int descending) {
  emu::state().device_major = device_major;
  emu::state().copies_land_at_wait = copies_at_wait != 0;
  emu::state().descending = descending != 0;
  emu::state().smem_limit = (device_major >= 9 ? 227 : 163) * 1024;
}

int glm_emu_forward(int bf16, void* q, const int64_t* qs, void* k, const int64_t* ks, void* v,
                    const int64_t* vs, void* o, const int64_t* os, float* lse, int batch, int heads,
                    int kv_heads, int seq_q, int seq_k, int head_dim, float scale, int causal) {
  glm_flash::FwdParams p;
  p.q = ref(q, qs);
  p.k = ref(k, ks);
  p.v = ref(v, vs);
  p.o = ref(o, os);
  p.lse = lse;
  p.batch = batch;
  p.heads = heads;
  p.kv_heads = kv_heads;
  p.seq_q = seq_q;
  p.seq_k = seq_k;
  p.head_dim = head_dim;
  p.scale = scale;
  p.causal = causal != 0;
  return static_cast<int>(glm_flash::flash_fwd(p, bf16 ? glm_flash::DType::kBFloat16 : glm_flash::DType::kFloat16,
                                               nullptr));
}

int glm_emu_backward(int bf16, void* q, const int64_t* qs, void* k, const int64_t* ks, void* v,
                     const int64_t* vs, void* o, const int64_t* os, void* dout, const int64_t* dos,
                     const float* lse, float* delta, float* dq_accum, void* dk, const int64_t* dks, void* dv,
                     const int64_t* dvs, int batch, int heads, int kv_heads, int seq_q, int seq_k,
                     int head_dim, float scale, int causal) {
  glm_flash::BwdParams p;
  p.q = ref(q, qs);
  p.k = ref(k, ks);
  p.v = ref(v, vs);
  p.o = ref(o, os);
  p.dout = ref(dout, dos);
  p.lse = lse;
  p.delta = delta;
  p.dq_accum = dq_accum;
  p.dk = ref(dk, dks);
  p.dv = ref(dv, dvs);
  p.batch = batch;
  p.heads = heads;
  p.kv_heads = kv_heads;
  p.seq_q = seq_q;
  p.seq_k = seq_k;
  p.head_dim = head_dim;
  p.scale = scale;
  p.causal = causal != 0;
  return static_cast<int>(glm_flash::flash_bwd(p, bf16 ? glm_flash::DType::kBFloat16 : glm_flash::DType::kFloat16,
                                               nullptr));
}

// The tensor-core work of each block of the last launch (warp-wide mma.sync instructions, linear block
// index x + gridDim.x * (y + gridDim.y * z)) into out[0..capacity); returns the number of blocks. The
// tests read the backward's balance from it: the kernel's own schedule, counted as it ran.
int glm_emu_last_launch_work(long long* out, int capacity) {
  const auto& work = emu::state().block_mma;
  for (size_t i = 0; i < work.size() && static_cast<int>(i) < capacity; ++i) out[i] = work[i];
  return static_cast<int>(work.size());
}

}  // extern "C"
