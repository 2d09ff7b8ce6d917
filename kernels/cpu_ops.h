// CPU operators with fp32 activations and accumulators. Weights may be F32, F16 or BF16 and
// are widened inside the dot product. Every operator computes each token's result in the same
// order whatever the batch size or thread count (batch invariance).
#pragma once

#include <cstdint>

#include "kernels/dtype.h"
#include "kernels/thread_pool.h"

namespace moed::kernels {

// A row-major [rows, cols] weight matrix in host memory.
struct WeightMatrix {
  DType dtype = DType::kF32;
  const void* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
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

}  // namespace cpu
}  // namespace moed::kernels
