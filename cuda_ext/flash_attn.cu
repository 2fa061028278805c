// glm's fused attention: a FlashAttention-2 style forward and backward on tensor cores (mma.sync
// m16n8k16, fp16/bf16 inputs, fp32 accumulation), for head dims 64 and 128, any sequence lengths,
// causal (bottom-right aligned) or not, grouped-query K/V read in place. FlashAttention-2's structure:
// the forward keeps each warp's Q slice in registers and double-buffers K/V tiles through cp.async;
// the causal backward pairs heavy and light key blocks so that every block does the same work.
// Design, budgets and version log: NOTES.md. No GPU has timed any of it yet.
//
// Notation used in the comments: Br query rows and Bc key rows per tile, D the head dim, g = lane / 4
// and t = lane % 4 (the "group" and "thread in group" of the PTX fragment layouts). An m16n8k16 C
// fragment holds, per thread, c0 c1 at (row g, cols 2t, 2t+1) and c2 c3 at (row g + 8, same cols).
// An A fragment (16x16, row-major) holds four 32-bit pairs: (g, 2t), (g + 8, 2t), (g, 2t + 8),
// (g + 8, 2t + 8). A B fragment (16x8, "col") holds (k 2t..2t+1, n g) and (k 2t+8..2t+9, n g).
// So two C tiles side by side (n 0..15) are exactly one A fragment of the next product: the
// probabilities never leave registers between QK^T and PV.
//
// Shared-memory rows are padded by 8 elements (16 bytes): the eight 16-byte rows one ldmatrix phase
// reads then fall into eight different groups of four banks.

#include "flash_attn.h"

#ifdef GLM_FLASH_EMULATE
// Host emulation of the CUDA built-ins and PTX instructions used below (tests run the kernels on the
// CPU through it; see flash_emulate.h). Not part of any real build.
#include "flash_emulate.h"
#define GLM_DYNAMIC_SMEM(name) unsigned char* name = emu::dynamic_smem()
#define GLM_LAUNCH(kernel, grid, block, smem, stream, params) emu::launch(kernel, grid, block, smem, params)
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define GLM_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#define GLM_LAUNCH(kernel, grid, block, smem, stream, params) kernel<<<grid, block, smem, stream>>>(params)
#endif

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace glm_flash {
namespace {

constexpr float kLog2e = 1.4426950408889634f;

// ------------------------------------------------------------------------------------------------
// Element traits: packing two fp32 into one 32-bit register of two 16-bit values (low half = first
// argument = lower column), unpacking, and the tensor-core instruction for the type.

template <typename T>
struct Elem;

template <>
struct Elem<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    uint32_t x;
    memcpy(&x, &h, sizeof(x));
    return x;
  }
  static __device__ __forceinline__ float2 unpack(uint32_t x) {
    __half2 h;
    memcpy(&h, &x, sizeof(x));
    return __half22float2(h);
  }
  // d += a * b
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
#ifdef GLM_FLASH_EMULATE
    emu::mma_m16n8k16(d, a, b0, b1, emu::kFloat16);
#else
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
  }
};

template <>
struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    uint32_t x;
    memcpy(&x, &h, sizeof(x));
    return x;
  }
  static __device__ __forceinline__ float2 unpack(uint32_t x) {
    __nv_bfloat162 h;
    memcpy(&h, &x, sizeof(x));
    return __bfloat1622float2(h);
  }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
#ifdef GLM_FLASH_EMULATE
    emu::mma_m16n8k16(d, a, b0, b1, emu::kBFloat16);
#else
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
  }
};

// ------------------------------------------------------------------------------------------------
// Asynchronous copies and ldmatrix. Every asm touching shared memory is volatile and clobbers
// "memory" so that the compiler never moves ordinary shared-memory accesses across it; mma (registers
// only, above) is left free to be scheduled.

#ifndef GLM_FLASH_EMULATE
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared; when !valid nothing is read and the destination is zero-filled.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p))
               : "memory");
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p))
               : "memory");
}

// Every store to global memory goes through here: a plain store on the GPU; under the CPU emulation
// it is checked for races with the other blocks of the launch (flash_emulate.h).
template <typename V>
__device__ __forceinline__ void store_global(V* p, const V& v) {
  *p = v;
}
#endif  // GLM_FLASH_EMULATE

// ldmatrix .x4: lanes 8i..8i+7 give the row addresses of 8x8 matrix i, and register i of every lane
// receives matrix i's fragment: (row lane/4, cols 2(lane%4), +1), or with .trans the transpose,
// (rows 2(lane%4), +1 at col lane/4). The four loaders below place the matrices so that the
// registers come out in mma order. `s` is a row-major shared tile with `ld` elements per row.

// A fragment of the 16x16 block A[m][k] = s[m0 + m][k0 + k].
template <typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* s, int ld, int m0, int k0) {
  const int lane = threadIdx.x % 32, r = lane % 8, i = lane / 8;
  ldsm_x4(a, s + (m0 + r + (i & 1) * 8) * ld + k0 + (i >> 1) * 8);
}

// A fragment of A[m][k] = s[k0 + k][m0 + m] (the tile is stored transposed).
template <typename T>
__device__ __forceinline__ void load_a_trans(uint32_t (&a)[4], const T* s, int ld, int m0, int k0) {
  const int lane = threadIdx.x % 32, r = lane % 8, i = lane / 8;
  ldsm_x4_trans(a, s + (k0 + r + (i >> 1) * 8) * ld + m0 + (i & 1) * 8);
}

// B fragments of two n8 tiles, B[k][n] = s[n0 + n][k0 + k] (the tile holds B's columns as rows, like
// K in Q K^T). b[0], b[1]: tile n0; b[2], b[3]: tile n0 + 8.
template <typename T>
__device__ __forceinline__ void load_b_nk(uint32_t (&b)[4], const T* s, int ld, int n0, int k0) {
  const int lane = threadIdx.x % 32, r = lane % 8, i = lane / 8;
  ldsm_x4(b, s + (n0 + r + (i >> 1) * 8) * ld + k0 + (i & 1) * 8);
}

// B fragments of two n8 tiles, B[k][n] = s[k0 + k][n0 + n] (row-major, like V in P V).
template <typename T>
__device__ __forceinline__ void load_b_kn(uint32_t (&b)[4], const T* s, int ld, int k0, int n0) {
  const int lane = threadIdx.x % 32, r = lane % 8, i = lane / 8;
  ldsm_x4_trans(b, s + (k0 + r + (i & 1) * 8) * ld + n0 + (i >> 1) * 8);
}

// Copies rows [row0, row0 + ROWS) of a (rows, D) global matrix into a padded shared tile; rows at or
// past `limit` become zeros. Consecutive threads take consecutive 16-byte chunks of a row (coalesced).
template <typename T, int ROWS, int D, int NTHREADS>
__device__ __forceinline__ void load_tile(T* s, const T* g, int64_t row_stride, int row0, int limit) {
  constexpr int kChunksPerRow = D / 8;
  constexpr int kChunks = ROWS * kChunksPerRow;
#pragma unroll
  for (int c = threadIdx.x; c < kChunks; c += NTHREADS) {
    const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
    const int row = row0 + r;
    const bool valid = row < limit;
    const T* src = valid ? g + row * row_stride + col : g;
    cp_async16(s + r * (D + 8) + col, src, valid);
  }
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

template <typename T>
__device__ __forceinline__ const T* head_ptr(const TensorRef& r, int b, int h) {
  return static_cast<const T*>(r.ptr) + b * r.batch_stride + h * r.head_stride;
}

template <typename T>
__device__ __forceinline__ T* head_ptr_mut(const TensorRef& r, int b, int h) {
  return static_cast<T*>(r.ptr) + b * r.batch_stride + h * r.head_stride;
}

// ------------------------------------------------------------------------------------------------
// Forward. Block = NWARPS warps of 16 query rows each (Br = 16 * NWARPS) of one (batch, head). A warp
// loads its Q fragments from shared memory once and keeps them in registers for the whole key loop,
// together with its rows' O accumulator, running max and running sum; shared memory then only holds
// K and V (and the Q tile again at the very end, to stage O for coalesced stores).
//
// K and V are double-buffered: two stages of (Bc, D) each. While tile j is multiplied out of stage
// j % 2, cp.async fills stage (j + 1) % 2 with tile j + 1, so the loads overlap QK^T, the softmax
// and PV of tile j. Copy groups, oldest first, with what each wait_group N (= "all but the newest N
// groups have landed") guarantees:
//   prologue:        [Q, K(0)] [V(0)]                          wait 1 -> Q, K(0)
//   top of tile j:   ... [K(j)] [V(j)]                         wait 1 -> K(j)        (j > 0)
//   after issuing:   ... [V(j)] [K(j+1)] [V(j+1)]              wait 2 -> V(j), before PV
// Two barriers per tile: the one at the top makes K(j) visible to every warp and proves every warp
// has finished PV(j - 1), the last reader of the stage about to be refilled; the one before PV makes
// V(j) visible. A group is committed even when there is no next tile, so the counts never change.

// 2^x in one MUFU instruction (ex2.approx.ftz: about 2 ulp; 2^-inf = +0).
__device__ __forceinline__ float fast_exp2(float x) {
#ifdef GLM_FLASH_EMULATE
  return exp2f(x);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
#endif
}

template <typename T, int D, int NWARPS, int BC>
__global__ void __launch_bounds__(NWARPS * 32) flash_fwd_kernel(const FwdParams p) {
  constexpr int BR = 16 * NWARPS, NT = NWARPS * 32, LDS = D + 8, kStage = BC * LDS;
  static_assert(D % 32 == 0 && BC % 16 == 0, "tile shape");
  GLM_DYNAMIC_SMEM(smem);
  T* sQ = reinterpret_cast<T*>(smem);  // (BR, LDS): Q until it is in registers; stages O at the end
  T* sK = sQ + BR * LDS;                // 2 stages of (BC, LDS)
  T* sV = sK + 2 * kStage;              // 2 stages of (BC, LDS)

  const int qb = gridDim.x - 1 - blockIdx.x;  // the longest causal rows start first
  const int h = blockIdx.y, b = blockIdx.z;
  const int kvh = h / (p.heads / p.kv_heads);
  const int q0 = qb * BR;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int wrow = warp * 16;         // this warp's first row within the block
  const int off = p.seq_k - p.seq_q;  // causal: query row i sees key j iff j <= i + off
  const float sl2 = p.scale * kLog2e;

  const T* qg = head_ptr<T>(p.q, b, h);
  const T* kg = head_ptr<T>(p.k, b, kvh);
  const T* vg = head_ptr<T>(p.v, b, kvh);
  T* og = head_ptr_mut<T>(p.o, b, h);

  int n_blocks = (p.seq_k + BC - 1) / BC;
  if (p.causal) {
    const int last_col = min(q0 + BR, p.seq_q) - 1 + off;  // the furthest key any row here sees
    n_blocks = last_col < 0 ? 0 : min(n_blocks, last_col / BC + 1);
  }

  float o[D / 8][4];
  float m[2], l[2];  // running max of the raw scores and this thread's part of the running sum of
                     // exp, for rows g and g + 8
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  m[0] = m[1] = -INFINITY;
  l[0] = l[1] = 0.f;
  uint32_t qf[D / 16][4];  // this warp's 16 x D slice of Q as A fragments, for the whole kernel

  if (n_blocks > 0) {
    load_tile<T, BR, D, NT>(sQ, qg, p.q.seq_stride, q0, p.seq_q);
    load_tile<T, BC, D, NT>(sK, kg, p.k.seq_stride, 0, p.seq_k);
    cp_async_commit();
    load_tile<T, BC, D, NT>(sV, vg, p.v.seq_stride, 0, p.seq_k);
    cp_async_commit();
    cp_async_wait<1>();  // Q and K(0) have landed
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) load_a(qf[kk], sQ, LDS, wrow, kk * 16);
#ifdef GLM_FLASH_EMULATE
    // Emulation only: from here Q lives in registers, so its shared tile is poisoned (NaN) until the
    // output is staged there; a read of Q from shared memory inside the loop would show in the result.
    emu::poison_smem_after_barrier(sQ, BR * LDS * sizeof(T));
#endif
  }

  for (int j = 0; j < n_blocks; ++j) {
    const int kv0 = j * BC;
    const T* sKj = sK + (j & 1) * kStage;
    const T* sVj = sV + (j & 1) * kStage;
    if (j > 0) {
      cp_async_wait<1>();  // K(j) has landed; V(j) may still be in flight
      __syncthreads();     // ... for every thread's copies; and no warp still reads stage (j + 1) % 2
    }
    T* sKn = sK + ((j + 1) & 1) * kStage;  // the stage tile j + 1 goes to
    T* sVn = sV + ((j + 1) & 1) * kStage;
    if (j + 1 < n_blocks) load_tile<T, BC, D, NT>(sKn, kg, p.k.seq_stride, kv0 + BC, p.seq_k);
    cp_async_commit();
    if (j + 1 < n_blocks) load_tile<T, BC, D, NT>(sVn, vg, p.v.seq_stride, kv0 + BC, p.seq_k);
    cp_async_commit();

    // S = Q K^T for this warp's rows and the tile's BC keys, Q from registers.
    float s[BC / 8][4];
#pragma unroll
    for (int i = 0; i < BC / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int np = 0; np < BC / 16; ++np) {
        uint32_t bk[4];
        load_b_nk(bk, sKj, LDS, np * 16, kk * 16);
        Elem<T>::mma(s[2 * np], qf[kk], bk[0], bk[1]);
        Elem<T>::mma(s[2 * np + 1], qf[kk], bk[2], bk[3]);
      }
    }

    // Mask keys past the end and, when causal, past the diagonal.
    const bool need_mask = kv0 + BC > p.seq_k || (p.causal && kv0 + BC - 1 > q0 + off);
    if (need_mask) {
#pragma unroll
      for (int nt = 0; nt < BC / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = q0 + wrow + g + (e >> 1) * 8;
          const int col = kv0 + nt * 8 + 2 * t + (e & 1);
          if (col >= p.seq_k || (p.causal && col > row + off)) s[nt][e] = -INFINITY;
        }
      }
    }

    // Online softmax: new row max, rescale what was accumulated, exponentiate (base 2, scale folded).
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = m[r];
#pragma unroll
      for (int nt = 0; nt < BC / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
      mx = quad_max(mx);
      const float base = mx == -INFINITY ? 0.f : mx * sl2;  // a row with no key yet stays at zero
      const float alpha = fast_exp2(m[r] * sl2 - base);
      m[r] = mx;
      l[r] *= alpha;
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) {
        o[dn][2 * r] *= alpha;
        o[dn][2 * r + 1] *= alpha;
      }
#pragma unroll
      for (int nt = 0; nt < BC / 8; ++nt) {
        s[nt][2 * r] = fast_exp2(s[nt][2 * r] * sl2 - base);
        s[nt][2 * r + 1] = fast_exp2(s[nt][2 * r + 1] * sl2 - base);
        l[r] += s[nt][2 * r] + s[nt][2 * r + 1];
      }
    }

    cp_async_wait<2>();  // V(j) has landed; K(j + 1) and V(j + 1) may still be in flight
    __syncthreads();

    // O += P V: the C fragments of P, two n8 tiles at a time, are the A fragments of this product.
#pragma unroll
    for (int kk = 0; kk < BC / 16; ++kk) {
      uint32_t a[4];
      a[0] = Elem<T>::pack(s[2 * kk][0], s[2 * kk][1]);
      a[1] = Elem<T>::pack(s[2 * kk][2], s[2 * kk][3]);
      a[2] = Elem<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = Elem<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t bv[4];
        load_b_kn(bv, sVj, LDS, kk * 16, dp * 16);
        Elem<T>::mma(o[2 * dp], a, bv[0], bv[1]);
        Elem<T>::mma(o[2 * dp + 1], a, bv[2], bv[3]);
      }
    }
  }
  cp_async_wait<0>();  // only empty groups can remain; nothing may be in flight at exit
  __syncthreads();     // every warp is past its last read of the loop before sQ is rewritten

  // Normalize, stage O in shared memory, write it with 16-byte coalesced stores; write the LSE.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float sum = quad_sum(l[r]);
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    const int row_local = wrow + g + r * 8;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      *reinterpret_cast<uint32_t*>(sQ + row_local * LDS + dn * 8 + 2 * t) =
          Elem<T>::pack(o[dn][2 * r] * inv, o[dn][2 * r + 1] * inv);
    }
    const int row = q0 + row_local;
    if (t == 0 && row < p.seq_q) {
      store_global(p.lse + (static_cast<int64_t>(b) * p.heads + h) * p.seq_q + row,
                   sum > 0.f ? m[r] * p.scale + logf(sum) : -INFINITY);
    }
  }
  __syncthreads();
  constexpr int kChunksPerRow = D / 8;
#pragma unroll
  for (int c = threadIdx.x; c < BR * kChunksPerRow; c += NT) {
    const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
    const int row = q0 + r;
    if (row < p.seq_q) {
      store_global(reinterpret_cast<uint4*>(og + row * p.o.seq_stride + col),
                   *reinterpret_cast<const uint4*>(sQ + r * LDS + col));
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Backward, part 1: delta = rowsum(dO * O) in fp32, one warp per query row.

template <typename T, int D>
__global__ void __launch_bounds__(256) flash_bwd_delta_kernel(const BwdParams p) {
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads * p.seq_q;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 8 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const int i = static_cast<int>(row % p.seq_q);
  const int64_t bh = row / p.seq_q;
  const int h = static_cast<int>(bh % p.heads), b = static_cast<int>(bh / p.heads);
  const T* o = head_ptr<T>(p.o, b, h) + i * p.o.seq_stride;
  const T* d = head_ptr<T>(p.dout, b, h) + i * p.dout.seq_stride;
  float acc = 0.f;
#pragma unroll
  for (int c = 2 * lane; c < D; c += 64) {
    const float2 x = Elem<T>::unpack(*reinterpret_cast<const uint32_t*>(o + c));
    const float2 y = Elem<T>::unpack(*reinterpret_cast<const uint32_t*>(d + c));
    acc += x.x * y.x + x.y * y.y;
  }
#pragma unroll
  for (int w = 16; w > 0; w /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, w);
  if (lane == 0) store_global(p.delta + row, acc);
}

// Backward, part 2. A key block = Bc = 16 * NWARPS key rows of one (batch, kv head), one per warp-16;
// each warp accumulates its rows' dK and dV in registers over every query head of the group (GQA
// needs no atomics and no repeated K/V) and every query tile of Br rows. A block does one key block,
// or two when causal (see flash_bwd_kernel). Per query tile:
//   S^T = K Q^T, P^T = exp(scale S^T - lse), dP^T = V dO^T, dS^T = P^T (dP^T - delta)
//   dV += P^T dO, dK += dS^T Q (scaled at the end), dQ += scale dS K (fp32 atomics into dq_accum).
// Working on the transposes keeps P^T and dS^T in registers as A fragments of the dV and dK products;
// dS^T also goes through shared memory for the dQ product, which every warp shares.

// One key block: loads its K and V, walks every query tile of every query head of the kv head, writes
// its dK and dV and adds its share of dQ. kSecond picks the block's second (causal) key block; a
// template flag rather than an argument so that kb is recomputed from blockIdx and the parameters
// instead of occupying a register in a kernel that sits at ptxas' 255-register limit at D=128.
template <typename T, int D, int NWARPS, int BR, bool kSecond>
__device__ __forceinline__ void bwd_key_block(const BwdParams& p, unsigned char* smem) {
  constexpr int BC = 16 * NWARPS, NT = NWARPS * 32, LDS = D + 8, LDSS = BR + 8;
  static_assert(D % 32 == 0 && BR % 16 == 0, "tile shape");
  T* sK = reinterpret_cast<T*>(smem);  // (BC, LDS)
  T* sV = sK + BC * LDS;                // (BC, LDS)
  T* sQ = sV + BC * LDS;                // (BR, LDS)
  T* sdO = sQ + BR * LDS;               // (BR, LDS)
  T* sdS = sdO + BR * LDS;              // (BC, LDSS): dS^T, key rows by query columns
  float* sLse = reinterpret_cast<float*>(sdS + BC * LDSS);  // (BR) lse * log2(e), +inf = no key
  float* sDelta = sLse + BR;                                 // (BR)

  const int kvh = blockIdx.y, b = blockIdx.z;
  const int group = p.heads / p.kv_heads;
  const int kb =
      kSecond ? (p.seq_k + BC - 1) / BC - 1 - static_cast<int>(blockIdx.x) : static_cast<int>(blockIdx.x);
  const int kv0 = kb * BC;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int off = p.seq_k - p.seq_q;
  const float sl2 = p.scale * kLog2e;
  const int n_qblocks = (p.seq_q + BR - 1) / BR;

  load_tile<T, BC, D, NT>(sK, head_ptr<T>(p.k, b, kvh), p.k.seq_stride, kv0, p.seq_k);
  load_tile<T, BC, D, NT>(sV, head_ptr<T>(p.v, b, kvh), p.v.seq_stride, kv0, p.seq_k);
  cp_async_commit();  // waited for with the first query tile

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) {
    dk[i][0] = dk[i][1] = dk[i][2] = dk[i][3] = 0.f;
    dv[i][0] = dv[i][1] = dv[i][2] = dv[i][3] = 0.f;
  }

  // Causal: rows before kv0 - off see none of these keys.
  const int first_qblock = p.causal ? max(0, kv0 - off) / BR : 0;

  for (int hi = 0; hi < group; ++hi) {
    const int h = kvh * group + hi;
    const T* qg = head_ptr<T>(p.q, b, h);
    const T* dog = head_ptr<T>(p.dout, b, h);
    const int64_t row_base = (static_cast<int64_t>(b) * p.heads + h) * p.seq_q;
    const float* lseg = p.lse + row_base;
    const float* deltag = p.delta + row_base;
    float* dqg = p.dq_accum + row_base * D;

    for (int qb = first_qblock; qb < n_qblocks; ++qb) {
      const int q0 = qb * BR;
      __syncthreads();  // the previous tile is done with sQ, sdO, sdS, sLse, sDelta
      load_tile<T, BR, D, NT>(sQ, qg, p.q.seq_stride, q0, p.seq_q);
      load_tile<T, BR, D, NT>(sdO, dog, p.dout.seq_stride, q0, p.seq_q);
      cp_async_commit();
      for (int i = threadIdx.x; i < BR; i += NT) {
        const int row = q0 + i;
        const float lse = row < p.seq_q ? lseg[row] : INFINITY;
        // lse = -inf marks a row that saw no key (its output is 0): +inf makes its P exactly 0.
        sLse[i] = lse == -INFINITY ? INFINITY : lse * kLog2e;
        sDelta[i] = row < p.seq_q ? deltag[row] : 0.f;
      }
      cp_async_wait<0>();
      __syncthreads();

      // S^T = K Q^T and dP^T = V dO^T for this warp's 16 key rows and the tile's BR query columns.
      float st[BR / 8][4], dpt[BR / 8][4];
#pragma unroll
      for (int i = 0; i < BR / 8; ++i) {
        st[i][0] = st[i][1] = st[i][2] = st[i][3] = 0.f;
        dpt[i][0] = dpt[i][1] = dpt[i][2] = dpt[i][3] = 0.f;
      }
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t ak[4], av[4];
        load_a(ak, sK, LDS, warp * 16, kk * 16);
        load_a(av, sV, LDS, warp * 16, kk * 16);
#pragma unroll
        for (int np = 0; np < BR / 16; ++np) {
          uint32_t bq[4], bo[4];
          load_b_nk(bq, sQ, LDS, np * 16, kk * 16);
          load_b_nk(bo, sdO, LDS, np * 16, kk * 16);
          Elem<T>::mma(st[2 * np], ak, bq[0], bq[1]);
          Elem<T>::mma(st[2 * np + 1], ak, bq[2], bq[3]);
          Elem<T>::mma(dpt[2 * np], av, bo[0], bo[1]);
          Elem<T>::mma(dpt[2 * np + 1], av, bo[2], bo[3]);
        }
      }

      // P^T from the saved LSE (masked entries exactly 0), then dS^T in place of dP^T.
      const bool need_mask = kv0 + BC > p.seq_k || (p.causal && kv0 + BC - 1 > q0 + off);
#pragma unroll
      for (int nt = 0; nt < BR / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int ql = nt * 8 + 2 * t + (e & 1);
          const int kvi = kv0 + warp * 16 + g + (e >> 1) * 8;
          float pv = fast_exp2(st[nt][e] * sl2 - sLse[ql]);
          if (need_mask && (kvi >= p.seq_k || (p.causal && kvi > q0 + ql + off))) pv = 0.f;
          st[nt][e] = pv;
          dpt[nt][e] = pv * (dpt[nt][e] - sDelta[ql]);
        }
      }

      // dV += P^T dO and dK += dS^T Q; the k dimension is the tile's query rows.
#pragma unroll
      for (int kk = 0; kk < BR / 16; ++kk) {
        uint32_t ap[4], ads[4];
        ap[0] = Elem<T>::pack(st[2 * kk][0], st[2 * kk][1]);
        ap[1] = Elem<T>::pack(st[2 * kk][2], st[2 * kk][3]);
        ap[2] = Elem<T>::pack(st[2 * kk + 1][0], st[2 * kk + 1][1]);
        ap[3] = Elem<T>::pack(st[2 * kk + 1][2], st[2 * kk + 1][3]);
        ads[0] = Elem<T>::pack(dpt[2 * kk][0], dpt[2 * kk][1]);
        ads[1] = Elem<T>::pack(dpt[2 * kk][2], dpt[2 * kk][3]);
        ads[2] = Elem<T>::pack(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]);
        ads[3] = Elem<T>::pack(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3]);
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          uint32_t bo[4], bq[4];
          load_b_kn(bo, sdO, LDS, kk * 16, dp * 16);
          load_b_kn(bq, sQ, LDS, kk * 16, dp * 16);
          Elem<T>::mma(dv[2 * dp], ap, bo[0], bo[1]);
          Elem<T>::mma(dv[2 * dp + 1], ap, bo[2], bo[3]);
          Elem<T>::mma(dk[2 * dp], ads, bq[0], bq[1]);
          Elem<T>::mma(dk[2 * dp + 1], ads, bq[2], bq[3]);
        }
      }

      // dS^T to shared memory for the dQ product.
#pragma unroll
      for (int nt = 0; nt < BR / 8; ++nt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          *reinterpret_cast<uint32_t*>(sdS + (warp * 16 + g + r * 8) * LDSS + nt * 8 + 2 * t) =
              Elem<T>::pack(dpt[nt][2 * r], dpt[nt][2 * r + 1]);
        }
      }
      __syncthreads();

      // dQ (BR x D) += scale * dS (BR x BC) K (BC x D), in 16x32 pieces spread over the warps.
      constexpr int kDChunks = D / 32;
      for (int w = warp; w < (BR / 16) * kDChunks; w += NWARPS) {
        const int mt = w / kDChunks, dc = w % kDChunks;
        float acc[4][4];
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < BC / 16; ++kk) {
          uint32_t a[4], b0[4], b1[4];
          load_a_trans(a, sdS, LDSS, mt * 16, kk * 16);
          load_b_kn(b0, sK, LDS, kk * 16, dc * 32);
          load_b_kn(b1, sK, LDS, kk * 16, dc * 32 + 16);
          Elem<T>::mma(acc[0], a, b0[0], b0[1]);
          Elem<T>::mma(acc[1], a, b0[2], b0[3]);
          Elem<T>::mma(acc[2], a, b1[0], b1[1]);
          Elem<T>::mma(acc[3], a, b1[2], b1[3]);
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int row = q0 + mt * 16 + g + r * 8;
          if (row < p.seq_q) {
            float* dst = dqg + static_cast<int64_t>(row) * D + dc * 32 + 2 * t;
#pragma unroll
            for (int n = 0; n < 4; ++n) {
              atomicAdd(dst + n * 8, acc[n][2 * r] * p.scale);
              atomicAdd(dst + n * 8 + 1, acc[n][2 * r + 1] * p.scale);
            }
          }
        }
      }
    }
  }
  cp_async_wait<0>();  // nothing may stay in flight (a block with no query tile never waited)

  // dK = scale * sum dS^T Q, dV = sum P^T dO, each key row written exactly once.
  T* dkg = head_ptr_mut<T>(p.dk, b, kvh);
  T* dvg = head_ptr_mut<T>(p.dv, b, kvh);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int kvi = kv0 + warp * 16 + g + r * 8;
    if (kvi < p.seq_k) {
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) {
        const int col = dn * 8 + 2 * t;
        store_global(reinterpret_cast<uint32_t*>(dkg + kvi * p.dk.seq_stride + col),
                     Elem<T>::pack(dk[dn][2 * r] * p.scale, dk[dn][2 * r + 1] * p.scale));
        store_global(reinterpret_cast<uint32_t*>(dvg + kvi * p.dv.seq_stride + col),
                     Elem<T>::pack(dv[dn][2 * r], dv[dn][2 * r + 1]));
      }
    }
  }
}

// Work balance. Causal, key block kb meets about n_qblocks - kb * Bc / Br query tiles: the first key
// block of a head does all of them, the last one almost none, so one key block per block would leave
// the SMs that drew the light blocks idle while the heavy ones finish. A causal block x therefore
// takes two key blocks, x and n_kblocks - 1 - x (the middle one alone when their count is odd): the
// pair's tiles add up to about n_qblocks + 1 for every x. Non-causal, every key block meets every
// query tile: one key block per block. The grid's x size is bwd_grid_x.
__host__ __device__ inline int bwd_grid_x(int n_kblocks, bool causal) {
  return causal ? (n_kblocks + 1) / 2 : n_kblocks;
}

template <typename T, int D, int NWARPS, int BR>
__global__ void __launch_bounds__(NWARPS * 32) flash_bwd_kernel(const BwdParams p) {
  constexpr int BC = 16 * NWARPS;
  GLM_DYNAMIC_SMEM(smem);
  const int n_kblocks = (p.seq_k + BC - 1) / BC;
  const int first = blockIdx.x, second = n_kblocks - 1 - first;
  bwd_key_block<T, D, NWARPS, BR, false>(p, smem);
  if (p.causal && second != first) {
    __syncthreads();  // every warp is done with the first key block's sK (the dQ product reads all of it)
    bwd_key_block<T, D, NWARPS, BR, true>(p, smem);
  }
}

// ------------------------------------------------------------------------------------------------
// Launchers and tile choices (see NOTES.md for the register and shared-memory budget of each). All
// use mma.sync, which Hopper still runs; wgmma/TMA would be the next step there.

template <typename T, int D, int NWARPS, int BC>
cudaError_t launch_fwd(const FwdParams& p, cudaStream_t stream) {
  constexpr int BR = 16 * NWARPS;
  const size_t smem = static_cast<size_t>(BR + 4 * BC) * (D + 8) * sizeof(T);  // Q + two stages of K and V
  auto kernel = flash_fwd_kernel<T, D, NWARPS, BC>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const dim3 grid((p.seq_q + BR - 1) / BR, p.heads, p.batch);
  GLM_LAUNCH(kernel, grid, NWARPS * 32, smem, stream, p);
  return cudaGetLastError();
}

template <typename T, int D, int NWARPS, int BR>
cudaError_t launch_bwd(const BwdParams& p, cudaStream_t stream) {
  constexpr int BC = 16 * NWARPS;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads * p.seq_q;
  cudaError_t err = cudaSuccess;
  if (rows > 0) {
    auto delta_kernel = flash_bwd_delta_kernel<T, D>;
    GLM_LAUNCH(delta_kernel, static_cast<unsigned>((rows + 7) / 8), 256, 0, stream, p);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  const size_t smem = static_cast<size_t>(2 * BC + 2 * BR) * (D + 8) * sizeof(T) +
                      static_cast<size_t>(BC) * (BR + 8) * sizeof(T) + 2 * BR * sizeof(float);
  auto kernel = flash_bwd_kernel<T, D, NWARPS, BR>;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const dim3 grid(bwd_grid_x((p.seq_k + BC - 1) / BC, p.causal), p.kv_heads, p.batch);
  GLM_LAUNCH(kernel, grid, NWARPS * 32, smem, stream, p);
  return cudaGetLastError();
}

cudaError_t device_major(int* major) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  return cudaDeviceGetAttribute(major, cudaDevAttrComputeCapabilityMajor, device);
}

// Hopper's tiles on sm_90+, Ampere's below; GLM_FLASH_TILES=sm80|sm90 forces one (to measure one
// against the other on the same GPU).
cudaError_t use_hopper_tiles(bool* hopper) {
  const char* forced = std::getenv("GLM_FLASH_TILES");
  if (forced != nullptr && std::strcmp(forced, "sm80") == 0) {
    *hopper = false;
    return cudaSuccess;
  }
  if (forced != nullptr && std::strcmp(forced, "sm90") == 0) {
    *hopper = true;
    return cudaSuccess;
  }
  int major = 0;
  const cudaError_t err = device_major(&major);
  *hopper = major >= 9;
  return err;
}

template <typename T>
cudaError_t fwd_for_type(const FwdParams& p, cudaStream_t stream) {
  bool hopper = false;
  const cudaError_t err = use_hopper_tiles(&hopper);
  if (err != cudaSuccess) return err;
  // <T, D, warps, Bc>, 16 query rows per warp, Q in registers, K/V double-buffered (shared memory
  // (Br + 4 Bc)(D + 8) elements). Chosen for resident warps per SM (NOTES.md has the arithmetic):
  // D=64, 4 warps, Bc 64 on both (45 KB, 130 registers: 3 blocks = 12 warps per SM). D=128: Ampere
  // 4 warps, Bc 32 (52 KB and 163 registers: 3 blocks per A100 SM; Bc 64 would take 85 KB, 1 block);
  // Hopper 8 warps, Bc 64 (102 KB, one block of 8 warps by registers, the same 8 warps per SM as two
  // 4-warp blocks, with each K/V tile brought into shared memory serving 128 query rows, not 64).
  if (p.head_dim == 64) return launch_fwd<T, 64, 4, 64>(p, stream);
  if (p.head_dim == 128) {
    return hopper ? launch_fwd<T, 128, 8, 64>(p, stream) : launch_fwd<T, 128, 4, 32>(p, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t bwd_for_type(const BwdParams& p, cudaStream_t stream) {
  bool hopper = false;
  const cudaError_t err = use_hopper_tiles(&hopper);
  if (err != cudaSuccess) return err;
  if (p.head_dim == 64) {
    return hopper ? launch_bwd<T, 64, 8, 64>(p, stream) : launch_bwd<T, 64, 4, 64>(p, stream);
  }
  // D=128: 4 warps on both. The 8-warp block (Bc 128) sits at ptxas' 255-register limit once the causal
  // key-block pairing is in, and spills 12 bytes on sm_90; 4 warps (2 blocks per SM, the same 8
  // resident warps) spill nothing there (NOTES.md, ptxas table).
  if (p.head_dim == 128) return launch_bwd<T, 128, 4, 32>(p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t flash_fwd(const FwdParams& params, DType dtype, cudaStream_t stream) {
  if (params.seq_q == 0 || params.batch == 0 || params.heads == 0) return cudaSuccess;
  return dtype == DType::kBFloat16 ? fwd_for_type<__nv_bfloat16>(params, stream)
                                   : fwd_for_type<__half>(params, stream);
}

cudaError_t flash_bwd(const BwdParams& params, DType dtype, cudaStream_t stream) {
  if (params.batch == 0 || params.heads == 0 || params.seq_k == 0) return cudaSuccess;
  return dtype == DType::kBFloat16 ? bwd_for_type<__nv_bfloat16>(params, stream)
                                   : bwd_for_type<__half>(params, stream);
}

}  // namespace glm_flash
