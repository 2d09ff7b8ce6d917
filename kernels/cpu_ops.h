// CPU operators with fp32 activations and accumulators. Weights may be F32, F16 or BF16 and
// are widened inside the dot product. Every operator computes each token's result in the same
// order whatever the batch size or thread count (batch invariance).
#pragma once

#include <cstdint>

#include "kernels/dtype.h"
#include "kernels/thread_pool.h"

namespace moed::kernels {

// How a weight matrix's values are stored.
enum class Quantization {
  kNone,         // `dtype` values, row-major
  kInt8PerRow,   // int8 row-major; value = q * scales[row]
  kInt4Grouped,  // 4-bit, groups of `group_size` columns; value = (q - 8) * scales[row * groups +
                 // g]
};

// A row-major [rows, cols] weight matrix in host memory.
//
// Int4 layout: each row is cols / 2 bytes; within a group of G columns starting at g0, byte
// g0 / 2 + j holds column g0 + j in its low nibble and column g0 + j + G / 2 in its high
// nibble, so that a run of bytes unpacks into two runs of consecutive columns.
struct WeightMatrix {
  DType dtype = DType::kF32;
  const void* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  Quantization quantization = Quantization::kNone;
  const float* scales = nullptr;
  int64_t group_size = 0;  // int4 only

  // Bytes of `data` (without the scales).
  int64_t DataBytes() const;
};

namespace cpu {

enum class Isa { kScalar, kAvx2, kAvx512 };
// The best instruction set this processor supports (checked once per call; cheap).
Isa DetectIsa();
const char* IsaName(Isa isa);

// y[t, r] = sum_c w[r, c] * x[t, c] for t < n; x is [n, w.cols], y is [n, w.rows].
void MatMul(const WeightMatrix& w, const float* x, int64_t n, float* y, ThreadPool& pool);
// The same with an explicit instruction set (for tests and benchmarks).
void MatMulWithIsa(Isa isa, const WeightMatrix& w, const float* x, int64_t n, float* y,
                   ThreadPool& pool);

// y[t] = x[t] * weight / sqrt(mean(x[t]^2) + eps) over rows of `width`; y may alias x.
void RmsNorm(const float* x, const float* weight, int64_t n, int64_t width, float eps, float* y);

// Rotate-half ("NEOX") rotary embedding, in place, on x[t, head, :] of `head_dim`, with the
// position of token t.
void RopeNeox(float* x, int64_t n, int64_t heads, int64_t head_dim, const int64_t* positions,
              double theta);

// Causal attention of n query tokens against a cache of keys/values [len, kv_heads, head_dim]
// (fp32). Query token t sits at position positions[t] and sees cache rows 0..positions[t].
// q is [n, heads, head_dim]; out is [n, heads, head_dim].
void Attention(const float* q, int64_t n, int64_t heads, int64_t kv_heads, int64_t head_dim,
               const float* k_cache, const float* v_cache, const int64_t* positions, float* out,
               ThreadPool& pool);

// out[i] = silu(gate[i]) * up[i].
void SiluMul(const float* gate, const float* up, int64_t count, float* out);

// Widens `count` weights to fp32.
void ToFloat(DType dtype, const void* data, int64_t count, float* out);

// Quantizes rows of fp32 weights: int8 with one scale per row (max |w| / 127), int4 with one
// scale per group of `group_size` columns (max |w| / 7), rounding to nearest. `group_size`
// must be even and divide `cols`.
void QuantizeInt8(const float* w, int64_t rows, int64_t cols, int8_t* q, float* scales);
void QuantizeInt4(const float* w, int64_t rows, int64_t cols, int64_t group_size, uint8_t* packed,
                  float* scales);
// The value a quantized matrix stores at (row, col).
float DequantizedValue(const WeightMatrix& w, int64_t row, int64_t col);

}  // namespace cpu
}  // namespace moed::kernels
