#include "kernels/cpu_ops.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "kernels/quant.h"

namespace moed::kernels::cpu {
namespace {

// Rows of w and tokens of x computed together: each w row is read once per token block and
// each x row once per row block, and the independent accumulators hide FMA latency (see
// kernels/matmul_block.inc for why the block shape never changes a result).
constexpr int kRowBlock = 4;
constexpr int kTokenBlock = 2;
constexpr int64_t kPrefetchElements = 256;
// A matmul over few tokens is bound by reading its weights. Each thread then reads its rows one
// after another, one sequential stream: several rows read side by side (the 4-row blocks that
// reuse each activation load when compute matters) are several short streams, which the
// hardware prefetcher follows worse. On a 2-vCPU AMD EPYC a 1-token GEMV read 21.6 GB/s a row
// at a time against 11.7 in 4-row blocks (moed-bench-cpu). A row at a time loads every token's
// activations once per row, so this holds only while they stay in L1: with 3 tokens of 2,816
// columns (33 KiB) 4-row blocks were faster again. Results do not depend on the block shape.
constexpr int64_t kNarrowTokens = 4;
constexpr int64_t kNarrowActivationBytes = 24 << 10;
bool ReadRowByRow(int64_t n, int64_t cols) {
  return n == 1 || (n <= kNarrowTokens &&
                    n * cols * static_cast<int64_t>(sizeof(float)) <= kNarrowActivationBytes);
}

// ---- scalar ---------------------------------------------------------------------------------

void MatMulRowsScalarQuantized(const WeightMatrix& w, const float* x, int64_t n, float* y,
                               int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t t = 0; t < n; ++t) {
      const float* xt = x + t * w.cols;
      float sum = 0;
      if (w.quantization == Quantization::kInt8PerRow) {
        const int8_t* row = static_cast<const int8_t*>(w.data) + r * w.cols;
        for (int64_t c = 0; c < w.cols; ++c) sum += static_cast<float>(row[c]) * xt[c];
        sum *= w.scales[r];
      } else {
        const int64_t g = w.group_size, groups = w.cols / g;
        const uint8_t* row = static_cast<const uint8_t*>(w.data) + r * (w.cols / 2);
        for (int64_t gi = 0; gi < groups; ++gi) {
          float group_sum = 0;
          for (int64_t j = 0; j < g / 2; ++j) {
            uint8_t byte = row[gi * g / 2 + j];
            group_sum += static_cast<float>((byte & 0xF) - 8) * xt[gi * g + j];
            group_sum += static_cast<float>((byte >> 4) - 8) * xt[gi * g + g / 2 + j];
          }
          sum += group_sum * w.scales[r * groups + gi];
        }
      }
      y[t * w.rows + r] = sum;
    }
  }
}

void MatMulRowsScalar(const WeightMatrix& w, const float* x, int64_t n, float* y, int64_t r0,
                      int64_t r1) {
  if (w.quantization != Quantization::kNone) return MatMulRowsScalarQuantized(w, x, n, y, r0, r1);
  for (int64_t r = r0; r < r1; ++r) {
    const char* row = static_cast<const char*>(w.data) + r * w.cols * DTypeSize(w.dtype);
    for (int64_t t = 0; t < n; ++t) {
      const float* xt = x + t * w.cols;
      float sum = 0;
      for (int64_t c = 0; c < w.cols; ++c) sum += LoadAsF32(w.dtype, row, c) * xt[c];
      y[t * w.rows + r] = sum;
    }
  }
}

// ---- SIMD: one Block per instruction set, from kernels/matmul_block.inc ----------------------
// Each namespace is compiled for its instruction set (a target pragma: GCC and clang spell it
// differently); the dispatcher only calls into it when the CPU has that set.

namespace avx2 {
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

struct Simd {
  using Reg = __m256;
  static constexpr int kLanes = 8;
  static constexpr bool kPrefetch = false;
  static Reg Zero() { return _mm256_setzero_ps(); }
  static Reg LoadF32(const float* p) { return _mm256_loadu_ps(p); }
  template <DType D>
  static Reg LoadWeights(const void* row, int64_t c) {
    const uint16_t* half = static_cast<const uint16_t*>(row) + c;
    if constexpr (D == DType::kF32) {
      return _mm256_loadu_ps(static_cast<const float*>(row) + c);
    } else if constexpr (D == DType::kF16) {
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(half)));
    } else {
      __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(half));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
    }
  }
  static Reg Fma(Reg a, Reg b, Reg c) { return _mm256_fmadd_ps(a, b, c); }
  static float Sum(Reg v) {
    __m128 lo = _mm256_castps256_ps128(v);
    __m128 hi = _mm256_extractf128_ps(v, 1);
    __m128 s = _mm_add_ps(lo, hi);
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};

#include "kernels/matmul_block.inc"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
}  // namespace avx2

namespace avx512 {
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw")
#endif

struct Simd {
  using Reg = __m512;
  static constexpr int kLanes = 16;
  static constexpr bool kPrefetch = true;
  static Reg Zero() { return _mm512_setzero_ps(); }
  static Reg LoadF32(const float* p) { return _mm512_loadu_ps(p); }
  template <DType D>
  static Reg LoadWeights(const void* row, int64_t c) {
    const uint16_t* half = static_cast<const uint16_t*>(row) + c;
    if constexpr (D == DType::kF32) {
      return _mm512_loadu_ps(static_cast<const float*>(row) + c);
    } else if constexpr (D == DType::kF16) {
      return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(half)));
    } else {
      __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(half));
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
    }
  }
  static Reg Fma(Reg a, Reg b, Reg c) { return _mm512_fmadd_ps(a, b, c); }
  // A fixed tree: halves, then quarters, ... (the same order for every call).
  static float Sum(Reg v) { return _mm512_reduce_add_ps(v); }
};

#include "kernels/matmul_block.inc"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
}  // namespace avx512

// ---- AVX-512 quantized (int8 per row, int4 grouped) -------------------------------------------

template <int R, int T>
__attribute__((target("avx512f,avx512bw"))) void Block16Int8(const WeightMatrix& w, const float* x,
                                                             float* y, int64_t r, int64_t t) {
  const int64_t cols = w.cols;
  const int64_t vec_end = cols / 16 * 16;
  const int8_t* rows[R];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) rows[i] = static_cast<const int8_t*>(w.data) + (r + i) * cols;
  __m512 acc[R][T];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < T; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t c = 0; c < vec_end; c += 16) {
    __m512 xv[T];
#pragma GCC unroll 8
    for (int j = 0; j < T; ++j) xv[j] = _mm512_loadu_ps(x + (t + j) * cols + c);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      _mm_prefetch(reinterpret_cast<const char*>(rows[i] + c + 2 * kPrefetchElements), _MM_HINT_T0);
      __m512 wv = _mm512_cvtepi32_ps(
          _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[i] + c))));
#pragma GCC unroll 8
      for (int j = 0; j < T; ++j) acc[i][j] = _mm512_fmadd_ps(wv, xv[j], acc[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < T; ++j) {
      float sum = avx512::Simd::Sum(acc[i][j]);
      const float* xt = x + (t + j) * cols;
      for (int64_t c = vec_end; c < cols; ++c) sum += static_cast<float>(rows[i][c]) * xt[c];
      y[(t + j) * w.rows + r + i] = sum * w.scales[r + i];
    }
  }
}

// Needs group_size % 32 == 0 (each 16-byte run unpacks into 16 + 16 columns).
template <int R, int T>
__attribute__((target("avx512f,avx512bw"))) void Block16Int4(const WeightMatrix& w, const float* x,
                                                             float* y, int64_t r, int64_t t) {
  const int64_t cols = w.cols, g = w.group_size, groups = cols / g;
  const uint8_t* rows[R];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) rows[i] = static_cast<const uint8_t*>(w.data) + (r + i) * (cols / 2);
  const __m512i low_mask = _mm512_set1_epi32(0xF);
  const __m512i eight = _mm512_set1_epi32(8);
  __m512 acc[R][T];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < T; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t gi = 0; gi < groups; ++gi) {
    __m512 part[R][T];
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
      for (int j = 0; j < T; ++j) part[i][j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < g / 2; b += 16) {
      const int64_t lo_col = gi * g + b, hi_col = lo_col + g / 2;
      __m512 x_lo[T], x_hi[T];
#pragma GCC unroll 8
      for (int j = 0; j < T; ++j) {
        x_lo[j] = _mm512_loadu_ps(x + (t + j) * cols + lo_col);
        x_hi[j] = _mm512_loadu_ps(x + (t + j) * cols + hi_col);
      }
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i) {
        const uint8_t* bytes_at = rows[i] + gi * g / 2 + b;
        _mm_prefetch(reinterpret_cast<const char*>(bytes_at + kPrefetchElements), _MM_HINT_T0);
        __m512i bytes =
            _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes_at)));
        __m512 lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(bytes, low_mask), eight));
        __m512 hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(bytes, 4), eight));
#pragma GCC unroll 8
        for (int j = 0; j < T; ++j) {
          part[i][j] = _mm512_fmadd_ps(lo, x_lo[j], part[i][j]);
          part[i][j] = _mm512_fmadd_ps(hi, x_hi[j], part[i][j]);
        }
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      __m512 scale = _mm512_set1_ps(w.scales[(r + i) * groups + gi]);
#pragma GCC unroll 8
      for (int j = 0; j < T; ++j) acc[i][j] = _mm512_fmadd_ps(part[i][j], scale, acc[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < T; ++j) y[(t + j) * w.rows + r + i] = avx512::Simd::Sum(acc[i][j]);
}

// Rows [r0, r1) of a quantized matrix with AVX-512, in 4-row x 2-token blocks.
void MatMulRowsQuantizedAvx512(const WeightMatrix& w, const float* x, int64_t n, float* y,
                               int64_t r0, int64_t r1) {
  auto run = [&](auto rows_tag, auto tokens_tag, int64_t r, int64_t t) {
    constexpr int R = decltype(rows_tag)::value;
    constexpr int T = decltype(tokens_tag)::value;
    if (w.quantization == Quantization::kInt8PerRow) {
      Block16Int8<R, T>(w, x, y, r, t);
    } else {
      Block16Int4<R, T>(w, x, y, r, t);
    }
  };
  using R4 = std::integral_constant<int, 4>;
  using R1 = std::integral_constant<int, 1>;
  using T2 = std::integral_constant<int, 2>;
  using T1 = std::integral_constant<int, 1>;
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    int64_t t = 0;
    for (; t + 2 <= n; t += 2) run(R4{}, T2{}, r, t);
    for (; t < n; ++t) run(R4{}, T1{}, r, t);
  }
  for (; r < r1; ++r) {
    int64_t t = 0;
    for (; t + 2 <= n; t += 2) run(R1{}, T2{}, r, t);
    for (; t < n; ++t) run(R1{}, T1{}, r, t);
  }
}

template <DType D, bool Avx512>
void MatMulRowsSimd(const WeightMatrix& w, const float* x, int64_t n, float* y, int64_t r0,
                    int64_t r1) {
  auto block = [&](auto rows_tag, auto tokens_tag, int64_t r, int64_t t) {
    constexpr int R = decltype(rows_tag)::value;
    constexpr int T = decltype(tokens_tag)::value;
    if constexpr (Avx512) {
      avx512::Block<D, R, T>(w, x, y, r, t);
    } else {
      avx2::Block<D, R, T>(w, x, y, r, t);
    }
  };
  // AVX-512 has 32 vector registers: room for 4 rows x 4 tokens of accumulators.
  constexpr int kTokens = Avx512 ? 2 * kTokenBlock : kTokenBlock;
  using R4 = std::integral_constant<int, kRowBlock>;
  using R1 = std::integral_constant<int, 1>;
  using TB = std::integral_constant<int, kTokens>;
  using T2 = std::integral_constant<int, 2>;
  using T1 = std::integral_constant<int, 1>;
  int64_t r = r0;
  if (!ReadRowByRow(n, w.cols)) {
    for (; r + kRowBlock <= r1; r += kRowBlock) {
      int64_t t = 0;
      for (; t + kTokens <= n; t += kTokens) block(R4{}, TB{}, r, t);
      for (; t + 2 <= n; t += 2) block(R4{}, T2{}, r, t);
      for (; t < n; ++t) block(R4{}, T1{}, r, t);
    }
  }
  for (; r < r1; ++r) {
    int64_t t = 0;
    for (; t + kTokens <= n; t += kTokens) block(R1{}, TB{}, r, t);
    for (; t + 2 <= n; t += 2) block(R1{}, T2{}, r, t);
    for (; t < n; ++t) block(R1{}, T1{}, r, t);
  }
}

template <bool Avx512>
void MatMulRowsSimdAnyType(const WeightMatrix& w, const float* x, int64_t n, float* y, int64_t r0,
                           int64_t r1) {
  switch (w.dtype) {
    case DType::kF32:
      return MatMulRowsSimd<DType::kF32, Avx512>(w, x, n, y, r0, r1);
    case DType::kF16:
      return MatMulRowsSimd<DType::kF16, Avx512>(w, x, n, y, r0, r1);
    case DType::kBF16:
      return MatMulRowsSimd<DType::kBF16, Avx512>(w, x, n, y, r0, r1);
  }
}

}  // namespace

Isa DetectIsa() {
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return Isa::kAvx512;
  // Every AVX2 processor also has F16C (clang cannot query it through this builtin).
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
  return Isa::kScalar;
}

const char* IsaName(Isa isa) {
  switch (isa) {
    case Isa::kScalar:
      return "scalar";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kAvx512:
      return "avx512";
  }
  return "?";
}

namespace {

// Rows [r0, r1) of y = x w^T, on the calling thread.
void MatMulRows(Isa isa, const WeightMatrix& w, const float* x, int64_t n, float* y, int64_t r0,
                int64_t r1) {
  if (w.quantization != Quantization::kNone) {
    // int4 with groups that are not a multiple of 32 columns takes the plain loop.
    bool simd = isa == Isa::kAvx512 &&
                (w.quantization == Quantization::kInt8PerRow || w.group_size % 32 == 0);
    return simd ? MatMulRowsQuantizedAvx512(w, x, n, y, r0, r1)
                : MatMulRowsScalar(w, x, n, y, r0, r1);
  }
  switch (isa) {
    case Isa::kScalar:
      return MatMulRowsScalar(w, x, n, y, r0, r1);
    case Isa::kAvx2:
      return MatMulRowsSimdAnyType<false>(w, x, n, y, r0, r1);
    case Isa::kAvx512:
      return MatMulRowsSimdAnyType<true>(w, x, n, y, r0, r1);
  }
}

}  // namespace

void MatMulWithIsa(Isa isa, const WeightMatrix& w, const float* x, int64_t n, float* y,
                   ThreadPool& pool) {
  if (n <= 0 || w.rows <= 0) return;
  // Split rows across threads in multiples of the row block, so blocks never straddle threads
  // (results would not change if they did; it just keeps every block full).
  int64_t row_blocks = (w.rows + kRowBlock - 1) / kRowBlock;
  pool.ParallelFor(row_blocks, [&](int64_t b0, int64_t b1) {
    MatMulRows(isa, w, x, n, y, b0 * kRowBlock, std::min(w.rows, b1 * kRowBlock));
  });
}

void SwiGluWithIsa(Isa isa, const WeightMatrix& gate, const WeightMatrix& up, const float* x,
                   int64_t n, float* gate_out, float* up_out, ThreadPool& pool) {
  if (n <= 0 || gate.rows <= 0) return;
  const int64_t rows = gate.rows;
  int64_t row_blocks = (rows + kRowBlock - 1) / kRowBlock;
  pool.ParallelFor(row_blocks, [&](int64_t b0, int64_t b1) {
    const int64_t r0 = b0 * kRowBlock, r1 = std::min(rows, b1 * kRowBlock);
    MatMulRows(isa, gate, x, n, gate_out, r0, r1);
    MatMulRows(isa, up, x, n, up_out, r0, r1);
    for (int64_t t = 0; t < n; ++t) {
      SiluMul(gate_out + t * rows + r0, up_out + t * rows + r0, r1 - r0, gate_out + t * rows + r0);
    }
  });
}

void SwiGlu(const WeightMatrix& gate, const WeightMatrix& up, const float* x, int64_t n,
            float* gate_out, float* up_out, ThreadPool& pool) {
  static const Isa isa = DetectIsa();  // a property of the processor, computed once
  SwiGluWithIsa(isa, gate, up, x, n, gate_out, up_out, pool);
}

void MatMul(const WeightMatrix& w, const float* x, int64_t n, float* y, ThreadPool& pool) {
  static const Isa isa = DetectIsa();  // a property of the processor, computed once
  MatMulWithIsa(isa, w, x, n, y, pool);
}

void RmsNorm(const float* x, const float* weight, int64_t n, int64_t width, float eps, float* y) {
  for (int64_t t = 0; t < n; ++t) {
    const float* xt = x + t * width;
    double sum = 0;
    for (int64_t i = 0; i < width; ++i) sum += static_cast<double>(xt[i]) * xt[i];
    float scale = static_cast<float>(1.0 / std::sqrt(sum / width + eps));
    float* yt = y + t * width;
    for (int64_t i = 0; i < width; ++i) yt[i] = xt[i] * scale * weight[i];
  }
}

void RopeNeox(float* x, int64_t n, int64_t heads, int64_t head_dim, const int64_t* positions,
              double theta) {
  const int64_t half = head_dim / 2;
  std::vector<float> cos_table(half), sin_table(half);
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t i = 0; i < half; ++i) {
      double inv_freq = std::pow(theta, -2.0 * static_cast<double>(i) / head_dim);
      double angle = static_cast<double>(positions[t]) * inv_freq;
      cos_table[i] = static_cast<float>(std::cos(angle));
      sin_table[i] = static_cast<float>(std::sin(angle));
    }
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + (t * heads + h) * head_dim;
      for (int64_t i = 0; i < half; ++i) {
        float a = v[i], b = v[i + half];
        v[i] = a * cos_table[i] - b * sin_table[i];
        v[i + half] = b * cos_table[i] + a * sin_table[i];
      }
    }
  }
}

namespace {

float* KvRow(const PagedKv& kv, int32_t table_start, int layer, int64_t position, bool values) {
  float* block = kv.block_table[table_start + position / kv.block_size];
  const int64_t width = values ? kv.value_width() : kv.kv_width();
  return block + layer * kv.layer_floats + (values ? kv.block_size * kv.kv_width() : 0) +
         (position % kv.block_size) * width;
}

// Row `row` of w as fp32, whatever its format.
void RowToF32(const WeightMatrix& w, int64_t row, float* out) {
  if (w.quantization == Quantization::kNone) {
    WidenToF32(w.dtype, static_cast<const char*>(w.data) + row * w.cols * DTypeSize(w.dtype),
               w.cols, out);
    return;
  }
  for (int64_t c = 0; c < w.cols; ++c) out[c] = DequantizedValue(w, row, c);
}

}  // namespace

void PagedWriteKv(const PagedKv& kv, int layer, const float* k, const float* v, int64_t n) {
  const int64_t width = kv.kv_width(), value_width = kv.value_width();
  for (int64_t t = 0; t < n; ++t) {
    std::copy_n(k + t * width, width, KvRow(kv, kv.table_start[t], layer, kv.positions[t], false));
    std::copy_n(v + t * value_width, value_width,
                KvRow(kv, kv.table_start[t], layer, kv.positions[t], true));
  }
}

void Rotary(float* x, int64_t n, const RotarySpec& spec, const int64_t* positions) {
  const int64_t half = spec.dims / 2;
  std::vector<float> cos_table(static_cast<size_t>(half)), sin_table(static_cast<size_t>(half));
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t i = 0; i < half; ++i) {
      double angle = static_cast<double>(positions[t]) * spec.inv_freq[i];
      cos_table[i] = static_cast<float>(std::cos(angle) * spec.magnitude);
      sin_table[i] = static_cast<float>(std::sin(angle) * spec.magnitude);
    }
    for (int64_t h = 0; h < spec.heads; ++h) {
      float* v = x + (t * spec.heads + h) * spec.head_stride + spec.offset;
      for (int64_t i = 0; i < half; ++i) {
        const int64_t a_at = spec.style == RotaryStyle::kPairs ? 2 * i : i;
        const int64_t b_at = spec.style == RotaryStyle::kPairs ? 2 * i + 1 : i + half;
        float a = v[a_at], b = v[b_at];
        v[a_at] = a * cos_table[i] - b * sin_table[i];
        v[b_at] = b * cos_table[i] + a * sin_table[i];
      }
    }
  }
}

void MlaAttention(const PagedKv& kv, int layer, const float* q, int64_t n, const MlaShape& shape,
                  const WeightMatrix& kv_b, float* out, ThreadPool& pool) {
  const int64_t heads = shape.heads, dn = shape.nope_dim, dr = shape.rope_dim;
  const int64_t dv = shape.value_dim, latent = shape.latent_dim, block_size = kv.block_size;
  const int64_t q_stride = dn + dr, latent_at = layer * kv.layer_floats,
                rope_at = latent_at + block_size * latent;
  pool.ParallelFor(heads, [&](int64_t begin, int64_t end) {
    // This head's kv_b rows widened once for all the step's tokens.
    std::vector<float> key_rows(static_cast<size_t>(dn * latent));
    std::vector<float> value_rows(static_cast<size_t>(dv * latent));
    std::vector<float> absorbed(static_cast<size_t>(latent)), mixed(static_cast<size_t>(latent));
    std::vector<float> scores;
    for (int64_t h = begin; h < end; ++h) {
      for (int64_t j = 0; j < dn; ++j) RowToF32(kv_b, h * (dn + dv) + j, &key_rows[j * latent]);
      for (int64_t j = 0; j < dv; ++j) {
        RowToF32(kv_b, h * (dn + dv) + dn + j, &value_rows[j * latent]);
      }
      for (int64_t t = 0; t < n; ++t) {
        const float* q_nope = q + (t * heads + h) * q_stride;
        const float* q_rope = q_nope + dn;
        std::fill(absorbed.begin(), absorbed.end(), 0.0f);
        for (int64_t j = 0; j < dn; ++j) {
          const float* row = &key_rows[j * latent];
          for (int64_t r = 0; r < latent; ++r) absorbed[r] += q_nope[j] * row[r];
        }
        const int64_t len = kv.positions[t] + 1;
        float* const* blocks = kv.block_table + kv.table_start[t];
        scores.resize(static_cast<size_t>(len));
        float max_score = -INFINITY;
        for (int64_t p0 = 0, b = 0; p0 < len; p0 += block_size, ++b) {
          const float* cp = blocks[b] + latent_at;
          const float* kp = blocks[b] + rope_at;
          for (int64_t p = p0; p < std::min(len, p0 + block_size); ++p, cp += latent, kp += dr) {
            float dot = 0;
            for (int64_t r = 0; r < latent; ++r) dot += absorbed[r] * cp[r];
            float rope_dot = 0;
            for (int64_t i = 0; i < dr; ++i) rope_dot += q_rope[i] * kp[i];
            scores[p] = (dot + rope_dot) * shape.scale;
            max_score = std::max(max_score, scores[p]);
          }
        }
        double total = 0;
        for (int64_t p = 0; p < len; ++p) {
          scores[p] = std::exp(scores[p] - max_score);
          total += scores[p];
        }
        const float inv_total = static_cast<float>(1.0 / total);
        std::fill(mixed.begin(), mixed.end(), 0.0f);
        for (int64_t p0 = 0, b = 0; p0 < len; p0 += block_size, ++b) {
          const float* cp = blocks[b] + latent_at;
          for (int64_t p = p0; p < std::min(len, p0 + block_size); ++p, cp += latent) {
            const float weight = scores[p] * inv_total;
            for (int64_t r = 0; r < latent; ++r) mixed[r] += weight * cp[r];
          }
        }
        float* o = out + (t * heads + h) * dv;
        for (int64_t j = 0; j < dv; ++j) {
          const float* row = &value_rows[j * latent];
          float sum = 0;
          for (int64_t r = 0; r < latent; ++r) sum += row[r] * mixed[r];
          o[j] = sum;
        }
      }
    }
  });
}

void RouterTopK(const float* logits, int64_t n, int64_t experts, int64_t k, const RouterSpec& spec,
                int32_t* chosen, float* weights) {
  std::vector<float> score(static_cast<size_t>(experts)), choice(static_cast<size_t>(experts));
  std::vector<int> order(static_cast<size_t>(experts));
  const int64_t group_size = experts / std::max<int64_t>(spec.groups, 1);
  std::vector<float> group_score(static_cast<size_t>(std::max<int64_t>(spec.groups, 1)));
  std::vector<int> group_order(group_score.size());
  for (int64_t t = 0; t < n; ++t) {
    const float* row = logits + t * experts;
    if (spec.scoring == RouterScoring::kSoftmax) {
      float max_logit = *std::max_element(row, row + experts);
      float total = 0;
      for (int64_t e = 0; e < experts; ++e) total += score[e] = std::exp(row[e] - max_logit);
      for (float& v : score) v /= total;
    } else {
      for (int64_t e = 0; e < experts; ++e) score[e] = 1.0f / (1.0f + std::exp(-row[e]));
    }
    for (int64_t e = 0; e < experts; ++e) {
      choice[e] = spec.choice_bias != nullptr ? score[e] + spec.choice_bias[e] : score[e];
    }
    auto better = [&](int a, int b) {
      return choice[a] > choice[b] || (choice[a] == choice[b] && a < b);
    };
    std::iota(order.begin(), order.end(), 0);
    auto eligible_end = order.end();
    if (spec.groups > 1) {
      for (int64_t g = 0; g < spec.groups; ++g) {
        const float* c = &choice[g * group_size];
        if (spec.group_score == GroupScore::kMax) {
          group_score[g] = *std::max_element(c, c + group_size);
        } else {
          float first = -INFINITY, second = -INFINITY;
          for (int64_t i = 0; i < group_size; ++i) {
            if (c[i] > first) {
              second = first;
              first = c[i];
            } else if (c[i] > second) {
              second = c[i];
            }
          }
          group_score[g] = first + second;
        }
      }
      std::iota(group_order.begin(), group_order.end(), 0);
      std::partial_sort(group_order.begin(), group_order.begin() + spec.top_groups,
                        group_order.end(), [&](int a, int b) {
                          return group_score[a] > group_score[b] ||
                                 (group_score[a] == group_score[b] && a < b);
                        });
      std::vector<bool> kept(static_cast<size_t>(spec.groups), false);
      for (int64_t g = 0; g < spec.top_groups; ++g) kept[group_order[g]] = true;
      eligible_end = std::stable_partition(order.begin(), order.end(),
                                           [&](int e) -> bool { return kept[e / group_size]; });
    }
    std::partial_sort(order.begin(), order.begin() + k, eligible_end, better);
    float selected = 0;
    for (int64_t r = 0; r < k; ++r) selected += score[order[r]];
    for (int64_t r = 0; r < k; ++r) {
      chosen[t * k + r] = order[r];
      const float weight = spec.renormalize ? score[order[r]] / selected : score[order[r]];
      weights[t * k + r] = weight * spec.scale;
    }
  }
}

void PagedAttention(const PagedKv& kv, int layer, const float* q, int64_t n, int64_t heads,
                    float* out, ThreadPool& pool) {
  const int64_t head_dim = kv.head_dim, kv_heads = kv.kv_heads, width = kv.kv_width();
  const int64_t block_size = kv.block_size, group = heads / kv_heads;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
  pool.ParallelFor(n * heads, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t item = begin; item < end; ++item) {
      int64_t t = item / heads;
      int64_t h = item % heads;
      int64_t len = kv.positions[t] + 1;
      float* const* blocks = kv.block_table + kv.table_start[t];
      // This head's keys and values inside a block, from the block's start.
      const int64_t key_at = layer * kv.layer_floats + (h / group) * head_dim;
      const int64_t value_at = key_at + block_size * width;
      const float* qv = q + (t * heads + h) * head_dim;
      scores.resize(static_cast<size_t>(len));
      float max_score = -INFINITY;
      // Positions in order, a block at a time (no division per position).
      for (int64_t p0 = 0, b = 0; p0 < len; p0 += block_size, ++b) {
        const float* kp = blocks[b] + key_at;
        for (int64_t p = p0; p < std::min(len, p0 + block_size); ++p, kp += width) {
          float dot = 0;
          for (int64_t i = 0; i < head_dim; ++i) dot += qv[i] * kp[i];
          scores[p] = dot * scale;
          max_score = std::max(max_score, scores[p]);
        }
      }
      double total = 0;
      for (int64_t p = 0; p < len; ++p) {
        scores[p] = std::exp(scores[p] - max_score);
        total += scores[p];
      }
      float* o = out + (t * heads + h) * head_dim;
      std::fill(o, o + head_dim, 0.0f);
      float inv_total = static_cast<float>(1.0 / total);
      for (int64_t p0 = 0, b = 0; p0 < len; p0 += block_size, ++b) {
        const float* vp = blocks[b] + value_at;
        for (int64_t p = p0; p < std::min(len, p0 + block_size); ++p, vp += width) {
          float weight = scores[p] * inv_total;
          for (int64_t i = 0; i < head_dim; ++i) o[i] += weight * vp[i];
        }
      }
    }
  });
}

void SiluMul(const float* gate, const float* up, int64_t count, float* out) {
  for (int64_t i = 0; i < count; ++i) {
    float g = gate[i];
    out[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

}  // namespace moed::kernels::cpu
