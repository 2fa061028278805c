// glm's native CPU decode path: weight-only int8/int4 matrix-vector products and one whole decode step
// (every block of a quantized Llama-family model for one new token), for x86-64 with AVX2 and FMA.
//
// Why it exists: decoding one token multiplies one row by every weight matrix. In PyTorch eager that
// is ~5,800 operator calls a token for a 30-layer model, each costing microseconds of dispatch, and the
// weight-only kernels want bf16 activations (two casts a call). Here a step is one call: the weights
// stream from memory once, the small work between them (norms, rotary, attention over the cache, SiLU)
// runs in registers, and activations stay float32 throughout (so results are closer to the
// dequantized reference than the bf16 kernels are).
//
// Plain C ABI, no torch headers: Python hands over raw pointers (ctypes), so the library compiles in
// seconds. Threads come from OpenMP; linked against the libgomp that torch has already loaded, it
// shares torch's thread pool and honours torch.set_num_threads.
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
#include <vector>

extern "C" {

int glm_cpu_abi_version() { return 2; }

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

// sum_k w[k] * x[k] for one int8 row; K a multiple of 32.
inline float dot_int8(const float* x, const int8_t* w, int64_t K) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    a0 = _mm256_fmadd_ps(load_i8_as_f32(w + k), _mm256_loadu_ps(x + k), a0);
    a1 = _mm256_fmadd_ps(load_i8_as_f32(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
    a2 = _mm256_fmadd_ps(load_i8_as_f32(w + k + 16), _mm256_loadu_ps(x + k + 16), a2);
    a3 = _mm256_fmadd_ps(load_i8_as_f32(w + k + 24), _mm256_loadu_ps(x + k + 24), a3);
  }
  return hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
}

// One int4 row in the lane layout (`glm_int4_lane_layout`), group by group:
// sum_g s_g * (sum_{k in g} q_k x_k - z_g * sum_{k in g} x_k). K and G multiples of 64.
// Each 256-bit load holds 64 codes as 8 words; shifting and masking the words gives the codes of 8
// consecutive columns in 8 int32 lanes, so no byte shuffles are needed (they were the bottleneck).
inline float dot_int4(const float* x, const float* xsum, const uint32_t* w, const float* s, const float* z,
                      int64_t K, int64_t G) {
  const __m256i nibble = _mm256_set1_epi32(0x0F);
  __m256 total = _mm256_setzero_ps();
  float offset = 0.0f;
  for (int64_t g = 0, k0 = 0; k0 < K; ++g, k0 += G) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (int64_t k = k0; k < k0 + G; k += 64) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k / 8));
#define GLM_CODES(shift) _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, shift), nibble))
      a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, nibble)), _mm256_loadu_ps(x + k), a0);
      a1 = _mm256_fmadd_ps(GLM_CODES(4), _mm256_loadu_ps(x + k + 8), a1);
      a2 = _mm256_fmadd_ps(GLM_CODES(8), _mm256_loadu_ps(x + k + 16), a2);
      a3 = _mm256_fmadd_ps(GLM_CODES(12), _mm256_loadu_ps(x + k + 24), a3);
      a0 = _mm256_fmadd_ps(GLM_CODES(16), _mm256_loadu_ps(x + k + 32), a0);
      a1 = _mm256_fmadd_ps(GLM_CODES(20), _mm256_loadu_ps(x + k + 40), a1);
      a2 = _mm256_fmadd_ps(GLM_CODES(24), _mm256_loadu_ps(x + k + 48), a2);
      a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 28)), _mm256_loadu_ps(x + k + 56), a3);
#undef GLM_CODES
    }
    __m256 group = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    total = _mm256_fmadd_ps(_mm256_set1_ps(s[g]), group, total);
    offset += s[g] * z[g] * xsum[g];
  }
  return hsum(total) - offset;
}

void group_sums(const float* x, int64_t K, int64_t G, float* xsum) {
  for (int64_t g = 0, k0 = 0; k0 < K; ++g, k0 += G) {
    float acc = 0.0f;
    for (int64_t k = k0; k < k0 + G; ++k) acc += x[k];
    xsum[g] = acc;
  }
}

// Rows are split among threads in blocks; a matrix small enough to stream in a few microseconds runs on
// the calling thread alone (a parallel region costs about that much).
constexpr int64_t kParallelMinBytes = 64 * 1024;

}  // namespace

extern "C" {

// y (M, N) = x (M, K) @ dequant(w).T for int8 w (N, K), scales (N). K % 32 == 0.
void glm_linear_int8(const float* x, int64_t M, int64_t K, const int8_t* w, const float* scales, int64_t N,
                     float* y) {
  const bool parallel = N * K >= kParallelMinBytes;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t n = 0; n < N; ++n) {
    const int8_t* row = w + n * K;
    for (int64_t m = 0; m < M; ++m) y[m * N + n] = scales[n] * dot_int8(x + m * K, row, K);
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
// (N, K/G). K % 64 == 0, G % 64 == 0. scratch: M * (K / G) floats.
void glm_linear_int4(const float* x, int64_t M, int64_t K, const uint32_t* w, const float* scales,
                     const float* zeros, int64_t G, int64_t N, float* y, float* scratch) {
  const int64_t n_groups = K / G;
  for (int64_t m = 0; m < M; ++m) group_sums(x + m * K, K, G, scratch + m * n_groups);
  const bool parallel = N * K / 2 >= kParallelMinBytes;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t n = 0; n < N; ++n) {
    const uint32_t* row = w + n * (K / 8);
    const float* s = scales + n * n_groups;
    const float* z = zeros + n * n_groups;
    for (int64_t m = 0; m < M; ++m) y[m * N + n] = dot_int4(x + m * K, scratch + m * n_groups, row, s, z, K, G);
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

void linear(const GlmLinear& l, const float* x, float* y, float* scratch) {
  if (l.bits == 8)
    glm_linear_int8(x, 1, l.in_features, static_cast<const int8_t*>(l.weight), l.scales, l.out_features, y);
  else
    glm_linear_int4(x, 1, l.in_features, static_cast<const uint32_t*>(l.weight), l.scales, l.zeros,
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

// Attention of one query head over positions 0..L-1 of its key/value head: softmax(q.k / sqrt(D)) @ v.
void attend(const float* q, const float* keys, const float* values, int64_t L, int64_t D, float* scores,
            float* out) {
  const float scale = 1.0f / sqrtf(float(D));
  float mx = -INFINITY;
  for (int64_t t = 0; t < L; ++t) {
    scores[t] = dot(q, keys + t * D, D) * scale;
    mx = std::max(mx, scores[t]);
  }
  float sum = 0.0f;
  for (int64_t t = 0; t < L; ++t) {
    scores[t] = expf(scores[t] - mx);
    sum += scores[t];
  }
  const float inv = 1.0f / sum;
  for (int64_t d = 0; d < D; ++d) out[d] = 0.0f;
  for (int64_t t = 0; t < L; ++t) {
    const float p = scores[t] * inv;
    const float* v = values + t * D;
    for (int64_t d = 0; d < D; ++d) out[d] += p * v[d];
  }
}

}  // namespace

extern "C" {

// Scratch floats one step needs (the caller allocates them once per model and cache length).
int64_t glm_decode_scratch_floats(const GlmModel* m, int64_t max_len) {
  const int64_t qkv = (m->n_heads + 2 * m->n_kv_heads) * m->head_dim;
  const int64_t widest = std::max(m->dim, m->ffn_dim);
  return 2 * m->dim + qkv + m->n_heads * m->head_dim + 3 * m->ffn_dim + m->head_dim
         + m->n_heads * max_len + 2 * widest + 64;
}

// One decode step for one sequence, in place on x (C): every block, then the final norm.
// keys/values[l]: layer l's cache (Hkv, max_len, D) float32; the new key/value go to position `pos`
// and attention covers 0..pos. cos/sin_signed (D): the rotary factors of the token's position.
void glm_decode_step(const GlmModel* m, float* x, float* const* keys, float* const* values, int64_t max_len,
                     int64_t pos, const float* cos, const float* sin_signed, float* scratch) {
  const int64_t C = m->dim, H = m->n_heads, Hkv = m->n_kv_heads, D = m->head_dim, F = m->ffn_dim;
  float* h = scratch;
  float* qkv = h + C;
  float* attn = qkv + (H + 2 * Hkv) * D;
  float* ffn = attn + H * D;        // gate_up (2F) then the product (F)
  float* tmp = ffn + 3 * F;         // D
  float* scores = tmp + D;          // H * max_len
  float* lin_scratch = scores + H * max_len;
  const int64_t L = pos + 1, group = H / Hkv;
  for (int64_t l = 0; l < m->n_layers; ++l) {
    const GlmLayer& layer = m->layers[l];
    rms_norm(x, layer.input_norm, C, m->norm_eps, h);
    linear(layer.qkv, h, qkv, lin_scratch);
    float* q = qkv;
    float* k = qkv + H * D;
    float* v = k + Hkv * D;
    for (int64_t i = 0; i < H; ++i) rope(q + i * D, cos, sin_signed, D, tmp);
    for (int64_t i = 0; i < Hkv; ++i) {
      rope(k + i * D, cos, sin_signed, D, tmp);
      memcpy(keys[l] + (i * max_len + pos) * D, k + i * D, D * sizeof(float));
      memcpy(values[l] + (i * max_len + pos) * D, v + i * D, D * sizeof(float));
    }
    // Heads in parallel once the cache is long enough for the work to outweigh waking the threads.
#pragma omp parallel for schedule(static) if (L * H * D >= 32768)
    for (int64_t i = 0; i < H; ++i) {
      const int64_t kv = i / group;
      attend(q + i * D, keys[l] + kv * max_len * D, values[l] + kv * max_len * D, L, D, scores + i * max_len,
             attn + i * D);
    }
    linear(layer.o, attn, h, lin_scratch);
    for (int64_t i = 0; i < C; ++i) x[i] += h[i];
    rms_norm(x, layer.post_norm, C, m->norm_eps, h);
    linear(layer.gate_up, h, ffn, lin_scratch);
    silu_mul(ffn, F, ffn + 2 * F);
    linear(layer.down, ffn + 2 * F, h, lin_scratch);
    for (int64_t i = 0; i < C; ++i) x[i] += h[i];
  }
  rms_norm(x, m->final_norm, C, m->norm_eps, h);
  memcpy(x, h, C * sizeof(float));
}

}  // extern "C"
