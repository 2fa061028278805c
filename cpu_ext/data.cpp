// glm's native kernels for the data commands, each computing exactly what a numpy function computes (the
// tests compare them on random inputs), in one pass where numpy needs several:
//
// - glm_minhash: MinHash signatures, the minimum of (a_p * x + b_p) mod 2^32 over a document's shingle
//   hashes x for every permutation p (core/dedup/minhash.py, `MinHasher.signatures_from_hashes`), without
//   the (permutations x shingles) work array numpy needs: a signature stays in L1 while shingles stream by;
// - glm_collapse: lowercased ASCII with whitespace runs collapsed (core/dedup/ascii_batch.py, `collapse`);
// - glm_word_shingles: word n-gram hashes of collapsed ASCII lines (core/dedup/minhash.py,
//   `ascii_word_shingles`): polynomial hashes modulo 2^64 and splitmix64, as `_spans` computes them.
//
// No OpenMP and no torch: `glm dedup` loads this library on its own (its workers are processes).

#include <stdint.h>

extern "C" {

int glm_data_abi_version() { return 1; }

// sig (n, P) must hold 0xFFFFFFFF on entry; rows of documents without shingles are left so.
// x: the shingle hashes of all documents, document d's at bounds[d]..bounds[d+1]-1.
void glm_minhash(const uint32_t* x, const int64_t* bounds, int64_t n, const uint32_t* a, const uint32_t* b,
                 int64_t P, uint32_t* sig) {
  for (int64_t d = 0; d < n; ++d) {
    uint32_t* row = sig + d * P;
    int64_t i = bounds[d];
    const int64_t end = bounds[d + 1];
    // four shingles at a time: one pass over the signature row per four (the compiler vectorizes the
    // permutation loops: multiply, add and unsigned min, 8 lanes a time with AVX2)
    for (; i + 4 <= end; i += 4) {
      const uint32_t x0 = x[i], x1 = x[i + 1], x2 = x[i + 2], x3 = x[i + 3];
      for (int64_t p = 0; p < P; ++p) {
        uint32_t h0 = a[p] * x0 + b[p], h1 = a[p] * x1 + b[p];
        uint32_t h2 = a[p] * x2 + b[p], h3 = a[p] * x3 + b[p];
        h0 = h0 < h1 ? h0 : h1;
        h2 = h2 < h3 ? h2 : h3;
        h0 = h0 < h2 ? h0 : h2;
        row[p] = row[p] < h0 ? row[p] : h0;
      }
    }
    for (; i < end; ++i) {
      const uint32_t xi = x[i];
      for (int64_t p = 0; p < P; ++p) {
        const uint32_t h = a[p] * xi + b[p];
        row[p] = row[p] < h ? row[p] : h;
      }
    }
  }
}

// Each segment data[starts[i]:ends[i]] (segments tile data in order) lowercased (A-Z only), every run of
// whitespace between two of its words written as one space (32), whitespace before its first word and
// after its last dropped, and NUL written as `nul` when nul != 0. Whitespace is str.split's ASCII set:
// 9-13, 28-31 and 32. Writes the bytes to out (at most data's size) and segment i's span of them to
// first[i]..stop[i]; returns the number of bytes written.
int64_t glm_collapse(const uint8_t* data, const int64_t* starts, const int64_t* ends, int64_t n_segments,
                     uint8_t nul, uint8_t* out, int64_t* first, int64_t* stop) {
  // byte -> what a word byte becomes (lowercase, NUL as `nul`); whitespace marked separately
  uint8_t to[256], space[256];
  for (int c = 0; c < 256; ++c) {
    to[c] = (c >= 65 && c <= 90) ? uint8_t(c + 32) : (c == 0 && nul ? nul : uint8_t(c));
    space[c] = c == 32 || (c >= 9 && c <= 13) || (c >= 28 && c <= 31);
  }
  int64_t o = 0;
  for (int64_t i = 0; i < n_segments; ++i) {
    first[i] = o;
    // Branch-free (word/space boundaries are unpredictable): every byte stores a tentative space and its
    // own value, and the output position advances only past what is kept. `out` has room: a kept space
    // is followed by a kept word byte of the same segment, so o never passes p.
    uint8_t seen_word = 0, pending = 0;
    for (int64_t p = starts[i]; p < ends[i]; ++p) {
      const uint8_t c = data[p], sp = space[c], word = sp ^ 1;
      out[o] = 32;
      o += word & pending;
      out[o] = to[c];
      o += word;
      pending = sp & (pending | seen_word);
      seen_word |= word;
    }
    stop[i] = o;
  }
  return o;
}

}  // extern "C"

namespace {

inline uint64_t mix64(uint64_t x) {  // splitmix64's finalizer, as minhash.mix64
  x ^= x >> 30;
  x *= 0xBF58476D1CE4E5B9ULL;
  x ^= x >> 27;
  x *= 0x94D049BB133111EBULL;
  x ^= x >> 31;
  return x;
}

// The hash of a run of values, independent of where it lies: mix64(sum_j v_j * base^j) modulo 2^64.
template <typename T>
inline uint64_t span_hash(const T* v, int64_t length, uint64_t base) {
  uint64_t h = 0, power = 1;
  for (int64_t j = 0; j < length; ++j) {
    h += uint64_t(v[j]) * power;
    power *= base;
  }
  return mix64(h);
}

}  // namespace

extern "C" {

// Word n-gram hashes of texts whose lines are values[first[i]:stop[i]] (text k has per_text[k] lines, in
// order). A word is a maximal run of bytes with is_word[byte] within one line; each word hashes to
// span_hash of its bytes; each run of n consecutive words of a text to span_hash of their hashes (a text
// with 1..n-1 words: one hash of all of them). Writes the hashes in order to out (room: one per word)
// and each text's count to counts; returns the number written. words: scratch, one per word of a text.
int64_t glm_word_shingles(const uint8_t* values, const uint8_t* is_word, const int64_t* first,
                          const int64_t* stop, const int64_t* per_text, int64_t n_texts, int64_t n,
                          uint64_t base, uint64_t* out, int64_t* counts, uint64_t* words) {
  int64_t line = 0, written = 0;
  for (int64_t k = 0; k < n_texts; ++k) {
    int64_t m = 0;
    for (int64_t end_line = line + per_text[k]; line < end_line; ++line) {
      int64_t p = first[line];
      const int64_t e = stop[line];
      while (p < e) {
        while (p < e && !is_word[values[p]]) ++p;
        const int64_t s = p;
        while (p < e && is_word[values[p]]) ++p;
        if (p > s) words[m++] = span_hash(values + s, p - s, base);
      }
    }
    const int64_t before = written;
    if (m >= n) {
      for (int64_t i = 0; i + n <= m; ++i) out[written++] = span_hash(words + i, n, base);
    } else if (m > 0) {
      out[written++] = span_hash(words, m, base);
    }
    counts[k] = written - before;
  }
  return written;
}

}  // extern "C"
