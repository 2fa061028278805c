// Host emulation of the CUDA built-ins and PTX instructions flash_attn.cu uses, so that the very same
// kernel source runs on a CPU (g++ -DGLM_FLASH_EMULATE -x c++ flash_attn.cu emulate_api.cpp). Used by
// tests/test_cuda_ext.py to execute the kernels without a GPU; never part of the real build.
//
// Every CUDA thread is a fiber of one OS thread, switching only at barriers. Several blocks are
// resident at once (kResidentBlocks, admitted in ascending or descending grid order) and take turns
// fiber by fiber; inside a block the first runnable fiber in a fixed priority order (ascending or
// descending thread index) runs, so one warp runs as far ahead of the others as the program's
// __syncthreads allow. Warp-collective instructions (mma.sync, ldmatrix, shfl) exchange operands
// through per-warp slots between two warp barriers and are computed from the PTX ISA's fragment
// layouts, written here independently of the kernel's index math; every lane must reach the same
// collective (same instruction, same count): a lane that skips one, or a partial shfl mask, fails.
// Shared memory starts as NaN bytes; ldmatrix and cp.async check alignment and shared-memory bounds;
// cp.async copies land either at issue or only at the cp.async.wait that covers them (both orders
// are legal on hardware; the tests run both). Global memory is checked for races between blocks of
// one launch: a word written (store_global) by one block and written, updated (atomicAdd) or read
// (cp.async) by another fails, as does a word both updated atomically and read.
#pragma once

#if !defined(__x86_64__) || defined(GLM_EMU_UCONTEXT)
#define GLM_EMU_UCONTEXT 1
#include <ucontext.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

using std::max;
using std::min;

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct float2 {
  float x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
using cudaStream_t = void*;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrComputeCapabilityMajor = 75 };

// ---- 16-bit float types: storage plus the conversions the kernel calls (round to nearest even).
struct __half {
  uint16_t bits;
};
struct __half2 {
  __half x, y;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

namespace emu {

inline uint16_t f32_to_f16(float f) {
  _Float16 h = static_cast<_Float16>(f);
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}
inline float f16_to_f32(uint16_t b) {
  _Float16 h;
  std::memcpy(&h, &b, 2);
  return static_cast<float>(h);
}
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float bf16_to_f32(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

}  // namespace emu

inline __half2 __floats2half2_rn(float lo, float hi) { return {{emu::f32_to_f16(lo)}, {emu::f32_to_f16(hi)}}; }
inline float2 __half22float2(__half2 h) { return {emu::f16_to_f32(h.x.bits), emu::f16_to_f32(h.y.bits)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {{emu::f32_to_bf16(lo)}, {emu::f32_to_bf16(hi)}};
}
inline float2 __bfloat1622float2(__nv_bfloat162 h) {
  return {emu::bf16_to_f32(h.x.bits), emu::bf16_to_f32(h.y.bits)};
}

namespace emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "flash_emulate: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

enum Kind { kFloat16, kBFloat16 };

struct Barrier {
  int size = 0, arrived = 0;
  long generation = 0;
};

struct Copy {
  void* dst;
  const void* src;
  bool valid;
};

// A fiber's saved execution context. On x86-64 a minimal switch (callee-saved registers and the stack
// pointer, glm_emu_switch in emulate_api.cpp); elsewhere ucontext, which is slower (a system call per
// switch) but portable.
#ifdef GLM_EMU_UCONTEXT
struct Context {
  ucontext_t uc;
};
inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
inline void init_context(Context& c, char* stack, size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#else
}  // namespace emu
extern "C" void glm_emu_switch(void** save_sp, void* load_sp);
namespace emu {
struct Context {
  void* sp = nullptr;
};
inline void switch_context(Context& from, Context& to) { glm_emu_switch(&from.sp, to.sp); }
inline void init_context(Context& c, char* stack, size_t size, void (*entry)()) {
  auto top = reinterpret_cast<uintptr_t>(stack + size) & ~static_cast<uintptr_t>(15);
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;                         // where entry's return address would be (never used)
  *--sp = reinterpret_cast<void*>(entry);  // glm_emu_switch's `ret` lands here
  for (int i = 0; i < 6; ++i) *--sp = nullptr;  // rbp rbx r12 r13 r14 r15
  c.sp = sp;
}
#endif

constexpr size_t kStackBytes = 256 * 1024;
constexpr int kResidentBlocks = 3;

struct Fiber {
  Context ctx;
  std::unique_ptr<char[]> stack;  // uninitialized: only the pages a fiber touches are mapped
  uint3 tid;
  bool done = false;
  unsigned collectives = 0;  // warp-collective instructions executed: picks the slot set
  const Barrier* waiting_on = nullptr;
  long waiting_generation = 0;
  std::vector<Copy> open_group;
  std::deque<std::vector<Copy>> committed;
};

struct Slot {
  uint32_t u[6];
  float f[4];
  const void* ptr;
  int op;             // which warp-wide instruction the lane is at (kOp* below)
  unsigned sequence;  // how many warp-wide instructions the lane executed before this one
};

enum : int { kOpMmaF16 = 1, kOpMmaBF16, kOpLdmatrix, kOpLdmatrixTrans, kOpShfl = 64 };

// Two slot sets used alternately: a lane can only rewrite a set after the next barrier, which every
// lane reaches only once it has read the previous contents, so one barrier per instruction suffices.
struct WarpState {
  Barrier barrier;
  Slot slots[2][32];
};

struct Block {
  uint3 idx;
  int id = 0;  // linear block index
  std::vector<unsigned char> smem;
  std::vector<Fiber> fibers;
  std::vector<WarpState> warps;
  Barrier block_barrier;
  int remaining = 0;  // fibers not finished
};

// Who touched a 4-byte word of global memory in the running launch (block ids; -1 none, -2 several).
struct WordAccess {
  int writer = -1, atomic = -1, reader = -1;
};

struct State {
  // Configuration set by the driver.
  int device_major = 9;
  bool copies_land_at_wait = false;
  bool descending = false;  // last block first and last thread first, instead of the first ones
  size_t smem_limit = 227 * 1024;
  // The running launch.
  dim3 grid, block_dim;
  std::vector<std::unique_ptr<Block>> resident;
  Block* block = nullptr;  // the block of the running fiber
  int current = -1;        // the running fiber's index in it
  Context scheduler;
  std::function<void()> body;
  std::unordered_map<uintptr_t, WordAccess> global;
  std::vector<long long> block_mma;  // warp-wide mma.sync instructions per block of the last launch
  cudaError_t last_error = cudaSuccess;
};

inline State& state() {
  static State s;
  return s;
}

inline Fiber& self() { return state().block->fibers[state().current]; }

inline void yield_until(const Barrier& b, long generation) {
  Fiber& f = self();
  f.waiting_on = &b;
  f.waiting_generation = generation;
  switch_context(f.ctx, state().scheduler);
}

inline void arrive_and_wait(Barrier& b) {
  const long generation = b.generation;
  if (++b.arrived == b.size) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  yield_until(b, generation);
}

inline unsigned char* dynamic_smem() { return state().block->smem.data(); }

[[noreturn]] inline void race(const char* what, const void* p, int a, int b) {
  char msg[256];
  std::snprintf(msg, sizeof msg, "race between blocks %d and %d at global address %p: %s", a, b, p, what);
  fail(msg);
}

// The race checks on global memory (4-byte words; see the header comment).
enum class Access { kStore, kAtomic, kRead };

inline void touch_global(const void* p, size_t bytes, Access kind) {
  State& st = state();
  const int me = st.block->id;
  const uintptr_t first = reinterpret_cast<uintptr_t>(p) & ~uintptr_t{3};
  for (uintptr_t w = first; w < reinterpret_cast<uintptr_t>(p) + bytes; w += 4) {
    WordAccess& a = st.global[w];
    const auto other = [me](int who) { return who != -1 && who != me; };
    if (other(a.writer)) race("a word one block stores to is accessed by another", p, a.writer, me);
    if (kind == Access::kStore) {
      if (other(a.atomic)) race("a plain store to a word another block updates atomically", p, a.atomic, me);
      if (other(a.reader)) race("a store to a word another block reads", p, a.reader, me);
      a.writer = me;
    } else if (kind == Access::kAtomic) {
      if (a.reader != -1) race("an atomic update of a word read in the same launch", p, a.reader, me);
      a.atomic = a.atomic == -1 || a.atomic == me ? me : -2;
    } else {
      if (a.atomic != -1) race("a read of a word updated atomically in the same launch", p, a.atomic, me);
      a.reader = a.reader == -1 || a.reader == me ? me : -2;
    }
  }
}

inline void check_smem(const void* p, size_t bytes, size_t align, const char* what) {
  const auto* c = static_cast<const unsigned char*>(p);
  const auto& smem = state().block->smem;
  if (c < smem.data() || c + bytes > smem.data() + smem.size()) fail(what);
  if (reinterpret_cast<uintptr_t>(c) % align != 0) fail(what);
}

inline void do_copy(const Copy& c) {
  if (c.valid) {
    if (reinterpret_cast<uintptr_t>(c.src) % 16 != 0) fail("cp.async: global source not 16-byte aligned");
    touch_global(c.src, 16, Access::kRead);
    std::memcpy(c.dst, c.src, 16);
  } else {
    std::memset(c.dst, 0, 16);
  }
}

inline void flush_committed(size_t keep) {
  Fiber& f = self();
  while (f.committed.size() > keep) {
    for (const Copy& c : f.committed.front()) do_copy(c);
    f.committed.pop_front();
  }
}

inline WarpState& warp() { return state().block->warps[self().tid.x / 32]; }
inline int lane() { return static_cast<int>(self().tid.x % 32); }

// The slot set of this lane's next warp-wide instruction `op`; records op and the lane's count.
inline Slot* slots(WarpState& w, int op) {
  Fiber& f = self();
  Slot* set = w.slots[f.collectives & 1];
  set[lane()].op = op;
  set[lane()].sequence = f.collectives++;
  return set;
}

// After the warp barrier: every lane must be at the same instruction, as its same occurrence.
inline void check_converged(const Slot* set) {
  if (lane() != 0) return;
  for (int i = 1; i < 32; ++i) {
    if (set[i].op != set[0].op || set[i].sequence != set[0].sequence) {
      char msg[200];
      std::snprintf(msg, sizeof msg,
                    "warp %u: lanes at different warp-wide instructions (lane 0: op %d #%u, lane %d: op %d #%u)",
                    self().tid.x / 32, set[0].op, set[0].sequence, i, set[i].op, set[i].sequence);
      fail(msg);
    }
  }
}

// ---- PTX instructions.

inline void cp_async16(void* dst, const void* src, bool valid) {
  check_smem(dst, 16, 16, "cp.async: shared destination out of bounds or misaligned");
  const Copy c{dst, src, valid};
  if (state().copies_land_at_wait) {
    self().open_group.push_back(c);
  } else {
    do_copy(c);
  }
}

inline void cp_async_commit() {
  Fiber& f = self();
  f.committed.push_back(std::move(f.open_group));
  f.open_group.clear();
}

template <int N>
inline void cp_async_wait() {
  flush_committed(N);
}

inline float value(uint32_t reg, int half, Kind kind) {
  const uint16_t bits = static_cast<uint16_t>(half ? reg >> 16 : reg & 0xffffu);
  return kind == kFloat16 ? f16_to_f32(bits) : bf16_to_f32(bits);
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: D = A B + C with the PTX ISA fragment layouts:
// A (16x16): a0..a7 in 4 registers; lane = 4 * (row % 8) + (k % 8) / 2, register = (row >= 8) +
// 2 (k >= 8), half = k % 2. B (16x8): lane = 4 n + (k % 8) / 2, register = (k >= 8), half = k % 2.
// C/D (16x8): lane holds (row lane/4 [+8], cols 2 (lane%4) [+1]) as c0 c1 [c2 c3].
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, Kind kind) {
  WarpState& w = warp();
  Slot* slot = slots(w, kind == kFloat16 ? kOpMmaF16 : kOpMmaBF16);
  const int me = lane();
  Slot& s = slot[me];
  for (int i = 0; i < 4; ++i) s.u[i] = a[i];
  s.u[4] = b0;
  s.u[5] = b1;
  arrive_and_wait(w.barrier);
  check_converged(slot);
  if (me == 0) ++state().block_mma[state().block->id];
  float out[4];
  for (int e = 0; e < 4; ++e) {
    const int row = me / 4 + (e >= 2 ? 8 : 0), col = 2 * (me % 4) + (e & 1);
    double acc = d[e];
    for (int k = 0; k < 16; ++k) {
      const Slot& sa = slot[4 * (row % 8) + (k % 8) / 2];
      const Slot& sb = slot[4 * col + (k % 8) / 2];
      const float av = value(sa.u[(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)], k % 2, kind);
      const float bv = value(sb.u[4 + (k >= 8 ? 1 : 0)], k % 2, kind);
      acc += static_cast<double>(av) * bv;
    }
    out[e] = static_cast<float>(acc);
  }
  for (int e = 0; e < 4; ++e) d[e] = out[e];
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8i..8i+7 address the rows of matrix i; lane
// L receives in register i the elements (row L/4, cols 2(L%4), 2(L%4)+1) of matrix i, or with .trans
// the elements (rows 2(L%4), 2(L%4)+1, col L/4).
inline void ldmatrix_x4(uint32_t (&r)[4], const void* p, bool trans) {
  check_smem(p, 16, 16, "ldmatrix: row address out of shared memory or not 16-byte aligned");
  WarpState& w = warp();
  Slot* slot = slots(w, trans ? kOpLdmatrixTrans : kOpLdmatrix);
  const int me = lane();
  slot[me].ptr = p;
  arrive_and_wait(w.barrier);
  check_converged(slot);
  for (int i = 0; i < 4; ++i) {
    uint16_t v[2];
    for (int j = 0; j < 2; ++j) {
      const int row = trans ? 2 * (me % 4) + j : me / 4;
      const int col = trans ? me / 4 : 2 * (me % 4) + j;
      std::memcpy(&v[j], static_cast<const uint16_t*>(slot[8 * i + row].ptr) + col, 2);
    }
    r[i] = static_cast<uint32_t>(v[0]) | (static_cast<uint32_t>(v[1]) << 16);
  }
}

inline float shfl_xor(unsigned member_mask, float x, int lane_mask) {
  if (member_mask != 0xffffffffu) fail("shfl.sync with a partial member mask (the emulation runs full warps)");
  if (lane_mask < 0 || lane_mask > 31) fail("shfl.sync.bfly: lane mask out of range");
  WarpState& w = warp();
  Slot* slot = slots(w, kOpShfl + lane_mask);
  const int me = lane();
  slot[me].f[0] = x;
  arrive_and_wait(w.barrier);
  check_converged(slot);
  return slot[me ^ lane_mask].f[0];
}

inline void syncthreads() { arrive_and_wait(state().block->block_barrier); }

// Marks a shared-memory region dead (NaN bytes) once every thread of the block has reached this call:
// the kernel calls it, under emulation only, where it promises never to read the region again before
// rewriting it, so that a read it does not expect shows up as NaN in the results.
inline void poison_smem_after_barrier(void* p, size_t bytes) {
  syncthreads();
  check_smem(p, bytes, 1, "poison: region outside shared memory");
  if (self().tid.x == 0) std::memset(p, 0xff, bytes);
}

// ---- Launch: blocks admitted in grid order (or reversed), kResidentBlocks at a time, taking turns.

inline void fiber_entry() {
  state().body();
  Fiber& f = self();
  cp_async_commit();
  flush_committed(0);
  f.done = true;
  switch_context(f.ctx, state().scheduler);  // never resumed
  fail("a finished thread was resumed");
}

inline std::unique_ptr<Block> make_block(int id, const dim3& grid, int n, size_t smem_bytes) {
  auto b = std::make_unique<Block>();
  b->id = id;
  b->idx = {id % grid.x, (id / grid.x) % grid.y, id / (grid.x * grid.y)};
  b->smem.assign(smem_bytes, 0xff);  // 0xff.. is NaN in fp32, fp16 and bf16
  b->fibers = std::vector<Fiber>(n);
  b->warps = std::vector<WarpState>(n / 32);
  for (auto& w : b->warps) w.barrier.size = 32;
  b->block_barrier.size = n;
  b->remaining = n;
  for (int i = 0; i < n; ++i) {
    Fiber& f = b->fibers[i];
    f.tid = {static_cast<unsigned>(i), 0, 0};
    f.stack.reset(new char[kStackBytes]);
    init_context(f.ctx, f.stack.get(), kStackBytes, fiber_entry);
  }
  return b;
}

// The first runnable fiber of b in priority order, or -1.
inline int pick(const Block& b, bool descending) {
  const int n = static_cast<int>(b.fibers.size());
  for (int j = 0; j < n; ++j) {
    const int i = descending ? n - 1 - j : j;
    const Fiber& f = b.fibers[i];
    if (f.done || (f.waiting_on && f.waiting_on->generation == f.waiting_generation)) continue;
    return i;
  }
  return -1;
}

[[noreturn]] inline void deadlock(const Block& b) {
  char msg[200];
  int exited = 0;
  for (const Fiber& f : b.fibers) exited += f.done;
  std::snprintf(msg, sizeof msg,
                "deadlock in block %d: threads wait at a barrier or warp-wide instruction that others never "
                "reach (%d of %zu threads exited)", b.id, exited, b.fibers.size());
  fail(msg);
}

template <typename Params>
void launch(void (*kernel)(Params), dim3 grid, dim3 block, size_t smem_bytes, const Params& params) {
  State& st = state();
  if (smem_bytes > st.smem_limit || block.x > 1024 || block.x % 32 != 0 || block.y != 1 || block.z != 1 ||
      grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) {
    st.last_error = cudaErrorInvalidConfiguration;
    return;
  }
  st.grid = grid;
  st.block_dim = block;
  st.body = [kernel, &params] { kernel(params); };
  st.global.clear();
  const int n = static_cast<int>(block.x);
  const int blocks = static_cast<int>(grid.x * grid.y * grid.z);
  st.block_mma.assign(static_cast<size_t>(blocks), 0);
  int admitted = 0;
  size_t turn = 0;
  // Blocks take turns one fiber run at a time (a run ends at the fiber's next barrier), so their
  // global-memory accesses interleave; inside a block the priority order decides, as described above.
  while (admitted < blocks || !st.resident.empty()) {
    while (admitted < blocks && static_cast<int>(st.resident.size()) < kResidentBlocks) {
      const int id = st.descending ? blocks - 1 - admitted : admitted;
      st.resident.push_back(make_block(id, grid, n, smem_bytes));
      ++admitted;
    }
    const size_t which = turn++ % st.resident.size();
    Block& b = *st.resident[which];
    const int i = pick(b, st.descending);
    if (i < 0) deadlock(b);
    Fiber& f = b.fibers[i];
    f.waiting_on = nullptr;
    st.block = &b;
    st.current = i;
    switch_context(st.scheduler, f.ctx);
    st.block = nullptr;
    st.current = -1;
    if (f.done && --b.remaining == 0) st.resident.erase(st.resident.begin() + static_cast<long>(which));
  }
}

}  // namespace emu

#define threadIdx (emu::self().tid)
#define blockIdx (emu::state().block->idx)
#define gridDim (emu::state().grid)
#define blockDim (emu::state().block_dim)

inline void __syncthreads() { emu::syncthreads(); }
inline float __shfl_xor_sync(unsigned members, float x, int mask) { return emu::shfl_xor(members, x, mask); }
inline float atomicAdd(float* p, float v) {
  emu::touch_global(p, sizeof(float), emu::Access::kAtomic);
  const float old = *p;
  *p = old + v;
  return old;
}

template <typename F>
inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int value) {
  return static_cast<size_t>(value) <= emu::state().smem_limit ? cudaSuccess : cudaErrorInvalidValue;
}
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::state().last_error;
  emu::state().last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  *value = emu::state().device_major;
  return cudaSuccess;
}

// The kernel's PTX wrappers, mapped onto the emulation.
namespace glm_flash {
namespace {
template <typename V>
inline void store_global(V* p, const V& v) {
  emu::touch_global(p, sizeof(V), emu::Access::kStore);
  *p = v;
}
inline void cp_async16(void* dst, const void* src, bool valid) { emu::cp_async16(dst, src, valid); }
inline void cp_async_commit() { emu::cp_async_commit(); }
template <int N>
inline void cp_async_wait() {
  emu::cp_async_wait<N>();
}
inline void ldsm_x4(uint32_t (&r)[4], const void* p) { emu::ldmatrix_x4(r, p, false); }
inline void ldsm_x4_trans(uint32_t (&r)[4], const void* p) { emu::ldmatrix_x4(r, p, true); }
}  // namespace
}  // namespace glm_flash
