// lowbit's ONNX Runtime kernels: formats that stock ONNX Runtime has no kernel for, read packed at run time.
//
// Domain "lowbit.ort", version 1, CPU:
//
//   VQMatMul(x, codes, codebook, scales, perm?, lora_a?, lora_b?, bias?) -> y
//     lowbit's VQCodebook format (ReALLM), exactly as runtime/formats.py defines it:
//       x        float   (..., K)            input, original column order
//       codes    uint8   (N, ceil(K/d*b/8))  codebook indices, b bits each, packed per row LSB first
//       codebook float16 (2^b, d)
//       scales   float16 (N, ceil(K/g))      one scale per row and group of g stored columns
//       perm     int32   (K,)  optional      stored column j is original column perm[j]
//       lora_a   float16 (r, K), lora_b float16 (N, r)  optional low-rank term B @ A (original order)
//       bias     float   (N,)  optional
//     attributes index_bits (b), vec_dim (d), group_size (g).
//     y = x @ W.T (+ bias), W[n, perm[j]] = scales[n, j/g] * codebook[code(n, j/d), j%d] (+ B @ A).
//
//   BinaryMatMul(x, signs, group, alphas, mus?, salient_cols?, salient_signs?, residual_signs?, outlier_cols?,
//                outlier_vals?, bias?)
//     lowbit's BinaryResidual format (BiLLM), its planes as stored except the group plane, which the lowering
//     spreads over all K columns (one bit per column, so a column's signs and group bits share a byte index):
//       signs uint8 (N, ceil(K/8)) sign of every weight (bit 1 = +1); group uint8 (N, ceil(K/8)) bit 1 = sparse part
//       (salient and outlier columns: ignored); alphas float16 (N, nb, 4) [salient 1, salient 2, concentrated,
//       sparse] per row and block of block_size columns; mus float16 (N, nb, 4) optional (means);
//       salient_cols int32 (S,), salient_signs and residual_signs uint8 (N, ceil(S/8)) (the signs plane's bits of
//       the salient columns, copied compact by the lowering, and the format's residual plane); outlier_cols int32 (R,), outlier_vals
//       float16 (N, R) (columns kept in fp16); bias float (N,).
//     attribute block_size. W = alpha[part] * s + mu[part]; salient: alpha0 * s + alpha1 * r (+ mu0 + mu1);
//     outlier columns: their values. Optional attribute accuracy_level (as MatMulNBits'): 0 (default) exact; 4 =
//     in the GEMV (decode), the regular columns' x rounded to int8 per block of block_size columns (scale max|x| /
//     127), the weights still exact; salient and outlier columns stay float.
//
//   VQLinears(x, [codes, codebook, scales, perm, lora_a, lora_b, bias] * L) -> y_1 .. y_L
//   BinaryLinears(x, [signs, group, alphas, mus, salient_cols, salient_signs, residual_signs, outlier_cols,
//                     outlier_vals, bias] * L) -> y_1 .. y_L
//     L linears of one input (q/k/v, gate/up) in one node, each with its own tensors (an absent optional one: an
//     empty tensor) and format (attributes as above, one value per linear; accuracy_level optional); all their
//     rows go through the thread pool in one pass. activation "silu_mul" (L = 2, one width): one output
//     silu(y_1) * y_2, the MLP's gate.
//
// The weights stay the artifact's packed bytes: nothing is expanded at load. Decode (at most 4 rows of x) is a
// GEMV that decodes each block of 8 codes once (a 64-bit load, shifts and masks, the codebook entries loaded by
// index from the codebook in float, which stays in L1) and multiplies it with every row of x; each group's sum is
// scaled once. More rows (a prompt, a perplexity window) dequantize 32 weight rows at a time into a float tile and
// multiply it with the rows of x. Both are exact up to float summation order. A scalar path covers shapes the
// vector path does not (d not 1/2/4/8, groups not made of whole 8-code blocks); it is the readable reference of
// the format in this file. Tried and dropped: a per-row lookup table of <x slice, codebook entry> read with AVX2
// gathers (2x slower on AMD Zen 3 at SmolLM2's shapes: building the table costs as much as the lookups), and the
// same table (d4b8) read by scalar byte and float loads in 16 KB tiles, 32 or 128 rows per tile: 0.20 ns per
// weight against this path's 0.14 (one thread, SmolLM2's 210 linears); keeping d2b6's pair table in its node
// instead of rebuilding it per call: 0.97x (210 tables of 64 KB evict each other from the caches); d4b8's byte codes
// read by one byte load each instead of shifts of a 64-bit load: no gain (1.00x, 210 linears, one thread).
//
// Built against the C API headers of Debian's libonnxruntime-dev (ORT_API_VERSION 21) by
// lowbit/runtime/ort_ops.py; the C API is versioned, so newer ONNX Runtime releases load it.
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

const OrtApi* g_api = nullptr;

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

inline float h2f(uint16_t h) { return _cvtsh_ss(h); }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// code i (b bits) of a packed row: stream bits [i*b, (i+1)*b), LSB first (runtime/packing.py)
inline uint32_t code_at(const uint8_t* row, int64_t i, int b) {
  int64_t bit = i * b;
  const uint8_t* p = row + (bit >> 3);
  uint32_t v = p[0];
  if ((bit & 7) + b > 8) v |= uint32_t(p[1]) << 8;
  return (v >> (bit & 7)) & ((1u << b) - 1);
}

constexpr int64_t ROWS_PER_TASK = 32;  // small tasks balance two threads on 192-row matrices
// at most this many rows of x run through the GEMV (codes decoded once for all of them); more as dequantized tiles
constexpr int64_t GEMV_MAX_ROWS = 4;
// GEMVs of fewer weights run on the calling thread: at SmolLM2's 192 x 576 (k/v) one thread took 23 us per call and
// two 27 us (the pool's wake-up); from 576 x 576 (q/o: 46 us on one thread) two threads pay
constexpr int64_t SERIAL_GEMV_WEIGHTS = 1 << 17;

struct VQShape {
  int64_t M, N, K, b, d, g, E, nv, G, rb, r;
};

struct VQWork {
  VQShape s;
  const float* xp;        // (M, K) stored column order
  const uint8_t* codes;   // (N, rb)
  const uint16_t* scales; // (N, G) fp16
  const float* cb;        // (E, d)
  const float* lr_t;      // (M, r): A @ x, or null
  const uint16_t* lora_b; // (N, r) fp16, or null
  const float* bias;      // (N,), or null
  float* y;               // (M, N)
  bool fast;
  const uint8_t* last_row; // the last row of codes followed by 8 zero bytes (fast path)
  // the vector path's view of the codes: d = 2 codes run in pairs, as d = 4 codes of 2b bits into the product
  // codebook (E^2 x 4 floats), so they cost what d = 4 codes cost; else the format's own b, d and codebook
  int fast_b, fast_d;
  const float* fast_cb;
};

// GEMV output rows [n0, n1) for all (<= GEMV_MAX_ROWS) rows of x: each block of 8 codes is decoded once (codebook
// entries loaded by index, d = 1, 2, 4 or 8 floats each) and multiplied with every row of x; per group, the sum
// is scaled once. The codebook (2^b x d floats, <= 8 KB) stays in L1.
// 8 columns of weights (8 / D codebook entries) of the 8-code block at column c, q-th 8 columns of it. The block's
// codes fill B bytes: one 64-bit load, then each code's byte offset by shift and mask. Scalar on purpose: a vector
// of offsets stored and reloaded would stall store-to-load forwarding.
template <int B, int D>
inline __m256 vq_weights8(const uint8_t* row, const char* cb, int64_t c, int q) {
  constexpr int kShift = D == 1 ? 2 : D == 2 ? 3 : D == 4 ? 4 : 5;  // byte offset of an entry: code * D * 4
  constexpr uint64_t kMask = (uint64_t(1) << B) - 1;
  const uint8_t* blk = row + (c / D / 8) * B;
  uint64_t v = 0;
  if (B <= 8) std::memcpy(&v, blk, 8);
  auto entry = [cb, v, blk](int i) -> const float* {
    uint64_t u = v;
    int sh = i * B;
    if (B > 8) {  // pair codes: 8 of them fill B > 8 bytes, so each is read from its own 64-bit window
      std::memcpy(&u, blk + (i * B) / 8, 8);
      sh = (i * B) % 8;
    }
    return reinterpret_cast<const float*>(cb + (((u >> sh) & kMask) << kShift));
  };
  if (D == 1)
    return _mm256_setr_ps(*entry(0), *entry(1), *entry(2), *entry(3), *entry(4), *entry(5), *entry(6), *entry(7));
  if (D == 2) {
    const int i = 4 * q;
    __m128 lo = _mm_loadl_pi(_mm_setzero_ps(), reinterpret_cast<const __m64*>(entry(i)));
    lo = _mm_loadh_pi(lo, reinterpret_cast<const __m64*>(entry(i + 1)));
    __m128 hi = _mm_loadl_pi(_mm_setzero_ps(), reinterpret_cast<const __m64*>(entry(i + 2)));
    hi = _mm_loadh_pi(hi, reinterpret_cast<const __m64*>(entry(i + 3)));
    return _mm256_set_m128(hi, lo);
  }
  if (D == 4) return _mm256_loadu2_m128(entry(2 * q + 1), entry(2 * q));
  return _mm256_loadu_ps(entry(q));
}

template <int B, int D, int M>  // M: rows of x, a template argument so that the accumulators stay in registers
void vq_rows_fast(const VQWork& w, int64_t n0, int64_t n1, float* out) {
  const VQShape& s = w.s;
  const int64_t K = s.K;
  const char* cb = reinterpret_cast<const char*>(w.fast_cb);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = n == s.N - 1 ? w.last_row : w.codes + n * s.rb;  // 8-byte loads may pass a row's end
    __m256 tot[M];
    for (int m = 0; m < M; ++m) tot[m] = _mm256_setzero_ps();
    for (int64_t gi = 0; gi < s.G; ++gi) {
      const int64_t c1 = std::min(K, (gi + 1) * s.g);
      // two accumulators per row of x, alternating by 8 columns: the FMA latency is not one chain
      __m256 a0[M], a1[M];
      for (int m = 0; m < M; ++m) a0[m] = a1[m] = _mm256_setzero_ps();
      for (int64_t c = gi * s.g; c < c1; c += 8 * D) {  // 8 codes: 8 * D columns
        for (int q = 0; q < D; q += 2) {
          const __m256 w0 = vq_weights8<B, D>(row, cb, c, q);
          const float* xc = w.xp + c + 8 * q;
          if (D == 1) {
            for (int m = 0; m < M; ++m) a0[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xc + m * K), a0[m]);
          } else {
            const __m256 w1 = vq_weights8<B, D>(row, cb, c, q + 1);
            for (int m = 0; m < M; ++m) {
              a0[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xc + m * K), a0[m]);
              a1[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xc + 8 + m * K), a1[m]);
            }
          }
        }
      }
      const __m256 sc = _mm256_set1_ps(h2f(w.scales[n * s.G + gi]));
      for (int m = 0; m < M; ++m) tot[m] = _mm256_fmadd_ps(_mm256_add_ps(a0[m], a1[m]), sc, tot[m]);
    }
    for (int m = 0; m < M; ++m) out[m * ROWS_PER_TASK + (n - n0)] = hsum(tot[m]);
  }
}

// one weight row in float, stored column order (the vector path's shapes): tiles for many rows of x
template <int B, int D>
void vq_dequant_row_fast(const VQWork& w, int64_t n, float* out) {
  const VQShape& s = w.s;
  const uint8_t* row = n == s.N - 1 ? w.last_row : w.codes + n * s.rb;
  const char* cb = reinterpret_cast<const char*>(w.fast_cb);
  for (int64_t gi = 0; gi < s.G; ++gi) {
    const __m256 sc = _mm256_set1_ps(h2f(w.scales[n * s.G + gi]));
    for (int64_t c = gi * s.g, c1 = std::min(s.K, (gi + 1) * s.g); c < c1; c += 8 * D)
      for (int q = 0; q < D; ++q) _mm256_storeu_ps(out + c + 8 * q, _mm256_mul_ps(vq_weights8<B, D>(row, cb, c, q), sc));
  }
}

template <int B>
void vq_dequant_row_fast_b(const VQWork& w, int64_t n, float* out) {
  switch (w.fast_d) {
    case 1: vq_dequant_row_fast<B, 1>(w, n, out); break;
    case 2: vq_dequant_row_fast<B, 2>(w, n, out); break;
    case 4: vq_dequant_row_fast<B, 4>(w, n, out); break;
    default: vq_dequant_row_fast<B, 8>(w, n, out); break;
  }
}

template <int B, int D>
void vq_rows_fast_m(const VQWork& w, int64_t n0, int64_t n1, float* out) {
  switch (w.s.M) {
    case 1: vq_rows_fast<B, D, 1>(w, n0, n1, out); break;
    case 2: vq_rows_fast<B, D, 2>(w, n0, n1, out); break;
    case 3: vq_rows_fast<B, D, 3>(w, n0, n1, out); break;
    default: vq_rows_fast<B, D, 4>(w, n0, n1, out); break;
  }
}

template <int B>
void vq_rows_fast_b(const VQWork& w, int64_t n0, int64_t n1, float* out) {
  switch (w.fast_d) {
    case 1: vq_rows_fast_m<B, 1>(w, n0, n1, out); break;
    case 2: vq_rows_fast_m<B, 2>(w, n0, n1, out); break;
    case 4: vq_rows_fast_m<B, 4>(w, n0, n1, out); break;
    default: vq_rows_fast_m<B, 8>(w, n0, n1, out); break;
  }
}

// the readable reference: every stored column's weight from its code, codebook entry and group scale
void vq_dequant_row(const VQShape& s, const uint8_t* codes, const uint16_t* scales, const float* cb, int64_t n,
                    float* out) {
  const uint8_t* row = codes + n * s.rb;
  const uint16_t* sc = scales + n * s.G;
  for (int64_t v = 0; v < s.nv; ++v) {
    const float* e = cb + code_at(row, v, static_cast<int>(s.b)) * s.d;
    for (int64_t t = 0; t < s.d; ++t) {
      const int64_t c = v * s.d + t;
      out[c] = e[t] * h2f(sc[c / s.g]);
    }
  }
}

// fp16 -> float, 8 at a time (F16C)
inline void h2f_n(const uint16_t* h, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
  for (; i < n; ++i) out[i] = h2f(h[i]);
}

float lowrank_add(const VQWork& w, int64_t m, int64_t n) {
  if (!w.lr_t) return 0.0f;
  if (w.s.r % 8 == 0) {  // 8 ranks per step: one F16C conversion and one FMA
    __m256 acc = _mm256_setzero_ps();
    for (int64_t q = 0; q < w.s.r; q += 8)
      acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.lora_b + n * w.s.r + q))),
                            _mm256_loadu_ps(w.lr_t + m * w.s.r + q), acc);
    return hsum(acc);
  }
  float b[64], acc = 0.0f;
  for (int64_t q0 = 0; q0 < w.s.r; q0 += 64) {
    const int64_t len = std::min<int64_t>(64, w.s.r - q0);
    h2f_n(w.lora_b + n * w.s.r + q0, b, len);
    for (int64_t q = 0; q < len; ++q) acc += b[q] * w.lr_t[m * w.s.r + q0 + q];
  }
  return acc;
}

void gemv_task(void* p, size_t task) {
  const VQWork& w = *static_cast<const VQWork*>(p);
  const VQShape& s = w.s;
  const int64_t n0 = static_cast<int64_t>(task) * ROWS_PER_TASK, n1 = std::min(s.N, n0 + ROWS_PER_TASK);
  float out[GEMV_MAX_ROWS * ROWS_PER_TASK];
  if (w.fast) {
    switch (w.fast_b) {
      case 10: vq_rows_fast_m<10, 4>(w, n0, n1, out); break;
      case 12: vq_rows_fast_m<12, 4>(w, n0, n1, out); break;
      case 1: vq_rows_fast_b<1>(w, n0, n1, out); break;
      case 2: vq_rows_fast_b<2>(w, n0, n1, out); break;
      case 3: vq_rows_fast_b<3>(w, n0, n1, out); break;
      case 4: vq_rows_fast_b<4>(w, n0, n1, out); break;
      case 5: vq_rows_fast_b<5>(w, n0, n1, out); break;
      case 6: vq_rows_fast_b<6>(w, n0, n1, out); break;
      case 7: vq_rows_fast_b<7>(w, n0, n1, out); break;
      default: vq_rows_fast_b<8>(w, n0, n1, out); break;
    }
  } else {  // the reference: each row dequantized, then its dot product with every row of x
    std::vector<float> tmp(s.K);
    for (int64_t n = n0; n < n1; ++n) {
      vq_dequant_row(s, w.codes, w.scales, w.cb, n, tmp.data());
      for (int64_t m = 0; m < s.M; ++m) {
        float acc = 0.0f;
        for (int64_t c = 0; c < s.K; ++c) acc += tmp[c] * w.xp[m * s.K + c];
        out[m * ROWS_PER_TASK + (n - n0)] = acc;
      }
    }
  }
  for (int64_t m = 0; m < s.M; ++m)
    for (int64_t n = n0; n < n1; ++n) {
      float acc = out[m * ROWS_PER_TASK + (n - n0)] + lowrank_add(w, m, n);
      if (w.bias) acc += w.bias[n];
      w.y[m * s.N + n] = acc;
    }
}

inline float dot(const float* a, const float* b, int64_t k) {
  __m256 acc = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 8 <= k; c += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + c), _mm256_loadu_ps(b + c), acc);
  float t = hsum(acc);
  for (; c < k; ++c) t += a[c] * b[c];
  return t;
}

// rows of x times one dequantized tile of ROWS_PER_TASK weight rows (prompts, perplexity windows)
// y[m, n0 + i] = <x row m, tile row i> for all M rows of x and tn rows of a dequantized weight tile
void tile_times_x(const float* xp, int64_t M, int64_t K, const float* tile, int64_t tn, float* y, int64_t N,
                  int64_t n0) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) {  // 4 rows of x x 2 weight rows: 8 accumulators, each x vector used twice
    const float* x0 = xp + m * K;
    int64_t i = 0;
    for (; i + 2 <= tn; i += 2) {
      const float* w0 = tile + i * K;
      const float* w1 = w0 + K;
      __m256 acc[8];
      for (auto& a : acc) a = _mm256_setzero_ps();
      int64_t c = 0;
      for (; c + 8 <= K; c += 8) {
        const __m256 b0 = _mm256_loadu_ps(w0 + c), b1 = _mm256_loadu_ps(w1 + c);
        for (int q = 0; q < 4; ++q) {
          const __m256 a = _mm256_loadu_ps(x0 + q * K + c);
          acc[2 * q] = _mm256_fmadd_ps(a, b0, acc[2 * q]);
          acc[2 * q + 1] = _mm256_fmadd_ps(a, b1, acc[2 * q + 1]);
        }
      }
      for (int q = 0; q < 4; ++q) {
        float t0 = hsum(acc[2 * q]), t1 = hsum(acc[2 * q + 1]);
        for (int64_t cc = c; cc < K; ++cc) {
          t0 += x0[q * K + cc] * w0[cc];
          t1 += x0[q * K + cc] * w1[cc];
        }
        y[(m + q) * N + n0 + i] = t0;
        y[(m + q) * N + n0 + i + 1] = t1;
      }
    }
    for (; i < tn; ++i)
      for (int q = 0; q < 4; ++q) y[(m + q) * N + n0 + i] = dot(x0 + q * K, tile + i * K, K);
  }
  for (; m < M; ++m)
    for (int64_t i = 0; i < tn; ++i) y[m * N + n0 + i] = dot(xp + m * K, tile + i * K, K);
}

void gemm_task(void* p, size_t task) {
  const VQWork& w = *static_cast<const VQWork*>(p);
  const VQShape& s = w.s;
  const int64_t n0 = static_cast<int64_t>(task) * ROWS_PER_TASK, n1 = std::min(s.N, n0 + ROWS_PER_TASK);
  const int64_t tn = n1 - n0, K = s.K;
  std::vector<float> tile(tn * K);
  for (int64_t i = 0; i < tn; ++i) {
    float* t = tile.data() + i * K;
    if (!w.fast) {
      vq_dequant_row(s, w.codes, w.scales, w.cb, n0 + i, t);
      continue;
    }
    switch (w.fast_b) {
      case 10: vq_dequant_row_fast<10, 4>(w, n0 + i, t); break;
      case 12: vq_dequant_row_fast<12, 4>(w, n0 + i, t); break;
      case 1: vq_dequant_row_fast_b<1>(w, n0 + i, t); break;
      case 2: vq_dequant_row_fast_b<2>(w, n0 + i, t); break;
      case 3: vq_dequant_row_fast_b<3>(w, n0 + i, t); break;
      case 4: vq_dequant_row_fast_b<4>(w, n0 + i, t); break;
      case 5: vq_dequant_row_fast_b<5>(w, n0 + i, t); break;
      case 6: vq_dequant_row_fast_b<6>(w, n0 + i, t); break;
      case 7: vq_dequant_row_fast_b<7>(w, n0 + i, t); break;
      default: vq_dequant_row_fast_b<8>(w, n0 + i, t); break;
    }
  }
  tile_times_x(w.xp, s.M, K, tile.data(), tn, w.y, s.N, n0);
  for (int64_t mm = 0; mm < s.M; ++mm)
    for (int64_t n = n0; n < n1; ++n) {
      float& o = w.y[mm * s.N + n];
      o += lowrank_add(w, mm, n);
      if (w.bias) o += w.bias[n];
    }
}


// One VQ linear's call: its tensors checked against x, x in stored column order, A @ x, the codebook in float.
// prepare_vq fills everything but w.y (the caller allocates the output once N is known); run_vq runs the tasks of
// one or several calls in one pass over the thread pool.
struct VQCall {
  VQWork w{};
  std::vector<float> cb, xp_buf, lr_t, pairs;
  std::vector<uint8_t> last_row;
  size_t tasks = 0;
};

inline std::vector<int64_t> shape_of(const Ort::ConstValue& v) { return v.GetTensorTypeAndShapeInfo().GetShape(); }
inline bool present(const Ort::ConstValue& v) {  // an optional input given and not empty
  return v && v.IsTensor() && v.GetTensorTypeAndShapeInfo().GetElementCount() > 0;
}

void check_vq_attrs(int64_t b, int64_t d, int64_t g, const std::string& node) {
  if (b < 1 || b > 8 || d < 1 || g < 1)
    throw Error(node + ": index_bits must be 1..8, vec_dim and group_size >= 1");
}

// x: (M, K) in original column order. C, CB, S, P, LA, LB, BI: the format's tensors (P, LA, LB, BI optional).
void prepare_vq(VQCall& call, int64_t b, int64_t d, int64_t g, const float* x, int64_t M, int64_t K,
                const Ort::ConstValue& C, const Ort::ConstValue& CB, const Ort::ConstValue& S,
                const Ort::ConstValue& P, const Ort::ConstValue& LA, const Ort::ConstValue& LB,
                const Ort::ConstValue& BI) {
  const auto cs = shape_of(C), cbs = shape_of(CB), ss = shape_of(S);
  VQShape s{};
  s.K = K, s.M = M;
  s.b = b, s.d = d, s.g = g, s.E = int64_t(1) << b;
  if (cs.size() != 2) throw Error("codes must be 2-D (N, row bytes)");
  s.N = cs[0];
  s.rb = cs[1];
  if (s.K % d) throw Error("vec_dim " + std::to_string(d) + " does not divide K=" + std::to_string(s.K));
  s.nv = s.K / d;
  s.G = (s.K + g - 1) / g;
  if (s.rb != (s.nv * b + 7) / 8)
    throw Error("codes has " + std::to_string(s.rb) + " bytes per row, expected " +
                std::to_string((s.nv * b + 7) / 8) + " for K=" + std::to_string(s.K) + ", d=" +
                std::to_string(d) + ", " + std::to_string(b) + "-bit indices");
  if (cbs.size() != 2 || cbs[0] != s.E || cbs[1] != d)
    throw Error("codebook must be float16 (" + std::to_string(s.E) + ", " + std::to_string(d) + ")");
  if (ss.size() != 2 || ss[0] != s.N || ss[1] != s.G)
    throw Error("scales must be float16 (" + std::to_string(s.N) + ", " + std::to_string(s.G) + ")");
  const bool has_perm = present(P);
  if (has_perm && (shape_of(P).size() != 1 || shape_of(P)[0] != s.K))
    throw Error("perm must be int32 (" + std::to_string(s.K) + ",)");
  const bool has_lr = present(LA) && LB;
  if (has_lr) {
    const auto as = shape_of(LA), bs = shape_of(LB);
    if (as.size() != 2 || bs.size() != 2 || as[1] != s.K || bs[0] != s.N || bs[1] != as[0])
      throw Error("lora_a must be (r, K) and lora_b (N, r)");
    s.r = as[0];
  }
  const bool has_bias = present(BI);
  if (has_bias && BI.GetTensorTypeAndShapeInfo().GetElementCount() != static_cast<size_t>(s.N))
    throw Error("bias must have N=" + std::to_string(s.N) + " elements");

  // the codebook in float, (E, d), at most 8 KB: converted on every call (~0.1 us), so the kernel keeps no state
  // and a codebook fed as a graph input is read as it is
  call.cb.resize(s.E * d);
  h2f_n(reinterpret_cast<const uint16_t*>(CB.GetTensorRawData()), call.cb.data(), s.E * d);

  const float* xp = x;  // x in stored column order
  if (has_perm && M > 0) {
    const int32_t* perm = P.GetTensorData<int32_t>();
    for (int64_t j = 0; j < s.K; ++j)
      if (perm[j] < 0 || perm[j] >= s.K) throw Error("perm holds an index outside 0..K-1");
    call.xp_buf.resize(s.M * s.K);
    for (int64_t m = 0; m < s.M; ++m)
      for (int64_t j = 0; j < s.K; ++j) call.xp_buf[m * s.K + j] = x[m * s.K + perm[j]];
    xp = call.xp_buf.data();
  }
  if (has_lr) {  // A @ x per row of x (original order): r numbers each
    const uint16_t* a = reinterpret_cast<const uint16_t*>(LA.GetTensorRawData());
    call.lr_t.assign(s.M * s.r, 0.0f);
    std::vector<float> arow(s.K);
    for (int64_t q = 0; q < s.r; ++q) {
      h2f_n(a + q * s.K, arow.data(), s.K);
      for (int64_t m = 0; m < s.M; ++m) call.lr_t[m * s.r + q] = dot(arow.data(), x + m * s.K, s.K);
    }
  }
  VQWork& w = call.w;
  w.s = s;
  w.xp = xp;
  w.codes = C.GetTensorData<uint8_t>();
  w.scales = reinterpret_cast<const uint16_t*>(S.GetTensorRawData());
  w.cb = call.cb.data();
  w.lr_t = has_lr ? call.lr_t.data() : nullptr;
  w.lora_b = has_lr ? reinterpret_cast<const uint16_t*>(LB.GetTensorRawData()) : nullptr;
  w.bias = has_bias ? BI.GetTensorData<float>() : nullptr;
  call.tasks = s.M == 0 ? 0 : static_cast<size_t>((s.N + ROWS_PER_TASK - 1) / ROWS_PER_TASK);
  // the vector path: d of 1, 2, 4 or 8 and groups (and K) made of whole 8-code blocks
  w.fast = (d == 1 || d == 2 || d == 4 || d == 8) && g % (8 * d) == 0 && s.K % (8 * d) == 0;
  w.fast_b = static_cast<int>(b), w.fast_d = static_cast<int>(d), w.fast_cb = call.cb.data();
  if (w.fast && d == 2 && b >= 5 && b <= 6 && g % 32 == 0 && s.K % 32 == 0) {
    // pair mode: entry (c0 | c1 << b) of the product codebook is [cb[c0], cb[c1]]; the pair's 2b bits are the
    // two codes as stored (LSB first), so the stream reads unchanged as 2b-bit codes. 3072 x 576, one thread:
    // d2b5 429 -> 277 us, d2b6 662 -> 453 us; d2b7 (a 256 KB table rebuilt per call) got slower, so it is left out
    call.pairs.resize(size_t(s.E) * s.E * 4);
    const float* cb = call.cb.data();
    for (int64_t c1 = 0; c1 < s.E; ++c1)
      for (int64_t c0 = 0; c0 < s.E; ++c0) {
        float* e = call.pairs.data() + (c1 * s.E + c0) * 4;
        e[0] = cb[c0 * 2], e[1] = cb[c0 * 2 + 1], e[2] = cb[c1 * 2], e[3] = cb[c1 * 2 + 1];
      }
    w.fast_b = static_cast<int>(2 * b), w.fast_d = 4, w.fast_cb = call.pairs.data();
  }
  if (w.fast && s.N > 0) {
    call.last_row.assign(s.rb + 8, 0);
    std::memcpy(call.last_row.data(), w.codes + (s.N - 1) * s.rb, s.rb);
    w.last_row = call.last_row.data();
  }
}

// the tasks of several calls as one range: task t belongs to the call whose first task is the last one <= t.
// Call: VQCall or BinCall; Gemv, Gemm: its task functions for <= GEMV_MAX_ROWS rows of x and for more.
template <typename Call, void (*Gemv)(void*, size_t), void (*Gemm)(void*, size_t)>
struct Batch {
  std::vector<Call*> calls;
  std::vector<size_t> first;

  static void task(void* p, size_t t) {
    const Batch& b = *static_cast<const Batch*>(p);
    const size_t i = static_cast<size_t>(std::upper_bound(b.first.begin(), b.first.end(), t) - b.first.begin()) - 1;
    auto& w = b.calls[i]->w;
    (w.s.M > GEMV_MAX_ROWS ? Gemm : Gemv)(&w, t - b.first[i]);
  }
};

template <typename Call, void (*Gemv)(void*, size_t), void (*Gemm)(void*, size_t)>
void run_batch(Ort::KernelContext& ctx, std::vector<Call>& calls) {
  Batch<Call, Gemv, Gemm> batch;
  size_t total = 0;
  int64_t weights = 0, M = 0;
  for (auto& c : calls) {
    batch.calls.push_back(&c);
    batch.first.push_back(total);
    total += c.tasks;
    weights += c.w.s.N * c.w.s.K;
    M = c.w.s.M;
  }
  if (total == 0) return;
  if (M <= GEMV_MAX_ROWS && weights < SERIAL_GEMV_WEIGHTS) {  // waking the pool costs more than it saves
    for (size_t t = 0; t < total; ++t) batch.task(&batch, t);
  } else {
    ctx.ParallelFor(batch.task, total, 0, &batch);
  }
}

void run_vq(Ort::KernelContext& ctx, std::vector<VQCall>& calls) { run_batch<VQCall, gemv_task, gemm_task>(ctx, calls); }

// rows of x: every dimension but the last
int64_t rows_of(const std::vector<int64_t>& xs) {
  int64_t M = 1;
  for (size_t i = 0; i + 1 < xs.size(); ++i) M *= xs[i];
  return M;
}

template <typename TKernel>
OrtStatusPtr compute_status(TKernel& k, OrtKernelContext* context, const char* op) {
  try {
    k.Compute(context);
    return nullptr;
  } catch (const std::exception& e) {
    return g_api->CreateStatus(ORT_INVALID_ARGUMENT, (std::string("lowbit.ort::") + op + ": " + e.what()).c_str());
  }
}

struct VQKernel {
  int64_t b, d, g;

  VQKernel(const OrtApi& api, const OrtKernelInfo* info) {
    (void)api;
    Ort::ConstKernelInfo ki(info);
    b = ki.GetAttribute<int64_t>("index_bits");
    d = ki.GetAttribute<int64_t>("vec_dim");
    g = ki.GetAttribute<int64_t>("group_size");
    check_vq_attrs(b, d, g, "VQMatMul " + ki.GetNodeName());
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) { return compute_status(*this, context, "VQMatMul"); }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const size_t nin = ctx.GetInputCount();
    auto in = [&](size_t i) -> Ort::ConstValue { return i < nin ? ctx.GetInput(i) : Ort::ConstValue(nullptr); };
    Ort::ConstValue X = in(0);
    const auto xs = shape_of(X);
    if (xs.empty()) throw Error("x must have at least one dimension");
    std::vector<VQCall> calls(1);
    prepare_vq(calls[0], b, d, g, X.GetTensorData<float>(), rows_of(xs), xs.back(), in(1), in(2), in(3), in(4),
               in(5), in(6), in(7));
    std::vector<int64_t> ys(xs.begin(), xs.end() - 1);
    ys.push_back(calls[0].w.s.N);
    calls[0].w.y = ctx.GetOutput(0, ys).GetTensorMutableData<float>();
    run_vq(ctx, calls);
  }
};

// VQLinears: several VQ linears of one input in one node (q/k/v; gate/up), their tasks in one pass over the pool,
// so that no small matrix runs alone on one thread and the pool is woken once. Inputs: x, then for each linear its
// seven VQMatMul inputs (codes, codebook, scales, perm, lora_a, lora_b, bias; an empty tensor for an absent one);
// attributes index_bits, vec_dim, group_size: one per linear. activation "silu_mul" (two linears of one width):
// one output silu(y0) * y1 (the MLP's gate), else one output per linear.
constexpr int VQ_PARTS = 7;

// what both ops share: kernel creation reporting errors as a status naming the op, inputs from index 4 on optional,
// one float output. TOp gives kName, GetInputTypeCount and GetInputType.
template <typename TOp, typename TKernel>
struct LowbitOp : Ort::CustomOpBase<TOp, TKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    try {
      *kernel = new TKernel(api, info);
      return nullptr;
    } catch (const std::exception& e) {
      return api.CreateStatus(ORT_INVALID_ARGUMENT, (std::string("lowbit.ort::") + TOp::kName + ": " + e.what()).c_str());
    }
  }
  const char* GetName() const { return TOp::kName; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i < 4 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

struct VQMatMulOp : LowbitOp<VQMatMulOp, VQKernel> {
  static constexpr const char* kName = "VQMatMul";
  size_t GetInputTypeCount() const { return 8; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    switch (i) {
      case 0: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
      case 1: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
      case 4: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
      case 7: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
      default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    }
  }
};

VQMatMulOp g_vq_op;


// ---------------------------------------------------------------------------------------------------------------
// BinaryMatMul: BiLLM's binary-residual format (runtime/formats.py BinaryResidual), exactly.

// sign byte -> its 8 signs as floats (bit 1 = +1, LSB = first column); group byte -> 8 lane masks (bit 1 = sparse)
struct BitTables {
  alignas(32) float sign[256][8];
  alignas(32) uint32_t mask[256][8];
  BitTables() {
    for (int v = 0; v < 256; ++v)
      for (int i = 0; i < 8; ++i) {
        sign[v][i] = (v >> i) & 1 ? 1.0f : -1.0f;
        mask[v][i] = (v >> i) & 1 ? 0xFFFFFFFFu : 0u;
      }
  }
};
const BitTables kBits;

inline bool bit_at(const uint8_t* row, int64_t i) { return (row[i >> 3] >> (i & 7)) & 1; }

struct BinShape {
  int64_t M, N, K, bs, nb, rowb, S, sb, R;
};

struct BinWork {
  BinShape s;
  const float* x;           // (M, K)
  const float* xr;          // (M, K): x with salient and outlier columns zeroed
  const uint8_t* signs;     // (N, rowb)
  const uint8_t* group;     // (N, rowb): sparse-part bit of every column
  const uint16_t* alphas;   // (N, nb, 4)
  const uint16_t* mus;      // (N, nb, 4) or null
  const int32_t* sal;       // (S,)
  const uint8_t* sal_signs; // (N, sb): the signs of the salient columns, compact (as res)
  const uint8_t* res;       // (N, sb)
  const float* xs;          // (M, S8): x at the salient columns, zero-padded to a multiple of 8
  const int32_t* sal_blk;   // (S8,): each salient column's block (nb <= 16: its lane, sal_lane), 0 in the padding
  const int32_t* sal_hi;    // (S8,): -1 where the column's block is 8-15 (nb <= 16)
  int64_t S8;
  const int32_t* out_cols;  // (R,)
  const uint16_t* out_vals; // (N, R)
  const float* bias;
  float* y;
  bool fast;
  // accuracy_level 4: the regular columns' x (xr) as int8 per block of block_size columns, each block's scale
  const int8_t* xq;         // (M, K), or null: the float GEMV
  const float* xq_scale;    // (M, nb)
};

// the readable reference: one weight row of the format in float
void bin_dequant_row(const BinWork& w, int64_t n, float* out) {
  const BinShape& s = w.s;
  const uint8_t* sg = w.signs + n * s.rowb;
  const uint8_t* gr = w.group + n * s.rowb;
  const uint16_t* a = w.alphas + n * s.nb * 4;
  const uint16_t* mu = w.mus ? w.mus + n * s.nb * 4 : nullptr;
  for (int64_t k = 0; k < s.K; ++k) {
    const int64_t b = k / s.bs, part = bit_at(gr, k) ? 3 : 2;
    out[k] = h2f(a[b * 4 + part]) * (bit_at(sg, k) ? 1.0f : -1.0f) + (mu ? h2f(mu[b * 4 + part]) : 0.0f);
  }
  for (int64_t j = 0; j < s.S; ++j) {
    const int64_t k = w.sal[j], b = k / s.bs;
    float v = h2f(a[b * 4]) * (bit_at(sg, k) ? 1.0f : -1.0f) +
              h2f(a[b * 4 + 1]) * (bit_at(w.res + n * s.sb, j) ? 1.0f : -1.0f);
    if (mu) v += h2f(mu[b * 4]) + h2f(mu[b * 4 + 1]);
    out[k] = v;
  }
  for (int64_t j = 0; j < s.R; ++j) out[w.out_cols[j]] = h2f(w.out_vals[n * s.R + j]);
}

// A row's alpha0 and alpha1 (its (nb <= 16, 4) fp16 alphas) in registers without gathers: blocks 0-7 in [0], 8-15
// in [1], in lane order 0, 2, 4, 6, 1, 3, 5, 7 (what unpacking four converted pairs of blocks gives; sal_lane)
inline void alphas01(const uint16_t* a, int64_t nb, __m256* a0, __m256* a1) {
  for (int h = 0; h < (nb > 8 ? 2 : 1); ++h) {
    __m256 f[4];  // f[i]: blocks 2i and 2i+1 (of this eight) as (a0 a1 ac as | a0 a1 ac as); read inside the row
    for (int i = 0; i < 4; ++i) {
      const int64_t b = 8 * h + 2 * i;
      const uint16_t* p = a + 4 * b;
      f[i] = b + 2 <= nb ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))
             : b + 1 == nb ? _mm256_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))
             : _mm256_setzero_ps();
    }
    const __m256d u01 = _mm256_castps_pd(_mm256_unpacklo_ps(f[0], f[1]));
    const __m256d u23 = _mm256_castps_pd(_mm256_unpacklo_ps(f[2], f[3]));
    a0[h] = _mm256_castpd_ps(_mm256_unpacklo_pd(u01, u23));  // f0[0] f1[0] f2[0] f3[0] | f0[4] f1[4] f2[4] f3[4]
    a1[h] = _mm256_castpd_ps(_mm256_unpackhi_pd(u01, u23));  // f0[1] f1[1] f2[1] f3[1] | f0[5] ...
  }
}

// the lane of block b's alphas in alphas01's registers
inline int32_t sal_lane(int64_t b) { return static_cast<int32_t>((b & 1) * 4 + ((b & 7) >> 1)); }

// the columns added to a row's regular sum one by one or 8 at a time: salient (alpha0 * s + alpha1 * r, means added
// one by one) and fp16 outlier columns, all in float; writes the row's outputs
template <int M>
__attribute__((always_inline)) inline void bin_sparse_columns(const BinWork& w, int64_t n, __m256* tot, float* out,
                                                             int64_t n0) {
  const BinShape& s = w.s;
  const uint8_t* sg = w.signs + n * s.rowb;
  const uint16_t* a = w.alphas + n * s.nb * 4;
  const uint16_t* mu = w.mus ? w.mus + n * s.nb * 4 : nullptr;
  if (s.S && !mu) {  // salient columns, 8 at a time: (alpha0 * s + alpha1 * r) of each column's block times x
    const uint8_t* ss8 = w.sal_signs + n * s.sb;
    const uint8_t* rs8 = w.res + n * s.sb;
    if (s.nb <= 16) {  // alpha0/alpha1 of every block in registers, picked per column by a lane permute
      __m256 a0[2], a1[2];
      alphas01(a, s.nb, a0, a1);
      for (int64_t j = 0; j < w.S8; j += 8) {
        const __m256i lane = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.sal_blk + j));
        __m256 x0 = _mm256_permutevar8x32_ps(a0[0], lane), x1 = _mm256_permutevar8x32_ps(a1[0], lane);
        if (s.nb > 8) {
          const __m256 hi = _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.sal_hi + j)));
          x0 = _mm256_blendv_ps(x0, _mm256_permutevar8x32_ps(a0[1], lane), hi);
          x1 = _mm256_blendv_ps(x1, _mm256_permutevar8x32_ps(a1[1], lane), hi);
        }
        const __m256 wv = _mm256_fmadd_ps(x0, _mm256_load_ps(kBits.sign[ss8[j >> 3]]),
                                          _mm256_mul_ps(x1, _mm256_load_ps(kBits.sign[rs8[j >> 3]])));
        for (int m = 0; m < M; ++m) tot[m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(w.xs + m * w.S8 + j), tot[m]);
      }
    } else {  // more blocks: gathered per 8 columns
      alignas(32) float af[4 * 64];
      h2f_n(a, af, std::min<int64_t>(s.nb, 64) * 4);
      for (int64_t j = 0; j < w.S8; j += 8) {
        const __m256i bj = _mm256_slli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.sal_blk + j)), 2);
        const __m256 wv = _mm256_fmadd_ps(_mm256_i32gather_ps(af, bj, 4), _mm256_load_ps(kBits.sign[ss8[j >> 3]]),
                                          _mm256_mul_ps(_mm256_i32gather_ps(af + 1, bj, 4),
                                                        _mm256_load_ps(kBits.sign[rs8[j >> 3]])));
        for (int m = 0; m < M; ++m) tot[m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(w.xs + m * w.S8 + j), tot[m]);
      }
    }
  }
  float t[M];
  for (int m = 0; m < M; ++m) t[m] = hsum(tot[m]);
  for (int64_t j = 0; j < s.S && mu; ++j) {  // mean-shifted: one by one
    const int64_t k = w.sal[j], b = k / s.bs;
    float v = h2f(a[b * 4]) * (bit_at(sg, k) ? 1.0f : -1.0f) +
              h2f(a[b * 4 + 1]) * (bit_at(w.res + n * s.sb, j) ? 1.0f : -1.0f);
    v += h2f(mu[b * 4]) + h2f(mu[b * 4 + 1]);
    for (int m = 0; m < M; ++m) t[m] += v * w.x[m * s.K + k];
  }
  for (int64_t j = 0; j < s.R; ++j) {
    const float v = h2f(w.out_vals[n * s.R + j]);
    for (int m = 0; m < M; ++m) t[m] += v * w.x[m * s.K + w.out_cols[j]];
  }
  for (int m = 0; m < M; ++m) out[m * ROWS_PER_TASK + (n - n0)] = t[m];
}

// GEMV rows [n0, n1), all M (<= 4) rows of x. Regular columns, 8 at a time: x (its salient and outlier columns
// zeroed) times the 8 signs from a table, split by the group mask into the concentrated and sparse sums of the block,
// which its alphas (and means) then scale; salient and outlier columns are added one by one (a few per block).
template <int M>
void bin_rows(const BinWork& w, int64_t n0, int64_t n1, float* out) {
  const BinShape& s = w.s;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* sg = w.signs + n * s.rowb;
    const uint8_t* gr = w.group + n * s.rowb;
    const uint16_t* a = w.alphas + n * s.nb * 4;
    const uint16_t* mu = w.mus ? w.mus + n * s.nb * 4 : nullptr;
    __m256 tot[M];
    for (int m = 0; m < M; ++m) tot[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < s.nb; ++b) {
      __m256 sc[M], ss[M], xc[M], xs[M];
      for (int m = 0; m < M; ++m) sc[m] = ss[m] = xc[m] = xs[m] = _mm256_setzero_ps();
      for (int64_t c = b * s.bs, c1 = std::min(s.K, (b + 1) * s.bs); c < c1; c += 8) {
        const __m256 sv = _mm256_load_ps(kBits.sign[sg[c >> 3]]);
        const __m256 gm = _mm256_load_ps(reinterpret_cast<const float*>(kBits.mask[gr[c >> 3]]));
        for (int m = 0; m < M; ++m) {
          const __m256 xv = _mm256_loadu_ps(w.xr + m * s.K + c);
          const __m256 t = _mm256_mul_ps(xv, sv);
          ss[m] = _mm256_add_ps(ss[m], _mm256_and_ps(gm, t));  // sparse part
          sc[m] = _mm256_add_ps(sc[m], t);                     // both parts (alpha_c, then alpha_s - alpha_c)
          if (mu) {
            xs[m] = _mm256_add_ps(xs[m], _mm256_and_ps(gm, xv));
            xc[m] = _mm256_add_ps(xc[m], _mm256_andnot_ps(gm, xv));
          }
        }
      }
      const float fc = h2f(a[b * 4 + 2]);
      const __m256 ac = _mm256_set1_ps(fc), as = _mm256_set1_ps(h2f(a[b * 4 + 3]) - fc);
      for (int m = 0; m < M; ++m) tot[m] = _mm256_fmadd_ps(ac, sc[m], _mm256_fmadd_ps(as, ss[m], tot[m]));
      if (mu) {
        const __m256 mc = _mm256_set1_ps(h2f(mu[b * 4 + 2])), ms = _mm256_set1_ps(h2f(mu[b * 4 + 3]));
        for (int m = 0; m < M; ++m) tot[m] = _mm256_fmadd_ps(mc, xc[m], _mm256_fmadd_ps(ms, xs[m], tot[m]));
      }
    }
    bin_sparse_columns<M>(w, n, tot, out, n0);
  }
}

// accuracy_level 4: the regular columns as bytes. 32 columns per step: their sign and group bits expanded to byte
// masks in registers (broadcast, byte shuffle, bit test), x's int8 values negated where the sign bit is 0
// (vpsignb), the sparse part masked, both summed in 16-bit lanes (vpmaddubsw; at most block_size / 32 * 254, so
// blocks up to 4096 columns); per block the two sums become float, scaled by the block's x scale times alpha_c and
// alpha_s - alpha_c. Salient and outlier columns stay float (bin_sparse_columns): only the regular columns' x is
// rounded, to 8 bits per block of block_size columns.
// the 32 bits at p, one per byte: each byte holds its bit (sel's bit of the byte's column), else 0
inline __m256i bits_to_bytes(const uint8_t* p, __m256i rep, __m256i sel) {
  const __m256i v = _mm256_broadcastd_epi32(_mm_loadu_si32(p));  // one load straight into the vector register
  return _mm256_and_si256(_mm256_shuffle_epi8(v, rep), sel);
}

template <int M>
void bin_rows_q8(const BinWork& w, int64_t n0, int64_t n1, float* out) {
  const BinShape& s = w.s;
  const __m256i rep = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                       2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i sel = _mm256_set1_epi64x(0x8040201008040201LL);
  const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1), zero = _mm256_setzero_si256();
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* sg = w.signs + n * s.rowb;
    const uint8_t* gr = w.group + n * s.rowb;
    const uint16_t* a = w.alphas + n * s.nb * 4;
    __m256 tot[M];
    for (int m = 0; m < M; ++m) tot[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < s.nb; ++b) {
      __m256i sc[M], ss[M];
      for (int m = 0; m < M; ++m) sc[m] = ss[m] = _mm256_setzero_si256();
      for (int64_t c = b * s.bs, c1 = std::min(s.K, (b + 1) * s.bs); c < c1; c += 32) {
        // +1 where the sign bit is 1, -1 where it is 0: (bit ? 0 : 0xFF) | 1; 0xFF where the column is sparse
        const __m256i sgn = _mm256_or_si256(_mm256_cmpeq_epi8(bits_to_bytes(sg + (c >> 3), rep, sel), zero), ones8);
        const __m256i gm = _mm256_cmpeq_epi8(bits_to_bytes(gr + (c >> 3), rep, sel), sel);
        for (int m = 0; m < M; ++m) {
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.xq + m * s.K + c));
          const __m256i t = _mm256_sign_epi8(xv, sgn);
          sc[m] = _mm256_add_epi16(sc[m], _mm256_maddubs_epi16(ones8, t));
          ss[m] = _mm256_add_epi16(ss[m], _mm256_maddubs_epi16(ones8, _mm256_and_si256(t, gm)));
        }
      }
      const float fc = h2f(a[b * 4 + 2]), fs = h2f(a[b * 4 + 3]) - fc;
      for (int m = 0; m < M; ++m) {
        const float xs = w.xq_scale[m * s.nb + b];
        tot[m] = _mm256_fmadd_ps(_mm256_set1_ps(xs * fc), _mm256_cvtepi32_ps(_mm256_madd_epi16(sc[m], ones16)),
                                 tot[m]);
        tot[m] = _mm256_fmadd_ps(_mm256_set1_ps(xs * fs), _mm256_cvtepi32_ps(_mm256_madd_epi16(ss[m], ones16)),
                                 tot[m]);
      }
    }
    bin_sparse_columns<M>(w, n, tot, out, n0);
  }
}

void bin_gemv_task(void* p, size_t task) {
  const BinWork& w = *static_cast<const BinWork*>(p);
  const BinShape& s = w.s;
  const int64_t n0 = static_cast<int64_t>(task) * ROWS_PER_TASK, n1 = std::min(s.N, n0 + ROWS_PER_TASK);
  float out[GEMV_MAX_ROWS * ROWS_PER_TASK];
  if (w.fast && w.xq) {
    switch (s.M) {
      case 1: bin_rows_q8<1>(w, n0, n1, out); break;
      case 2: bin_rows_q8<2>(w, n0, n1, out); break;
      case 3: bin_rows_q8<3>(w, n0, n1, out); break;
      default: bin_rows_q8<4>(w, n0, n1, out); break;
    }
  } else if (w.fast) {
    switch (s.M) {
      case 1: bin_rows<1>(w, n0, n1, out); break;
      case 2: bin_rows<2>(w, n0, n1, out); break;
      case 3: bin_rows<3>(w, n0, n1, out); break;
      default: bin_rows<4>(w, n0, n1, out); break;
    }
  } else {
    std::vector<float> row(s.K);
    for (int64_t n = n0; n < n1; ++n) {
      bin_dequant_row(w, n, row.data());
      for (int64_t m = 0; m < s.M; ++m) out[m * ROWS_PER_TASK + (n - n0)] = dot(row.data(), w.x + m * s.K, s.K);
    }
  }
  for (int64_t m = 0; m < s.M; ++m)
    for (int64_t n = n0; n < n1; ++n) w.y[m * s.N + n] = out[m * ROWS_PER_TASK + (n - n0)] + (w.bias ? w.bias[n] : 0.0f);
}

void bin_gemm_task(void* p, size_t task) {
  const BinWork& w = *static_cast<const BinWork*>(p);
  const BinShape& s = w.s;
  const int64_t n0 = static_cast<int64_t>(task) * ROWS_PER_TASK, n1 = std::min(s.N, n0 + ROWS_PER_TASK);
  std::vector<float> tile((n1 - n0) * s.K);
  for (int64_t n = n0; n < n1; ++n) bin_dequant_row(w, n, tile.data() + (n - n0) * s.K);
  tile_times_x(w.x, s.M, s.K, tile.data(), n1 - n0, w.y, s.N, n0);
  if (w.bias)
    for (int64_t m = 0; m < s.M; ++m)
      for (int64_t n = n0; n < n1; ++n) w.y[m * s.N + n] += w.bias[n];
}

// One BiLLM linear's call (as VQCall): its planes checked against x, x's views for the GEMV
struct BinCall {
  BinWork w{};
  std::vector<float> xr, xsal, xq_scale;
  std::vector<int8_t> xq;
  std::vector<int32_t> blk, hi;
  size_t tasks = 0;
};

// x: (M, K). SG .. BI: the format's planes (MU .. BI optional). Fills everything but w.y.
// x's regular columns (xr) as int8, one scale per row and block of bs columns: max |x| / 127, rounded to nearest
void quantize_blocks(BinCall& call) {
  const BinShape& s = call.w.s;
  call.xq.resize(s.M * s.K);
  call.xq_scale.resize(s.M * s.nb);
  for (int64_t m = 0; m < s.M; ++m)
    for (int64_t b = 0; b < s.nb; ++b) {
      const float* xr = call.xr.data() + m * s.K;
      const int64_t c0 = b * s.bs, c1 = std::min(s.K, c0 + s.bs);
      // blocks of whole 32-column steps (prepare_bin's condition): 8 floats at a time, rounded to nearest even by
      // cvtps (as std::nearbyint), packed to bytes in column order
      const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
      __m256 vmx = _mm256_setzero_ps();
      for (int64_t c = c0; c < c1; c += 8) vmx = _mm256_max_ps(vmx, _mm256_and_ps(absmask, _mm256_loadu_ps(xr + c)));
      __m128 h = _mm_max_ps(_mm256_castps256_ps128(vmx), _mm256_extractf128_ps(vmx, 1));
      h = _mm_max_ps(h, _mm_movehl_ps(h, h));
      const float mx = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
      const float scale = mx / 127.0f, inv = mx > 0.0f ? 127.0f / mx : 0.0f;
      call.xq_scale[m * s.nb + b] = scale;
      const __m256 vinv = _mm256_set1_ps(inv);
      for (int64_t c = c0; c < c1; c += 32) {
        __m256i q[4];
        for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + c + 8 * i), vinv));
        // packs work per 128-bit lane: the dword order after two packs is 0 2 4 6 1 3 5 7 (in 4-byte units)
        const __m256i w = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(call.xq.data() + m * s.K + c),
                            _mm256_permutevar8x32_epi32(w, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
      }
    }
  call.w.xq = call.xq.data();
  call.w.xq_scale = call.xq_scale.data();
}

void prepare_bin(BinCall& call, int64_t bs, int64_t accuracy_level, const float* x, int64_t M, int64_t K,
                 const Ort::ConstValue& SG, const Ort::ConstValue& GR, const Ort::ConstValue& AL, const Ort::ConstValue& MU,
                 const Ort::ConstValue& SA, const Ort::ConstValue& SS, const Ort::ConstValue& RS,
                 const Ort::ConstValue& OC, const Ort::ConstValue& OV, const Ort::ConstValue& BI) {
  const auto sgs = shape_of(SG), grs = shape_of(GR), als = shape_of(AL);
  BinShape s{};
  s.K = K, s.M = M;
  s.bs = bs;
  s.nb = (s.K + bs - 1) / bs;
  s.rowb = (s.K + 7) / 8;
  if (sgs.size() != 2 || sgs[1] != s.rowb)
    throw Error("signs must be uint8 (N, " + std::to_string(s.rowb) + ") for K=" + std::to_string(s.K));
  s.N = sgs[0];
  if (grs != sgs) throw Error("group must have the shape of signs (one bit per column)");
  if (als.size() != 3 || als[0] != s.N || als[1] != s.nb || als[2] != 4)
    throw Error("alphas must be float16 (" + std::to_string(s.N) + ", " + std::to_string(s.nb) + ", 4)");
  if (present(MU) && shape_of(MU) != als) throw Error("mus must have the shape of alphas");
  if (present(SA)) {
    s.S = shape_of(SA)[0];
    s.sb = (s.S + 7) / 8;
    if (!present(RS) || shape_of(RS) != std::vector<int64_t>{s.N, s.sb} || !present(SS) ||
        shape_of(SS) != shape_of(RS))
      throw Error("salient_signs and residual_signs must be uint8 (N, " + std::to_string(s.sb) + ") for " +
                  std::to_string(s.S) + " salient columns");
  }
  if (present(OC)) {
    s.R = shape_of(OC)[0];
    if (!present(OV) || shape_of(OV) != std::vector<int64_t>{s.N, s.R})
      throw Error("outlier_vals must be float16 (N, " + std::to_string(s.R) + ")");
  }
  if (present(BI) && BI.GetTensorTypeAndShapeInfo().GetElementCount() != static_cast<size_t>(s.N))
    throw Error("bias must have N=" + std::to_string(s.N) + " elements");

  BinWork& w = call.w;
  w.s = s;
  w.x = x;
  w.signs = SG.GetTensorData<uint8_t>();
  w.group = GR.GetTensorData<uint8_t>();
  w.alphas = reinterpret_cast<const uint16_t*>(AL.GetTensorRawData());
  w.mus = present(MU) ? reinterpret_cast<const uint16_t*>(MU.GetTensorRawData()) : nullptr;
  w.sal = s.S ? SA.GetTensorData<int32_t>() : nullptr;
  w.res = s.S ? RS.GetTensorData<uint8_t>() : nullptr;
  w.sal_signs = s.S ? SS.GetTensorData<uint8_t>() : nullptr;
  w.out_cols = s.R ? OC.GetTensorData<int32_t>() : nullptr;
  w.out_vals = s.R ? reinterpret_cast<const uint16_t*>(OV.GetTensorRawData()) : nullptr;
  w.bias = present(BI) ? BI.GetTensorData<float>() : nullptr;
  for (int64_t j = 0; j < s.S; ++j)
    if (w.sal[j] < 0 || w.sal[j] >= s.K) throw Error("salient_cols holds a column outside 0..K-1");
  for (int64_t j = 0; j < s.R; ++j)
    if (w.out_cols[j] < 0 || w.out_cols[j] >= s.K) throw Error("outlier_cols holds a column outside 0..K-1");
  call.tasks = s.M == 0 ? 0 : static_cast<size_t>((s.N + ROWS_PER_TASK - 1) / ROWS_PER_TASK);
  if (s.M > GEMV_MAX_ROWS || s.M == 0) return;
  w.fast = bs % 8 == 0 && s.K % 8 == 0;
  if (w.fast) {  // the regular columns' view of x: salient and outlier columns zeroed (added one by one)
    call.xr.assign(w.x, w.x + s.M * s.K);
    for (int64_t m = 0; m < s.M; ++m) {
      for (int64_t j = 0; j < s.S; ++j) call.xr[m * s.K + w.sal[j]] = 0.0f;
      for (int64_t j = 0; j < s.R; ++j) call.xr[m * s.K + w.out_cols[j]] = 0.0f;
    }
    w.xr = call.xr.data();
  }
  if (w.fast && s.S) {  // x at the salient columns and their blocks, padded to whole 8-column steps
    w.S8 = (s.S + 7) / 8 * 8;
    call.xsal.assign(s.M * w.S8, 0.0f);
    call.blk.assign(w.S8, 0);
    call.hi.assign(w.S8, 0);
    for (int64_t j = 0; j < s.S; ++j) {
      const int64_t b = w.sal[j] / bs;
      call.blk[j] = s.nb <= 16 ? sal_lane(b) : static_cast<int32_t>(b);
      call.hi[j] = b >= 8 ? -1 : 0;
      for (int64_t m = 0; m < s.M; ++m) call.xsal[m * w.S8 + j] = w.x[m * s.K + w.sal[j]];
    }
    if (s.nb > 64) w.fast = false;  // the per-row alpha buffer holds 64 blocks (8192 columns at b128)
    w.xs = call.xsal.data();
    w.sal_blk = call.blk.data();
    w.sal_hi = call.hi.data();
  }
  // int8 activations: whole 32-column steps per block, 16-bit sums that cannot overflow, no means
  if (w.fast && accuracy_level == 4 && bs % 32 == 0 && bs <= 4096 && s.K % 32 == 0 && !w.mus) quantize_blocks(call);
}

void run_bin(Ort::KernelContext& ctx, std::vector<BinCall>& calls) {
  run_batch<BinCall, bin_gemv_task, bin_gemm_task>(ctx, calls);
}

// accuracy_level: optional, 0 (exact) when absent; 4 = int8 activations in the GEMV (bin_rows_q8)
int64_t accuracy_level_of(const Ort::ConstKernelInfo& ki) {
  try {
    return ki.GetAttribute<int64_t>("accuracy_level");
  } catch (const Ort::Exception&) {
    return 0;
  }
}

std::vector<int64_t> accuracy_levels_of(const Ort::ConstKernelInfo& ki, size_t linears, const std::string& node) {
  std::vector<int64_t> v;
  try {
    v = ki.GetAttributes<int64_t>("accuracy_level");
  } catch (const Ort::Exception&) {
    return std::vector<int64_t>(linears, 0);
  }
  if (v.size() != linears) throw Error(node + ": accuracy_level must list one value per linear");
  return v;
}

struct BinKernel {
  int64_t bs, level;

  BinKernel(const OrtApi&, const OrtKernelInfo* info) {
    Ort::ConstKernelInfo ki(info);
    bs = ki.GetAttribute<int64_t>("block_size");
    if (bs < 1) throw Error("BinaryMatMul " + ki.GetNodeName() + ": block_size must be >= 1");
    level = accuracy_level_of(ki);
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) { return compute_status(*this, context, "BinaryMatMul"); }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const size_t nin = ctx.GetInputCount();
    auto in = [&](size_t i) -> Ort::ConstValue { return i < nin ? ctx.GetInput(i) : Ort::ConstValue(nullptr); };
    Ort::ConstValue X = in(0);
    const auto xs = shape_of(X);
    if (xs.empty()) throw Error("x must have at least one dimension");
    std::vector<BinCall> calls(1);
    prepare_bin(calls[0], bs, level, X.GetTensorData<float>(), rows_of(xs), xs.back(), in(1), in(2), in(3), in(4), in(5),
                in(6), in(7), in(8), in(9), in(10));
    std::vector<int64_t> ys(xs.begin(), xs.end() - 1);
    ys.push_back(calls[0].w.s.N);
    calls[0].w.y = ctx.GetOutput(0, ys).GetTensorMutableData<float>();
    run_bin(ctx, calls);
  }
};

// BinaryLinears: several BiLLM linears of one input in one node, as VQLinears: x, then for each linear its ten
// BinaryMatMul inputs (signs .. bias; an empty tensor for an absent one); attribute block_size: one per linear;
// activation none or silu_mul.
constexpr int BIN_PARTS = 10;

// what the two multi-linear kernels share: the activation, the input layout (x, then PARTS inputs per linear),
// per-linear errors, outputs and the SiLU gate. TKernel gives kName, linears(), prepare(call, i, x, M, K, in) with
// in(j) the linear's j-th input, and run(ctx, calls).
template <typename TKernel, typename TCall, int PARTS>
struct LinearsKernel {
  bool gated = false;

  void read_activation(const Ort::ConstKernelInfo& ki, size_t linears, const std::string& node) {
    std::string act = "none";
    try {
      act = ki.GetAttribute<std::string>("activation");
    } catch (const Ort::Exception&) {
    }
    if (act != "none" && act != "silu_mul") throw Error(node + ": activation must be none or silu_mul, not " + act);
    gated = act == "silu_mul";
    if (gated && linears != 2) throw Error(node + ": silu_mul takes exactly two linears (gate, up)");
  }

  // outputs for the prepared calls, which then run; the gate: silu(y0) * y1 into one output
  void finish(Ort::KernelContext& ctx, const std::vector<int64_t>& xs, std::vector<TCall>& calls) {
    std::vector<int64_t> ys(xs.begin(), xs.end() - 1);
    ys.push_back(0);
    if (!gated) {
      for (size_t i = 0; i < calls.size(); ++i) {
        ys.back() = calls[i].w.s.N;
        calls[i].w.y = ctx.GetOutput(i, ys).GetTensorMutableData<float>();
      }
      TKernel::run(ctx, calls);
      return;
    }
    const int64_t M = rows_of(xs), N = calls[0].w.s.N;
    if (calls[1].w.s.N != N) throw Error("silu_mul: the two linears have different widths");
    std::vector<float> gate(M * N), up(M * N);
    calls[0].w.y = gate.data(), calls[1].w.y = up.data();
    ys.back() = N;
    float* y = ctx.GetOutput(0, ys).GetTensorMutableData<float>();
    TKernel::run(ctx, calls);
    for (int64_t i = 0; i < M * N; ++i) y[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) { return compute_status(*this, context, TKernel::kName); }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const TKernel& k = static_cast<const TKernel&>(*this);
    const size_t L = k.linears();
    if (ctx.GetInputCount() != 1 + PARTS * L)
      throw Error("expected x and " + std::to_string(PARTS) + " inputs for each of " + std::to_string(L) +
                  " linears, got " + std::to_string(ctx.GetInputCount()) + " inputs");
    Ort::ConstValue X = ctx.GetInput(0);
    const auto xs = shape_of(X);
    if (xs.empty()) throw Error("x must have at least one dimension");
    std::vector<TCall> calls(L);
    for (size_t i = 0; i < L; ++i) {
      auto in = [&](size_t j) { return ctx.GetInput(1 + PARTS * i + j); };
      try {
        k.prepare(calls[i], i, X.GetTensorData<float>(), rows_of(xs), xs.back(), in);
      } catch (const Error& e) {
        throw Error("linear " + std::to_string(i) + ": " + e.what());
      }
    }
    finish(ctx, xs, calls);
  }
};

struct BinaryLinearsKernel : LinearsKernel<BinaryLinearsKernel, BinCall, BIN_PARTS> {
  static constexpr const char* kName = "BinaryLinears";
  std::vector<int64_t> bs, levels;

  BinaryLinearsKernel(const OrtApi&, const OrtKernelInfo* info) {
    Ort::ConstKernelInfo ki(info);
    bs = ki.GetAttributes<int64_t>("block_size");
    const std::string node = "BinaryLinears " + ki.GetNodeName();
    if (bs.empty()) throw Error(node + ": block_size must list one value per linear");
    for (auto b : bs)
      if (b < 1) throw Error(node + ": block_size must be >= 1");
    levels = accuracy_levels_of(ki, bs.size(), node);
    read_activation(ki, bs.size(), node);
  }

  size_t linears() const { return bs.size(); }
  template <typename In>
  void prepare(BinCall& call, size_t i, const float* x, int64_t M, int64_t K, In in) const {
    prepare_bin(call, bs[i], levels[i], x, M, K, in(0), in(1), in(2), in(3), in(4), in(5), in(6), in(7), in(8), in(9));
  }
  static void run(Ort::KernelContext& ctx, std::vector<BinCall>& calls) { run_bin(ctx, calls); }
};

struct VQLinearsKernel : LinearsKernel<VQLinearsKernel, VQCall, VQ_PARTS> {
  static constexpr const char* kName = "VQLinears";
  std::vector<int64_t> b, d, g;

  VQLinearsKernel(const OrtApi&, const OrtKernelInfo* info) {
    Ort::ConstKernelInfo ki(info);
    b = ki.GetAttributes<int64_t>("index_bits");
    d = ki.GetAttributes<int64_t>("vec_dim");
    g = ki.GetAttributes<int64_t>("group_size");
    const std::string node = "VQLinears " + ki.GetNodeName();
    if (b.empty() || d.size() != b.size() || g.size() != b.size())
      throw Error(node + ": index_bits, vec_dim and group_size must list one value per linear");
    for (size_t i = 0; i < b.size(); ++i) check_vq_attrs(b[i], d[i], g[i], node);
    read_activation(ki, b.size(), node);
  }

  size_t linears() const { return b.size(); }
  template <typename In>
  void prepare(VQCall& call, size_t i, const float* x, int64_t M, int64_t K, In in) const {
    prepare_vq(call, b[i], d[i], g[i], x, M, K, in(0), in(1), in(2), in(3), in(4), in(5), in(6));
  }
  static void run(Ort::KernelContext& ctx, std::vector<VQCall>& calls) { run_vq(ctx, calls); }
};

struct BinaryMatMulOp : LowbitOp<BinaryMatMulOp, BinKernel> {
  static constexpr const char* kName = "BinaryMatMul";
  size_t GetInputTypeCount() const { return 11; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    switch (i) {
      case 0: case 10: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
      case 1: case 2: case 6: case 7: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
      case 5: case 8: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
      default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    }
  }
};

BinaryMatMulOp g_bin_op;

// the multi-linear ops: x, then the linears' inputs as one variadic list of mixed types; one output per linear
// (or the gate's one)
template <typename TOp, typename TKernel>
struct LinearsOp : LowbitOp<TOp, TKernel> {
  size_t GetInputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return i == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i == 0 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_VARIADIC;
  }
  bool GetVariadicInputHomogeneity() const { return false; }  // uint8 codes and planes, float16 tables, int32 columns
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t) const { return INPUT_OUTPUT_VARIADIC; }
};

struct VQLinearsOp : LinearsOp<VQLinearsOp, VQLinearsKernel> {
  static constexpr const char* kName = "VQLinears";
};

VQLinearsOp g_vq_linears_op;

struct BinaryLinearsOp : LinearsOp<BinaryLinearsOp, BinaryLinearsKernel> {
  static constexpr const char* kName = "BinaryLinears";
};

BinaryLinearsOp g_bin_linears_op;

}  // namespace

extern "C" {

// the entry point ONNX Runtime calls (SessionOptions.register_custom_ops_library)
__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                 const OrtApiBase* api_base) {
  g_api = api_base->GetApi(ORT_API_VERSION);
  if (!g_api) return nullptr;  // cannot even report: an ONNX Runtime older than these headers
  Ort::InitApi(g_api);
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* st = g_api->CreateCustomOpDomain("lowbit.ort", &domain)) return st;
  if (OrtStatus* st = g_api->CustomOpDomain_Add(domain, &g_vq_op)) return st;
  if (OrtStatus* st = g_api->CustomOpDomain_Add(domain, &g_vq_linears_op)) return st;
  if (OrtStatus* st = g_api->CustomOpDomain_Add(domain, &g_bin_op)) return st;
  if (OrtStatus* st = g_api->CustomOpDomain_Add(domain, &g_bin_linears_op)) return st;
  return g_api->AddCustomOpDomain(options, domain);
}

// the ops' contract version (lowbit.runtime.ort_ops.VERSION, recorded in export.json)
__attribute__((visibility("default"))) int lowbit_ort_ops_version() { return 2; }
}
