// The CUDA backend's kernels, written once as plain C++ that both nvcc (for the device) and
// the host compiler (for the host-run grid the tests use) compile. No CUDA, Abseil or standard
// library types: each kernel is a body struct run either by a __global__ wrapper
// (cuda_kernels.cu) or by a plain loop over the same launch grid (host_grid_backend.cc), and
// each operator is a Run* template that picks the grid and chains the bodies, so both
// launchers execute exactly the same indexing.
//
// Two kinds of body:
//   element bodies: operator()(i) for i < count, one thread each, 256 threads per block;
//   warp bodies:    Partial(item, lane) for the 32 lanes of a warp, summed with the xor
//                   butterfly (__shfl_xor_sync on the device, the same order on the host), then
//                   Finish(item, lane, sum) on every lane; 8 warps per block.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MOED_HD __host__ __device__ inline
#else
#define MOED_HD inline
#endif

namespace moed::kernels::grid {

inline constexpr int kBlockThreads = 256;
inline constexpr int kWarpSize = 32;
inline constexpr int kWarpsPerBlock = kBlockThreads / kWarpSize;
inline constexpr int kMaxExperts = 1024;  // router_topk keeps no per-expert state; a sanity bound
inline constexpr int kMaxGroups = 64;     // router_topk's kept groups are one 64-bit mask

// Weight formats, as kernels::WeightFormat numbers them.
enum Format : int { kF32 = 0, kF16 = 1, kBF16 = 2, kInt8 = 3, kInt4 = 4 };

struct Matrix {
  int format = kF32;
  const void* data = nullptr;
  int64_t rows = 0, cols = 0;
  const float* scales = nullptr;
  int64_t group_size = 0;
};

struct Kv {
  float* const* block_table = nullptr;
  const int32_t* table_start = nullptr;
  const int64_t* positions = nullptr;
  int64_t block_size = 0, kv_heads = 0, head_dim = 0, layer_floats = 0;
  int64_t value_width = 0;  // kv_heads * the value part's floats per head
};

MOED_HD float BitsToFloat(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float f;
  __builtin_memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

MOED_HD float HalfToFloat(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu;
  if (exponent == 0x1F) return BitsToFloat(sign | 0x7F800000u | (mantissa << 13));
  if (exponent != 0) return BitsToFloat(sign | ((exponent + 112) << 23) | (mantissa << 13));
  // Zero or subnormal: mantissa * 2^-24, exact in fp32.
  float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
  return sign != 0 ? -magnitude : magnitude;
}

// Weight (r, c) of an unquantized matrix or the quantized code times its scale.
MOED_HD float WeightAt(const Matrix& w, int64_t r, int64_t c) {
  switch (w.format) {
    case kF32:
      return static_cast<const float*>(w.data)[r * w.cols + c];
    case kF16:
      return HalfToFloat(static_cast<const uint16_t*>(w.data)[r * w.cols + c]);
    case kBF16:
      return BitsToFloat(static_cast<uint32_t>(static_cast<const uint16_t*>(w.data)[r * w.cols + c])
                         << 16);
    case kInt8:
      return static_cast<float>(static_cast<const int8_t*>(w.data)[r * w.cols + c]) * w.scales[r];
    default: {  // kInt4: see kernels/weights.h for the nibble layout
      const int64_t g = w.group_size, gi = c / g, within = c % g, half = g / 2;
      uint8_t byte =
          static_cast<const uint8_t*>(w.data)[r * (w.cols / 2) + gi * half + within % half];
      int q = within < half ? (byte & 0xF) : (byte >> 4);
      return static_cast<float>(q - 8) * w.scales[r * (w.cols / g) + gi];
    }
  }
}

MOED_HD float* KvRow(const Kv& kv, int32_t start, int layer, int64_t position, bool values) {
  const int64_t width = kv.kv_heads * kv.head_dim;
  float* block = kv.block_table[start + position / kv.block_size];
  return block + layer * kv.layer_floats + (values ? kv.block_size * width : 0) +
         (position % kv.block_size) * (values ? kv.value_width : width);
}

// ---- element bodies ----------------------------------------------------------------------

struct EmbedBody {
  Matrix table;
  const int32_t* tokens;
  float* out;
  MOED_HD void operator()(int64_t i) const {
    const int64_t t = i / table.cols, c = i % table.cols;
    out[i] = WeightAt(table, tokens[t], c);
  }
};

struct AddBiasBody {
  float* x;
  const float* bias;
  int64_t width;
  MOED_HD void operator()(int64_t i) const { x[i] += bias[i % width]; }
};

// One (token, head, pair) rotation; the angle in double, as the CPU computes it.
struct RopeBody {
  float* x;
  int64_t heads, head_dim;
  const int64_t* positions;
  double theta;
  MOED_HD void operator()(int64_t i) const;
};

// One thread per float of a token's key and value row together.
struct WriteKvBody {
  Kv kv;
  int layer;
  const float* k;
  const float* v;
  MOED_HD void operator()(int64_t i) const {
    const int64_t width = kv.kv_heads * kv.head_dim, row = width + kv.value_width;
    const int64_t t = i / row, c = i % row;
    if (c < width) {
      KvRow(kv, kv.table_start[t], layer, kv.positions[t], false)[c] = k[t * width + c];
    } else {
      KvRow(kv, kv.table_start[t], layer, kv.positions[t], true)[c - width] =
          v[t * kv.value_width + c - width];
    }
  }
};

// One (token, head, pair) rotation of a slice of each head from a frequency table.
struct RotaryBody {
  float* x;
  int64_t heads, head_stride, offset, dims;
  bool pairs;
  const double* inv_freq;
  double magnitude;
  const int64_t* positions;
  MOED_HD void operator()(int64_t i) const;
};

// MLA in three passes over the scratch [n, heads, 2, latent]:
// absorb: one thread per (token, head, latent element): the nope query through kv_b's key rows.
struct MlaAbsorbBody {
  const float* q;
  Matrix kv_b;
  int64_t heads, nope_dim, rope_dim, value_dim, latent;
  float* scratch;
  MOED_HD void operator()(int64_t i) const {
    const int64_t r = i % latent, th = i / latent, h = th % heads;
    const float* q_nope = q + th * (nope_dim + rope_dim);
    float sum = 0.0f;
    for (int64_t j = 0; j < nope_dim; ++j) {
      sum += q_nope[j] * WeightAt(kv_b, h * (nope_dim + value_dim) + j, r);
    }
    scratch[th * 2 * latent + r] = sum;
  }
};
// attend: one thread per (token, head): scores over the cached latents and rope keys, the
// softmax-weighted latent into the scratch's second half.
struct MlaLatentAttentionBody {
  Kv kv;
  int layer;
  const float* q;
  int64_t heads, nope_dim, rope_dim, latent;
  float scale;
  float* scratch;
  MOED_HD void operator()(int64_t item) const;
};
// expand: one thread per (token, head, value element): the weighted latent through kv_b's
// value rows.
struct MlaValueBody {
  Matrix kv_b;
  int64_t heads, nope_dim, value_dim, latent;
  const float* scratch;
  float* out;
  MOED_HD void operator()(int64_t i) const {
    const int64_t j = i % value_dim, th = i / value_dim, h = th % heads;
    const float* mixed = scratch + th * 2 * latent + latent;
    const int64_t row = h * (nope_dim + value_dim) + nope_dim + j;
    float sum = 0.0f;
    for (int64_t r = 0; r < latent; ++r) sum += WeightAt(kv_b, row, r) * mixed[r];
    out[i] = sum;
  }
};

// One thread per (token, head): max, sum of exponentials, weighted values (the CPU's order).
struct AttentionBody {
  Kv kv;
  int layer;
  const float* q;
  int64_t heads;
  float* out;
  MOED_HD void operator()(int64_t item) const;
};

// One thread per token: scores, then k passes picking the best unchosen eligible expert (a
// group is eligible when fewer than top_groups groups rank above it).
struct RouterTopKBody {
  const float* logits;
  int64_t experts, k;
  bool sigmoid;
  bool renormalize;
  float scale;
  const float* choice_bias;
  int64_t groups, top_groups;
  bool top_two_sum;
  int32_t* chosen;
  float* weights;
  MOED_HD float Score(const float* row, int64_t e, float max_logit, float total) const;
  MOED_HD float Choice(const float* row, int64_t e, float max_logit, float total) const {
    float score = Score(row, e, max_logit, total);
    return choice_bias != nullptr ? score + choice_bias[e] : score;
  }
  MOED_HD float GroupScore(const float* row, int64_t g, float max_logit, float total) const;
  // Bit g set when group g is among the top_groups best (all set without groups).
  MOED_HD uint64_t KeptGroups(const float* row, float max_logit, float total) const;
  MOED_HD void operator()(int64_t t) const;
};

struct SiluMulBody {
  const float* gate;
  const float* up;
  float* out;
  MOED_HD void operator()(int64_t i) const;
};

struct MoeCombineBody {
  const float* expert_out;
  const float* weights;
  int64_t k, width;
  float* out;
  MOED_HD void operator()(int64_t i) const {
    const int64_t t = i / width, c = i % width;
    float sum = 0.0f;
    for (int64_t r = 0; r < k; ++r) sum += weights[t * k + r] * expert_out[(t * k + r) * width + c];
    out[i] = sum;
  }
};

struct AddBody {
  float* acc;
  const float* x;
  MOED_HD void operator()(int64_t i) const { acc[i] += x[i]; }
};

struct SigmoidGatedAddBody {
  const float* gate_logits;
  const float* x;
  int64_t width;
  float* out;
  MOED_HD void operator()(int64_t i) const;
};

struct GatherRowsBody {
  const float* src;
  int64_t width;
  const int32_t* rows;
  float* dst;
  MOED_HD void operator()(int64_t i) const { dst[i] = src[rows[i / width] * width + i % width]; }
};

struct ScatterRowsBody {
  const float* src;
  int64_t width;
  const int32_t* rows;
  float* dst;
  MOED_HD void operator()(int64_t i) const { dst[rows[i / width] * width + i % width] = src[i]; }
};

// ---- warp bodies -------------------------------------------------------------------------

// item = row; lanes sum squares in double, then each lane scales its columns.
struct RmsNormBody {
  using Acc = double;
  const float* x;
  const float* weight;
  int64_t width;
  float eps;
  float* y;
  MOED_HD double Partial(int64_t row, int lane) const {
    double sum = 0;
    for (int64_t c = lane; c < width; c += kWarpSize) {
      double v = x[row * width + c];
      sum += v * v;
    }
    return sum;
  }
  MOED_HD void Finish(int64_t row, int lane, double sum) const;
};

// item = token * rows + row; lanes take columns lane, lane + 32, ...; lane 0 writes.
struct MatMulBody {
  using Acc = float;
  Matrix w;
  const float* x;
  float* y;
  MOED_HD float Partial(int64_t item, int lane) const {
    const int64_t t = item / w.rows, r = item % w.rows;
    const float* xt = x + t * w.cols;
    float sum = 0.0f;
    for (int64_t c = lane; c < w.cols; c += kWarpSize) sum += WeightAt(w, r, c) * xt[c];
    return sum;
  }
  MOED_HD void Finish(int64_t item, int lane, float sum) const {
    if (lane == 0) y[item] = sum;  // item = t * rows + r is y's row-major index
  }
};

// ---- operators: the grid each one runs and the bodies it chains ------------------------
// L provides Elementwise(count, body) and Warps(items, body).

template <class L>
void RunMatMul(L& l, const Matrix& w, const float* x, int64_t n, float* y) {
  l.Warps(n * w.rows, MatMulBody{w, x, y});
}

template <class L>
void RunSiluMul(L& l, const float* gate, const float* up, int64_t count, float* out) {
  l.Elementwise(count, SiluMulBody{gate, up, out});
}

template <class L>
void RunExpertFfn(L& l, const Matrix& gate, const Matrix& up, const Matrix& down, const float* x,
                  const int32_t* rows, int64_t m, float* out, const int32_t* out_rows,
                  float* scratch) {
  const int64_t width = gate.cols, inter = gate.rows;
  float* gathered = scratch;
  float* g = gathered + m * width;
  float* u = g + m * inter;
  float* d = u + m * inter;
  l.Elementwise(m * width, GatherRowsBody{x, width, rows, gathered});
  RunMatMul(l, gate, gathered, m, g);
  RunMatMul(l, up, gathered, m, u);
  RunSiluMul(l, g, u, m * inter, g);
  RunMatMul(l, down, g, m, d);
  l.Elementwise(m * width, ScatterRowsBody{d, width, out_rows, out});
}

// ---- bodies with math functions (std:: on the host, CUDA's on the device) ---------------

#if defined(__CUDA_ARCH__)
#define MOED_EXPF expf
#define MOED_SQRT sqrt
#define MOED_POW pow
#define MOED_COS cos
#define MOED_SIN sin
#else
#define MOED_EXPF std::exp
#define MOED_SQRT std::sqrt
#define MOED_POW std::pow
#define MOED_COS std::cos
#define MOED_SIN std::sin
#endif

// The largest of score(0..len-1) and the sum of exp(score(p) - largest): the attention bodies'
// softmax over cached positions, the scores recomputed rather than stored.
template <class Score>
MOED_HD void SoftmaxStats(int64_t len, const Score& score, float* max_score, double* total) {
  float largest = -3.402823466e38f;
  for (int64_t p = 0; p < len; ++p) {
    float s = score(p);
    if (s > largest) largest = s;
  }
  double sum = 0;
  for (int64_t p = 0; p < len; ++p) sum += MOED_EXPF(score(p) - largest);
  *max_score = largest;
  *total = sum;
}

MOED_HD void RopeBody::operator()(int64_t i) const {
  const int64_t half = head_dim / 2;
  const int64_t j = i % half, th = i / half, t = th / heads;
  double inv_freq = MOED_POW(theta, -2.0 * static_cast<double>(j) / static_cast<double>(head_dim));
  double angle = static_cast<double>(positions[t]) * inv_freq;
  float cos_a = static_cast<float>(MOED_COS(angle)), sin_a = static_cast<float>(MOED_SIN(angle));
  float* v = x + th * head_dim;
  float a = v[j], b = v[j + half];
  v[j] = a * cos_a - b * sin_a;
  v[j + half] = b * cos_a + a * sin_a;
}

MOED_HD void AttentionBody::operator()(int64_t item) const {
  const int64_t head_dim = kv.head_dim, t = item / heads, h = item % heads;
  const int64_t kv_head = h / (heads / kv.kv_heads), len = kv.positions[t] + 1;
  const int32_t start = kv.table_start[t];
  const float scale = static_cast<float>(1.0 / MOED_SQRT(static_cast<double>(head_dim)));
  const float* qv = q + item * head_dim;
  auto score = [&](int64_t p) {
    const float* kp = KvRow(kv, start, layer, p, false) + kv_head * head_dim;
    float dot = 0.0f;
    for (int64_t i = 0; i < head_dim; ++i) dot += qv[i] * kp[i];
    return dot * scale;
  };
  float max_score;
  double total;
  SoftmaxStats(len, score, &max_score, &total);
  float* o = out + item * head_dim;
  for (int64_t i = 0; i < head_dim; ++i) o[i] = 0.0f;
  const float inv_total = static_cast<float>(1.0 / total);
  for (int64_t p = 0; p < len; ++p) {
    const float weight = MOED_EXPF(score(p) - max_score) * inv_total;
    const float* vp = KvRow(kv, start, layer, p, true) + kv_head * head_dim;
    for (int64_t i = 0; i < head_dim; ++i) o[i] += weight * vp[i];
  }
}

MOED_HD float RouterTopKBody::Score(const float* row, int64_t e, float max_logit,
                                    float total) const {
  if (sigmoid) return 1.0f / (1.0f + MOED_EXPF(-row[e]));
  return MOED_EXPF(row[e] - max_logit) / total;
}

MOED_HD float RouterTopKBody::GroupScore(const float* row, int64_t g, float max_logit,
                                         float total) const {
  const int64_t size = experts / groups;
  float first = -3.402823466e38f, second = -3.402823466e38f;
  for (int64_t e = g * size; e < (g + 1) * size; ++e) {
    float c = Choice(row, e, max_logit, total);
    if (c > first) {
      second = first;
      first = c;
    } else if (c > second) {
      second = c;
    }
  }
  return top_two_sum ? first + second : first;
}

MOED_HD uint64_t RouterTopKBody::KeptGroups(const float* row, float max_logit, float total) const {
  if (groups <= 1) return ~uint64_t{0};
  float score[kMaxGroups];
  for (int64_t g = 0; g < groups; ++g) score[g] = GroupScore(row, g, max_logit, total);
  uint64_t kept = 0;
  for (int64_t g = 0; g < groups; ++g) {
    int64_t above = 0;
    for (int64_t other = 0; other < groups; ++other) {
      if (score[other] > score[g] || (score[other] == score[g] && other < g)) ++above;
    }
    if (above < top_groups) kept |= uint64_t{1} << g;
  }
  return kept;
}

MOED_HD void RouterTopKBody::operator()(int64_t t) const {
  const float* row = logits + t * experts;
  float max_logit = row[0];
  for (int64_t e = 1; e < experts; ++e) max_logit = row[e] > max_logit ? row[e] : max_logit;
  float total = 0.0f;
  if (!sigmoid) {
    for (int64_t e = 0; e < experts; ++e) total += MOED_EXPF(row[e] - max_logit);
  }
  const int64_t group_size = experts / groups;
  const uint64_t kept = KeptGroups(row, max_logit, total);
  float selected = 0.0f;
  for (int64_t r = 0; r < k; ++r) {
    int32_t best = -1;
    float best_choice = 0.0f;
    for (int64_t e = 0; e < experts; ++e) {
      bool taken = false;
      for (int64_t s = 0; s < r; ++s) taken = taken || chosen[t * k + s] == e;
      if (taken || ((kept >> (e / group_size)) & 1) == 0) continue;
      float c = Choice(row, e, max_logit, total);
      if (best < 0 || c > best_choice) {  // strict: ties keep the lower id
        best = static_cast<int32_t>(e);
        best_choice = c;
      }
    }
    chosen[t * k + r] = best;
    const float score = Score(row, best, max_logit, total);
    weights[t * k + r] = score;
    selected += score;
  }
  for (int64_t r = 0; r < k; ++r) {
    const float weight = renormalize ? weights[t * k + r] / selected : weights[t * k + r];
    weights[t * k + r] = weight * scale;
  }
}

MOED_HD void RotaryBody::operator()(int64_t i) const {
  const int64_t half = dims / 2;
  const int64_t j = i % half, th = i / half, t = th / heads;
  double angle = static_cast<double>(positions[t]) * inv_freq[j];
  float cos_a = static_cast<float>(MOED_COS(angle) * magnitude);
  float sin_a = static_cast<float>(MOED_SIN(angle) * magnitude);
  float* v = x + th * head_stride + offset;
  const int64_t a_at = pairs ? 2 * j : j, b_at = pairs ? 2 * j + 1 : j + half;
  float a = v[a_at], b = v[b_at];
  v[a_at] = a * cos_a - b * sin_a;
  v[b_at] = b * cos_a + a * sin_a;
}

MOED_HD void MlaLatentAttentionBody::operator()(int64_t item) const {
  const int64_t t = item / heads, len = kv.positions[t] + 1;
  const int32_t start = kv.table_start[t];
  const float* absorbed = scratch + item * 2 * latent;
  float* mixed = scratch + item * 2 * latent + latent;
  const float* q_rope = q + item * (nope_dim + rope_dim) + nope_dim;
  auto score = [&](int64_t p) {
    const float* cp = KvRow(kv, start, layer, p, false);
    const float* kp = KvRow(kv, start, layer, p, true);
    float dot = 0.0f;
    for (int64_t r = 0; r < latent; ++r) dot += absorbed[r] * cp[r];
    float rope_dot = 0.0f;
    for (int64_t i = 0; i < rope_dim; ++i) rope_dot += q_rope[i] * kp[i];
    return (dot + rope_dot) * scale;
  };
  float max_score;
  double total;
  SoftmaxStats(len, score, &max_score, &total);
  for (int64_t r = 0; r < latent; ++r) mixed[r] = 0.0f;
  const float inv_total = static_cast<float>(1.0 / total);
  for (int64_t p = 0; p < len; ++p) {
    const float weight = MOED_EXPF(score(p) - max_score) * inv_total;
    const float* cp = KvRow(kv, start, layer, p, false);
    for (int64_t r = 0; r < latent; ++r) mixed[r] += weight * cp[r];
  }
}

MOED_HD void SiluMulBody::operator()(int64_t i) const {
  float g = gate[i];
  out[i] = g / (1.0f + MOED_EXPF(-g)) * up[i];
}

MOED_HD void SigmoidGatedAddBody::operator()(int64_t i) const {
  float g = 1.0f / (1.0f + MOED_EXPF(-gate_logits[i / width]));
  out[i] += g * x[i];
}

MOED_HD void RmsNormBody::Finish(int64_t row, int lane, double sum) const {
  float scale = static_cast<float>(1.0 / MOED_SQRT(sum / static_cast<double>(width) + eps));
  for (int64_t c = lane; c < width; c += kWarpSize) {
    y[row * width + c] = x[row * width + c] * scale * weight[c];
  }
}

}  // namespace moed::kernels::grid
