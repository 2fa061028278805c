// glm's native CPU decode path: weight-only int8/int4 matrix-vector products and one whole decode step
// (every block of a quantized Llama-family model for one new token), for x86-64 with AVX2 and FMA.
//
// Why it exists: decoding one token multiplies one row by every weight matrix. In PyTorch eager that
// is ~5,800 operator calls a token for a 30-layer model, each costing microseconds of dispatch, and the
// weight-only kernels want bf16 activations (two casts a call). Here a step is one call: the weights
// stream from memory once, the small work between them (norms, rotary, attention over the cache, SiLU)
// runs in registers in float32. The products round their input rows to int8 steps (per 32 columns for
// int8 weights, per 64 for int4), as llama.cpp's q8_0 / q4_0 x q8_0 products do, and multiply bytes (see
// "int4 weights x int8 activations" below for why and for the error bound).
//
// Plain C ABI, no torch headers: Python hands over raw pointers (ctypes), so the library compiles in
// seconds. Threads come from OpenMP; linked against the libgomp that torch has already loaded, it
// shares torch's thread pool and honours torch.set_num_threads.
//
// Batched step (`glm_decode_rows`): M sequences advance one token each in one call, each with its own cache
// slot, position and length. Every weight row is read from memory once for all M rows, and each decoded
// chunk of it serves a block of up to 4 rows. Each row's sums are formed in
// exactly the order of the one-row kernels, so a row's result is bit for bit what the one-row step gives it.
//
// Formats (see core/quant/weight_only.py): int8 weights (N, K) with one float scale per row; int4 codes
// with a float scale and zero point per group of G columns, w = (q - z) * s, stored by glm as (N, K/2)
// bytes (column 2j in the low nibble of byte j) and rearranged once, at load, into the lane layout of
// `glm_int4_lane_layout` (the same bytes in another order).

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <type_traits>

extern "C" {

int glm_cpu_abi_version() { return 6; }

}  // extern "C"

namespace {

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

inline __m256 load_i8_as_f32(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// ------------------------------------------------------------------ int4 weights x int8 activations
// An int4 product in float32 is compute-bound: every code costs a shift, a mask, a conversion and a
// multiply-add, for each activation row. So the int4 products round the activations to int8 first (what
// llama.cpp's q4_0 x q8_0 dot products do) and multiply bytes: one vpmaddubsw does 32 code x activation
// products. Per block of 64 columns, a row x becomes d_b = max|x| / 127 and q = round(x / d_b) in
// [-127, 127], so each activation is off by at most d_b / 2 (the tests check that bound); everything after
// the rounding is exact integer arithmetic up to the final float sums:
//   y = sum_g s_g * sum_{b in g} d_b * (sum_k q_k c_k - z_g * sum_k q_k)   (codes c, zero z, scale s)
// The rounded row is stored in the byte order of the weights' lane layout, so the codes need no shuffle.

// One activation row rounded to int8 for the int4 products: K bytes of codes (per 64 columns: the low
// half holds columns 16i + l at byte 4l + i, the high half columns 16i + 8 + l), then K/64 floats d_b, then
// K/64 int32 sums of q over the block.
struct Q8Row {
  int8_t* q;
  float* d;
  int32_t* qsum;
};

// Bytes of one rounded row (16-byte aligned starts, so rows can follow one another in a scratch buffer).
inline int64_t q8_row_bytes(int64_t K) { return (K + 8 * (K / 64) + 15) / 16 * 16; }

inline Q8Row q8_row_at(void* scratch, int64_t row, int64_t K) {
  char* base = static_cast<char*>(scratch) + row * q8_row_bytes(K);
  return {reinterpret_cast<int8_t*>(base), reinterpret_cast<float*>(base + K),
          reinterpret_cast<int32_t*>(base + K + 4 * (K / 64))};
}

// max |x[i]| over n floats, n a multiple of 8: a rounding block's scale.
inline float abs_max(const float* x, int n) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 vmax = _mm256_setzero_ps();
  for (int i = 0; i < n; i += 8) vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  return _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
}

// One block's int8 step: d = max|x| / 127, and the multiplier 1/d that rounding uses (0 for an all-zero
// block, whose codes are then all 0).
struct BlockStep {
  float d;
  __m256 inv;
};

inline BlockStep block_step(const float* x, int n) {
  const float amax = abs_max(x, n);
  return {amax / 127.0f, _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f)};
}

// Rounds 8 floats to int32 (nearest, ties to even, as nearbyintf), clamped to [-127, 127].
inline __m256i round_q8(const float* x, __m256 inv) {
  const __m256 r = _mm256_mul_ps(_mm256_loadu_ps(x), inv);
  return _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, _mm256_set1_ps(-127.0f)), _mm256_set1_ps(127.0f)));
}

// Four int32 vectors whose lanes hold bytes -> one vector whose 32-bit lane l holds a0[l], a1[l], a2[l],
// a3[l] as bytes 0..3: exactly the lane layout's byte order (byte 4l + i of column 16i + l).
inline __m256i pack_lanes(__m256i a0, __m256i a1, __m256i a2, __m256i a3) {
  const __m256i byte = _mm256_set1_epi32(0xFF);
  return _mm256_or_si256(
      _mm256_or_si256(_mm256_and_si256(a0, byte), _mm256_slli_epi32(_mm256_and_si256(a1, byte), 8)),
      _mm256_or_si256(_mm256_slli_epi32(_mm256_and_si256(a2, byte), 16), _mm256_slli_epi32(a3, 24)));
}

void quantize_row_q8(const float* x, int64_t K, void* scratch, int64_t row) {
  const Q8Row out = q8_row_at(scratch, row, K);
  for (int64_t b = 0; b < K / 64; ++b) {
    const float* xb = x + 64 * b;
    const BlockStep step = block_step(xb, 64);
    __m256i lo[4], hi[4];
    for (int i = 0; i < 4; ++i) lo[i] = round_q8(xb + 16 * i, step.inv), hi[i] = round_q8(xb + 16 * i + 8, step.inv);
    int8_t* q = out.q + 64 * b;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), pack_lanes(lo[0], lo[1], lo[2], lo[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 32), pack_lanes(hi[0], hi[1], hi[2], hi[3]));
    __m256i sum = _mm256_setzero_si256();
    for (int i = 0; i < 4; ++i) sum = _mm256_add_epi32(sum, _mm256_add_epi32(lo[i], hi[i]));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
    out.d[b] = step.d;
    out.qsum[b] = _mm_cvtsi128_si32(s4);
  }
}

// y[m * ldy] for MB rounded rows and one int4 weight row w in the lane layout, scales s and zeros z (K/G).
// One float accumulator a row, blocks in order: a row's result does not depend on MB (the one-row
// product is MB = 1), so batching never changes a number.
template <int MB>
void int4_q8_rows(const Q8Row* rows, const uint32_t* w, const float* s, const float* z, int64_t K, int64_t G,
                  float* y, int64_t ldy) {
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 acc[MB];
  float offset[MB];
  for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps(), offset[m] = 0.0f;
  for (int64_t b = 0; b < K / 64; ++b) {
    const int64_t g = 64 * b / G;
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 8 * b));
    const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
    for (int m = 0; m < MB; ++m) {
      const int8_t* q = rows[m].q + 64 * b;
      const __m256i products = _mm256_add_epi16(
          _mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q))),
          _mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32))));
      const float f = s[g] * rows[m].d[b];
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(products, ones)), _mm256_set1_ps(f), acc[m]);
      offset[m] += f * z[g] * float(rows[m].qsum[b]);
    }
  }
  for (int m = 0; m < MB; ++m) y[m * ldy] = hsum(acc[m]) - offset[m];
}

// Rows are split among threads in blocks; a matrix small enough to stream in a few microseconds runs on
// the calling thread alone (a parallel region costs about that much).
constexpr int64_t kParallelMinBytes = 64 * 1024;

// Many rows (a prompt, an evaluation window) are rounded on every thread, then multiplied kRowChunk at a
// time: each thread walks its weight rows once a chunk, and a chunk's rounded rows (64 x K bytes) stay in
// its core's L2 cache while it does.
constexpr int64_t kParallelMinRows = 16;
constexpr int64_t kRowChunk = 64;
constexpr int64_t kPairMinRows = 16;  // int8: from here on a task multiplies two weight rows at once

// Calls block(MB as a type's value, m0) over rows 0..M-1 in blocks of 4 rows and one smaller last block:
// a row of the byte products costs the same in a block of any size, and one block's rows share each
// decoded weight chunk.
template <typename F>
inline void for_blocks_of_4(int64_t M, F&& block) {
  int64_t m = 0;
  for (; M - m >= 4; m += 4) block(std::integral_constant<int, 4>(), m);
  switch (M - m) {
    case 3: return block(std::integral_constant<int, 3>(), m);
    case 2: return block(std::integral_constant<int, 2>(), m);
    case 1: return block(std::integral_constant<int, 1>(), m);
    default: return;
  }
}

// ------------------------------------------------------------------ int8 weights x int8 activations
// The same for int8 weights, with the input rounded per 32 columns in their natural order (int8 rows
// need only be whole 32-column blocks): d_b = max|x| / 127, q = round(x / d_b). vpmaddubsw multiplies
// unsigned by signed bytes, so each product is formed as |w| * (q with the sign of w) (llama.cpp's way;
// the codes are in [-127, 127], so |w| fits a byte and two products fit an int16).
//   y = s * sum_b d_b * sum_k q_k w_k

// Bytes of one rounded row: K codes, then K/32 floats d_b (16-byte aligned starts).
inline int64_t q8_plain_row_bytes(int64_t K) { return (K + 4 * (K / 32) + 15) / 16 * 16; }

struct Q8PlainRow {
  int8_t* q;
  float* d;
};

inline Q8PlainRow q8_plain_row_at(void* scratch, int64_t row, int64_t K) {
  char* base = static_cast<char*>(scratch) + row * q8_plain_row_bytes(K);
  return {reinterpret_cast<int8_t*>(base), reinterpret_cast<float*>(base + K)};
}

void quantize_row_q8_plain(const float* x, int64_t K, void* scratch, int64_t row) {
  const Q8PlainRow out = q8_plain_row_at(scratch, row, K);
  for (int64_t b = 0; b < K / 32; ++b) {
    const float* xb = x + 32 * b;
    const BlockStep step = block_step(xb, 32);
    // 4 x 8 int32 -> 32 int8 in column order: the packs interleave the 128-bit lanes, the permute undoes it
    const __m256i q01 = _mm256_packs_epi32(round_q8(xb, step.inv), round_q8(xb + 8, step.inv));
    const __m256i q23 = _mm256_packs_epi32(round_q8(xb + 16, step.inv), round_q8(xb + 24, step.inv));
    const __m256i q = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(q01, q23), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.q + 32 * b), q);
    out.d[b] = step.d;
  }
}

// y[m * ldy] for MB rounded rows and one int8 weight row w with scale `scale`. One float accumulator a
// row, blocks in order: a row's result does not depend on MB.
template <int MB>
void int8_q8_rows(const Q8PlainRow* rows, const int8_t* w, float scale, int64_t K, float* y, int64_t ldy) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < K / 32; ++b) {
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * b));
    const __m256i magnitude = _mm256_sign_epi8(wv, wv);
    for (int m = 0; m < MB; ++m) {
      const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[m].q + 32 * b));
      const __m256i products = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(q, wv));
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(products, ones)), _mm256_set1_ps(rows[m].d[b]),
                               acc[m]);
    }
  }
  for (int m = 0; m < MB; ++m) y[m * ldy] = scale * hsum(acc[m]);
}

// The same for two adjacent weight rows w and w + K at once (y[m * ldy] and y[m * ldy + 1]): each rounded
// input chunk and its step are loaded once for both. Every (row, weight row) sum runs exactly as in
// int8_q8_rows, so the two give the same bits; this one is faster from a few dozen rows on (13-15% at 64
// and 256 rows), slower for the few rows of a decode step, hence both. (The same tile for int4 weights was
// 7-15% slower than one row at a time at every size: its 8 accumulators and 4 decoded halves spill.)
template <int MB>
void int8_q8_rows_pair(const Q8PlainRow* rows, const int8_t* w, const float* scale, int64_t K, float* y,
                       int64_t ldy) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc0[MB], acc1[MB];
  for (int m = 0; m < MB; ++m) acc0[m] = acc1[m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < K / 32; ++b) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * b));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + K + 32 * b));
    const __m256i magnitude0 = _mm256_sign_epi8(w0, w0), magnitude1 = _mm256_sign_epi8(w1, w1);
    for (int m = 0; m < MB; ++m) {
      const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[m].q + 32 * b));
      const __m256 d = _mm256_set1_ps(rows[m].d[b]);
      const __m256i p0 = _mm256_maddubs_epi16(magnitude0, _mm256_sign_epi8(q, w0));
      const __m256i p1 = _mm256_maddubs_epi16(magnitude1, _mm256_sign_epi8(q, w1));
      acc0[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p0, ones)), d, acc0[m]);
      acc1[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p1, ones)), d, acc1[m]);
    }
  }
  for (int m = 0; m < MB; ++m) {
    y[m * ldy] = scale[0] * hsum(acc0[m]);
    y[m * ldy + 1] = scale[1] * hsum(acc1[m]);
  }
}

}  // namespace

extern "C" {

// y (M, N) = x (M, K) @ dequant(w).T for int8 w (N, K), scales (N), with x rounded to int8 per 32
// columns (see int8_q8_rows). K % 32 == 0. scratch: M * q8_plain_row_bytes(K) bytes (M * K floats suffice).
void glm_linear_int8(const float* x, int64_t M, int64_t K, const int8_t* w, const float* scales, int64_t N,
                     float* y, float* scratch) {
#pragma omp parallel for schedule(static) if (M >= kParallelMinRows)
  for (int64_t m = 0; m < M; ++m) quantize_row_q8_plain(x + m * K, K, scratch, m);
  const bool parallel = N * K >= kParallelMinBytes;
  for (int64_t m0 = 0; m0 < M; m0 += kRowChunk) {
    const int64_t rows_here = std::min(kRowChunk, M - m0);
    const int64_t step = rows_here >= kPairMinRows ? 2 : 1;  // weight rows a task takes
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t task = 0; task < (N + step - 1) / step; ++task) {
      const int64_t n = step * task;
      for_blocks_of_4(rows_here, [&](auto mb, int64_t m) {
        constexpr int MB = decltype(mb)::value;
        Q8PlainRow rows[4];
        for (int i = 0; i < MB; ++i) rows[i] = q8_plain_row_at(scratch, m0 + m + i, K);
        float* out = y + (m0 + m) * N + n;
        if (step == 2 && n + 1 < N)
          int8_q8_rows_pair<MB>(rows, w + n * K, scales + n, K, out, N);
        else
          int8_q8_rows<MB>(rows, w + n * K, scales[n], K, out, N);
      });
    }
  }
}

// glm's stored int4 rows (N, K/2 bytes, column 2j in the low nibble of byte j) -> the lane layout of
// dot_int4: per 64 columns, 8 uint32 words, word l holding column 8j + l in bits 4j..4j+3. K % 64 == 0.
void glm_int4_lane_layout(const uint8_t* packed, int64_t N, int64_t K, uint32_t* out) {
  for (int64_t n = 0; n < N; ++n) {
    const uint8_t* row = packed + n * (K / 2);
    uint32_t* dst = out + n * (K / 8);
    for (int64_t b = 0; b < K; b += 64)
      for (int l = 0; l < 8; ++l) {
        uint32_t word = 0;
        for (int j = 0; j < 8; ++j) {
          const int64_t col = b + 8 * j + l;
          const uint32_t code = (row[col / 2] >> (4 * (col % 2))) & 0x0F;
          word |= code << (4 * j);
        }
        dst[b / 8 + l] = word;
      }
  }
}

// y (M, N) = x (M, K) @ dequant(w).T for int4 w in the lane layout (N, K/8 words), scales and zeros
// (N, K/G), with x rounded to int8 per 64 columns (see int4_q8_rows). K % 64 == 0, G % 64 == 0.
// scratch: M * q8_row_bytes(K) bytes (M * K floats always suffice).
void glm_linear_int4(const float* x, int64_t M, int64_t K, const uint32_t* w, const float* scales,
                     const float* zeros, int64_t G, int64_t N, float* y, float* scratch) {
  const int64_t n_groups = K / G;
#pragma omp parallel for schedule(static) if (M >= kParallelMinRows)
  for (int64_t m = 0; m < M; ++m) quantize_row_q8(x + m * K, K, scratch, m);
  const bool parallel = N * K / 2 >= kParallelMinBytes;
  for (int64_t m0 = 0; m0 < M; m0 += kRowChunk) {
    const int64_t rows_here = std::min(kRowChunk, M - m0);
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t n = 0; n < N; ++n) {
      const uint32_t* row = w + n * (K / 8);
      const float* s = scales + n * n_groups;
      const float* z = zeros + n * n_groups;
      for_blocks_of_4(rows_here, [&](auto mb, int64_t m) {
        Q8Row rows[4];
        for (int i = 0; i < decltype(mb)::value; ++i) rows[i] = q8_row_at(scratch, m0 + m + i, K);
        int4_q8_rows<decltype(mb)::value>(rows, row, s, z, K, G, y + (m0 + m) * N + n, N);
      });
    }
  }
}

// ------------------------------------------------------------------------------- dequantized copies
// Training through a quantized base needs the float32 weight itself (autograd differentiates the product
// on it), made for every forward: unpacking int4 in PyTorch takes 8x longer than this. The values are
// those of core/quant/weight_only.py's dequantize, bit for bit: one float multiply, q * s (int8), or
// (q - z) * s (int4; q - z is exact in float32).

// out (N, K) = q * scales[n] for int8 w (N, K). K % 8 == 0.
void glm_dequantize_int8(const int8_t* w, const float* scales, int64_t N, int64_t K, float* out) {
#pragma omp parallel for schedule(static) if (N * K >= kParallelMinBytes)
  for (int64_t n = 0; n < N; ++n) {
    const __m256 s = _mm256_set1_ps(scales[n]);
    for (int64_t k = 0; k < K; k += 8)
      _mm256_storeu_ps(out + n * K + k, _mm256_mul_ps(load_i8_as_f32(w + n * K + k), s));
  }
}

// out (N, K) = (q - z) * s per group of G columns, for int4 w in the lane layout (N, K/8 words), scales and
// zeros (N, K/G). K % 64 == 0, G % 64 == 0. Word l of each 64-column block holds column 8j + l in bits
// 4j..4j+3, so shift j of the block's 8 words gives columns 8j..8j+7 in order.
void glm_dequantize_int4(const uint32_t* w, const float* scales, const float* zeros, int64_t N, int64_t K,
                         int64_t G, float* out) {
  const int64_t n_groups = K / G;
  const __m256i nibble = _mm256_set1_epi32(0x0F);
#pragma omp parallel for schedule(static) if (N * K / 2 >= kParallelMinBytes)
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t k = 0; k < K; k += 64) {
      const int64_t g = n * n_groups + k / G;
      const __m256 s = _mm256_set1_ps(scales[g]), z = _mm256_set1_ps(zeros[g]);
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + n * (K / 8) + k / 8));
      for (int j = 0; j < 8; ++j) {
        const __m256 q = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(v, _mm256_set1_epi32(4 * j)), nibble));
        _mm256_storeu_ps(out + n * K + k + 8 * j, _mm256_mul_ps(_mm256_sub_ps(q, z), s));
      }
    }
  }
}

// ------------------------------------------------------------------------------------------ decode step

struct GlmLinear {
  int64_t bits;  // 8 or 4
  int64_t in_features, out_features, group_size;
  const void* weight;    // int8 (N, K), or int4 in the lane layout (N, K/8 words)
  const float* scales;   // (N) or (N, K/G)
  const float* zeros;    // int4 only: (N, K/G)
};

struct GlmLayer {
  const float* input_norm;  // (C)
  const float* post_norm;   // (C)
  GlmLinear qkv, o, gate_up, down;
};

struct GlmModel {
  int64_t n_layers, dim, n_heads, n_kv_heads, head_dim, ffn_dim;
  float norm_eps;
  const GlmLayer* layers;
  const float* final_norm;  // (C)
};

}  // extern "C"

namespace {

// y (M, N) = x (M, K) through one projection.
void linear(const GlmLinear& l, const float* x, int64_t M, float* y, float* scratch) {
  if (l.bits == 8)
    glm_linear_int8(x, M, l.in_features, static_cast<const int8_t*>(l.weight), l.scales, l.out_features, y,
                    scratch);
  else
    glm_linear_int4(x, M, l.in_features, static_cast<const uint32_t*>(l.weight), l.scales, l.zeros,
                    l.group_size, l.out_features, y, scratch);
}

// HF Llama's RMSNorm in float32: x * rsqrt(mean(x^2) + eps) * w.
void rms_norm(const float* x, const float* w, int64_t n, float eps, float* y) {
  double ss = 0.0;
  for (int64_t i = 0; i < n; ++i) ss += double(x[i]) * x[i];
  const float r = 1.0f / sqrtf(float(ss / n) + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = w[i] * (x[i] * r);
}

// Rotate one head in place, the convention of rope_cos_sin/apply_rope in core/model/transformer.py:
// x * cos + roll(x, D/2) * sin_signed (sin_signed negative on the first half).
void rope(float* x, const float* cos, const float* sin_signed, int64_t D, float* tmp) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < D; ++i) tmp[i] = x[i] * cos[i] + x[(i + half) % D] * sin_signed[i];
  memcpy(x, tmp, D * sizeof(float));
}

// exp for the SiLU, vectorized: 2^n * p(r) with n = round(x / ln 2), r = x - n ln 2 (ln 2 split in two
// parts for accuracy) and p the degree-6 Taylor-like polynomial of exp on [-ln2/2, ln2/2] (relative error
// ~2e-7, below float32's rounding of the result).
inline __m256 exp_ps(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// out[i] = silu(gate[i]) * up[i], gate_up = [gate (F) | up (F)].
void silu_mul(const float* gate_up, int64_t F, float* out) {
  int64_t i = 0;
  const __m256 one = _mm256_set1_ps(1.0f);
  for (; i + 8 <= F; i += 8) {
    __m256 g = _mm256_loadu_ps(gate_up + i), u = _mm256_loadu_ps(gate_up + F + i);
    __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), g))));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(g, sig), u));
  }
  for (; i < F; ++i) {
    const float g = gate_up[i];
    out[i] = g / (1.0f + expf(-g)) * gate_up[F + i];
  }
}

inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// out[d0 .. d0 + 8V) = sum_t p_t v_t[d0 ..], the V vectors held in registers across all positions.
template <int V>
inline void weighted_sum(const float* p, const float* values, int64_t L, int64_t D, int64_t d0, float* out) {
  __m256 acc[V];
  for (int i = 0; i < V; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t t = 0; t < L; ++t) {
    const __m256 pt = _mm256_set1_ps(p[t]);
    for (int i = 0; i < V; ++i) acc[i] = _mm256_fmadd_ps(pt, _mm256_loadu_ps(values + t * D + d0 + 8 * i), acc[i]);
  }
  for (int i = 0; i < V; ++i) _mm256_storeu_ps(out + d0 + 8 * i, acc[i]);
}

// Attention of one query head over positions 0..L-1 of its key/value head: softmax(q.k / sqrt(D)) @ v.
// The exponentials go 8 at a time through exp_ps (a scalar expf each was a quarter of the attention time),
// and the weighted sum of values keeps its output in registers over all positions.
void attend(const float* q, const float* keys, const float* values, int64_t L, int64_t D, float* scores,
            float* out) {
  const float scale = 1.0f / sqrtf(float(D));
  float mx = -INFINITY;
  for (int64_t t = 0; t < L; ++t) {
    scores[t] = dot(q, keys + t * D, D) * scale;
    mx = std::max(mx, scores[t]);
  }
  const __m256 vmx = _mm256_set1_ps(mx);
  __m256 vsum = _mm256_setzero_ps();
  int64_t t = 0;
  for (; t + 8 <= L; t += 8) {
    const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(scores + t), vmx));
    _mm256_storeu_ps(scores + t, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  float sum = hsum(vsum);
  for (; t < L; ++t) {
    scores[t] = expf(scores[t] - mx);
    sum += scores[t];
  }
  const float inv = 1.0f / sum;
  for (t = 0; t < L; ++t) scores[t] *= inv;
  int64_t d = 0;
  for (; d + 64 <= D; d += 64) weighted_sum<8>(scores, values, L, D, d, out);
  for (; d + 8 <= D; d += 8) weighted_sum<1>(scores, values, L, D, d, out);
  for (; d < D; ++d) {
    float acc = 0.0f;
    for (t = 0; t < L; ++t) acc += scores[t] * values[t * D + d];
    out[d] = acc;
  }
}

// Where a step's time goes, for bench/native_batched.py: seconds added to [products, attention, rest]
// while a caller has set it (glm_decode_profile); null otherwise, which costs one branch per phase.
double* g_profile = nullptr;

struct Phase {
  int index;
  double start;
  explicit Phase(int i) : index(i), start(g_profile ? omp_get_wtime() : 0.0) {}
  ~Phase() {
    if (g_profile) g_profile[index] += omp_get_wtime() - start;
  }
};

}  // namespace

extern "C" {

// Start (seconds: 3 doubles, added to) or stop (null) timing the phases of decode steps. Not for
// concurrent steps: one caller at a time.
void glm_decode_profile(double* seconds) { g_profile = seconds; }

// Scratch floats a step of `rows` sequences needs (the caller allocates them once per row count and cache
// length).
int64_t glm_decode_rows_scratch_floats(const GlmModel* m, int64_t rows, int64_t max_len) {
  const int64_t qkv = (m->n_heads + 2 * m->n_kv_heads) * m->head_dim;
  const int64_t widest = std::max(m->dim, m->ffn_dim);
  return rows * (m->dim + qkv + m->n_heads * m->head_dim + 3 * m->ffn_dim + m->n_heads * max_len + widest)
         + m->head_dim + 64;
}

// One decode step for M sequences, in place on x (M, C): every block, then the final norm.
// keys/values[l]: layer l's cache pool (n_slots, Hkv, max_len, D) float32. Row i is the sequence in slot
// slots[i] (distinct), whose cache holds lengths[i] < max_len positions: its new key/value go to
// position lengths[i] and its attention covers 0..lengths[i]. cos/sin_signed (M, D): the rotary factors
// of each row's position. Lengths are not advanced (the caller owns them).
void glm_decode_rows(const GlmModel* m, int64_t M, float* x, float* const* keys, float* const* values,
                     int64_t max_len, const int64_t* slots, const int64_t* lengths, const float* cos,
                     const float* sin_signed, float* scratch) {
  const int64_t C = m->dim, H = m->n_heads, Hkv = m->n_kv_heads, D = m->head_dim, F = m->ffn_dim;
  const int64_t QKV = (H + 2 * Hkv) * D, group = H / Hkv;
  float* h = scratch;                  // (M, C)
  float* qkv = h + M * C;              // (M, QKV)
  float* attn = qkv + M * QKV;         // (M, H * D)
  float* gate_up = attn + M * H * D;   // (M, 2F)
  float* act = gate_up + M * 2 * F;    // (M, F)
  float* scores = act + M * F;         // (M * H, max_len)
  float* lin_scratch = scores + M * H * max_len;
  float* tmp = lin_scratch + M * std::max(C, F);  // D
  int64_t attended = 0;  // positions attended by all rows, for the decision to parallelize
  for (int64_t r = 0; r < M; ++r) attended += lengths[r] + 1;
  const bool parallel_attention = attended * H * D >= 32768;
  for (int64_t l = 0; l < m->n_layers; ++l) {
    const GlmLayer& layer = m->layers[l];
    {
      Phase rest(2);
      for (int64_t r = 0; r < M; ++r) rms_norm(x + r * C, layer.input_norm, C, m->norm_eps, h + r * C);
    }
    {
      Phase products(0);
      linear(layer.qkv, h, M, qkv, lin_scratch);
    }
    {
      Phase rest(2);
      for (int64_t r = 0; r < M; ++r) {
        float* q = qkv + r * QKV;
        float* k = q + H * D;
        float* v = k + Hkv * D;
        const float* c = cos + r * D;
        const float* s = sin_signed + r * D;
        for (int64_t i = 0; i < H; ++i) rope(q + i * D, c, s, D, tmp);
        for (int64_t i = 0; i < Hkv; ++i) {
          rope(k + i * D, c, s, D, tmp);
          const int64_t at = ((slots[r] * Hkv + i) * max_len + lengths[r]) * D;
          memcpy(keys[l] + at, k + i * D, D * sizeof(float));
          memcpy(values[l] + at, v + i * D, D * sizeof(float));
        }
      }
    }
    {
      Phase attention(1);
      // (row, head) pairs in parallel once the work outweighs waking the threads; static blocks keep the
      // heads that share a key/value head on one thread, so that cache slice is read from memory once.
#pragma omp parallel for schedule(static) if (parallel_attention)
      for (int64_t item = 0; item < M * H; ++item) {
        const int64_t r = item / H, i = item % H;
        const int64_t base = (slots[r] * Hkv + i / group) * max_len * D;
        attend(qkv + r * QKV + i * D, keys[l] + base, values[l] + base, lengths[r] + 1, D,
               scores + item * max_len, attn + (r * H + i) * D);
      }
    }
    {
      Phase products(0);
      linear(layer.o, attn, M, h, lin_scratch);
    }
    {
      Phase rest(2);
      for (int64_t i = 0; i < M * C; ++i) x[i] += h[i];
      for (int64_t r = 0; r < M; ++r) rms_norm(x + r * C, layer.post_norm, C, m->norm_eps, h + r * C);
    }
    {
      Phase products(0);
      linear(layer.gate_up, h, M, gate_up, lin_scratch);
    }
    {
      Phase rest(2);
      for (int64_t r = 0; r < M; ++r) silu_mul(gate_up + r * 2 * F, F, act + r * F);
    }
    {
      Phase products(0);
      linear(layer.down, act, M, h, lin_scratch);
    }
    Phase rest(2);
    for (int64_t i = 0; i < M * C; ++i) x[i] += h[i];
  }
  Phase rest(2);
  for (int64_t r = 0; r < M; ++r) {
    rms_norm(x + r * C, m->final_norm, C, m->norm_eps, h);
    memcpy(x + r * C, h, C * sizeof(float));
  }
}

// Scratch floats one step of one sequence needs.
int64_t glm_decode_scratch_floats(const GlmModel* m, int64_t max_len) {
  return glm_decode_rows_scratch_floats(m, 1, max_len);
}

// One decode step for one sequence (the cache of batch size 1), in place on x (C): the M = 1 case of
// glm_decode_rows, its new key/value at position `pos`.
void glm_decode_step(const GlmModel* m, float* x, float* const* keys, float* const* values, int64_t max_len,
                     int64_t pos, const float* cos, const float* sin_signed, float* scratch) {
  const int64_t slot = 0;
  glm_decode_rows(m, 1, x, keys, values, max_len, &slot, &pos, cos, sin_signed, scratch);
}

}  // extern "C"
