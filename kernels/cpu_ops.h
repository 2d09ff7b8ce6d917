// CPU operators with fp32 activations and accumulators. Weights may be F32, F16 or BF16 and
// are widened inside the dot product. Every operator computes each token's result in the same
// order whatever the batch size or thread count (batch invariance).
#pragma once

#include <cstdint>

#include "kernels/backend.h"
#include "kernels/thread_pool.h"
#include "kernels/weights.h"

namespace moed::kernels {

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

// Causal attention of n query tokens over the paged KV cache (see PagedKv); the same loop
// order for every token whatever the batch.
void PagedAttention(const PagedKv& kv, int layer, const float* q, int64_t n, int64_t heads,
                    float* out, ThreadPool& pool);
// Writes k[t], v[t] at token t's position in its sequence's blocks.
void PagedWriteKv(const PagedKv& kv, int layer, const float* k, const float* v, int64_t n);

// The rotary embedding `spec` describes (see RotarySpec), in place.
void Rotary(float* x, int64_t n, const RotarySpec& spec, const int64_t* positions);

// Multi-head Latent Attention in the absorbed form (see Stream::MlaAttention); parallel over
// heads, each (token, head) computed in the same order whatever the batch.
void MlaAttention(const PagedKv& kv, int layer, const float* q, int64_t n, const MlaShape& shape,
                  const WeightMatrix& kv_b, float* out, ThreadPool& pool);

// The router's choice for n tokens (see RouterSpec).
void RouterTopK(const float* logits, int64_t n, int64_t experts, int64_t k, const RouterSpec& spec,
                int32_t* chosen, float* weights);

// silu(x gate^T) * (x up^T) into gate_out (up_out is scratch of the same size): both matmuls
// and the product in one parallel region, each thread on the same rows of both. Bitwise what
// MatMul, MatMul and SiluMul give.
void SwiGlu(const WeightMatrix& gate, const WeightMatrix& up, const float* x, int64_t n,
            float* gate_out, float* up_out, ThreadPool& pool);
void SwiGluWithIsa(Isa isa, const WeightMatrix& gate, const WeightMatrix& up, const float* x,
                   int64_t n, float* gate_out, float* up_out, ThreadPool& pool);
// out[i] = silu(gate[i]) * up[i].
void SiluMul(const float* gate, const float* up, int64_t count, float* out);

}  // namespace cpu
}  // namespace moed::kernels
