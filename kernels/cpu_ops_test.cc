#include "kernels/cpu_ops.h"

#include <catch2/catch.hpp>
#include <cmath>
#include <random>
#include <vector>

#include "kernels/quant.h"

namespace moed::kernels::cpu {
namespace {

struct Weights {
  DType dtype;
  std::vector<uint8_t> bytes;
  std::vector<double> values;  // the exact value of each stored weight
  WeightMatrix matrix;
};

Weights RandomWeights(DType dtype, int64_t rows, int64_t cols, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 0.5f);
  Weights w{dtype, std::vector<uint8_t>(rows * cols * DTypeSize(dtype)), {}, {}};
  for (int64_t i = 0; i < rows * cols; ++i) {
    float v = normal(rng);
    if (dtype == DType::kF32) {
      std::memcpy(w.bytes.data() + 4 * i, &v, 4);
      w.values.push_back(v);
    } else {
      uint16_t h = dtype == DType::kF16 ? F32ToF16(v) : F32ToBf16(v);
      std::memcpy(w.bytes.data() + 2 * i, &h, 2);
      w.values.push_back(dtype == DType::kF16 ? F16ToF32(h) : Bf16ToF32(h));
    }
  }
  w.matrix = {dtype, w.bytes.data(), rows, cols};
  return w;
}

std::vector<float> RandomActivations(int64_t count, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(count);
  for (float& v : x) v = normal(rng);
  return x;
}

std::vector<Isa> SupportedIsas() {
  std::vector<Isa> isas = {Isa::kScalar};
  if (DetectIsa() == Isa::kAvx2 || DetectIsa() == Isa::kAvx512) isas.push_back(Isa::kAvx2);
  if (DetectIsa() == Isa::kAvx512) isas.push_back(Isa::kAvx512);
  return isas;
}

TEST_CASE("matmul matches a double-precision loop for every dtype, ISA and odd shape") {
  ThreadPool pool(2);
  for (DType dtype : {DType::kF32, DType::kF16, DType::kBF16}) {
    using Shape = std::tuple<int64_t, int64_t, int64_t>;
    for (auto [rows, cols, n] :
         {Shape{1, 1, 1}, Shape{5, 17, 3}, Shape{67, 130, 5}, Shape{128, 64, 8}}) {
      Weights w = RandomWeights(dtype, rows, cols, rows * 31 + cols);
      std::vector<float> x = RandomActivations(n * cols, cols);
      for (Isa isa : SupportedIsas()) {
        INFO(DTypeName(dtype) << " " << rows << "x" << cols << " n=" << n << " " << IsaName(isa));
        std::vector<float> y(n * rows, NAN);
        MatMulWithIsa(isa, w.matrix, x.data(), n, y.data(), pool);
        double worst = 0;
        for (int64_t t = 0; t < n; ++t) {
          for (int64_t r = 0; r < rows; ++r) {
            double expected = 0, magnitude = 0;
            for (int64_t c = 0; c < cols; ++c) {
              expected += w.values[r * cols + c] * x[t * cols + c];
              magnitude += std::abs(w.values[r * cols + c] * x[t * cols + c]);
            }
            worst = std::max(worst, std::abs(y[t * rows + r] - expected) / (magnitude + 1e-30));
          }
        }
        CHECK(worst < 1e-5);  // fp32 accumulation error relative to the sum of magnitudes
      }
    }
  }
}

TEST_CASE("matmul is batch invariant: a token's result does not depend on its neighbours") {
  // Narrow batches of short rows are read a row at a time, the rest in blocks of rows (2,000
  // columns of 3 or 4 tokens outgrow L1): every way gives a token the same result.
  for (int64_t cols : {200, 2000}) {
    Weights w = RandomWeights(DType::kBF16, 37, cols, 5);
    std::vector<float> x = RandomActivations(9 * cols, 6);
    for (Isa isa : SupportedIsas()) {
      ThreadPool one(1), two(2);
      for (int64_t n : {2, 3, 4, 9}) {
        INFO(IsaName(isa) << ", " << cols << " columns, batch of " << n);
        std::vector<float> batch(n * 37);
        MatMulWithIsa(isa, w.matrix, x.data(), n, batch.data(), two);
        for (int64_t t = 0; t < n; ++t) {
          std::vector<float> alone(37);
          MatMulWithIsa(isa, w.matrix, x.data() + t * cols, 1, alone.data(), one);
          for (int64_t r = 0; r < 37; ++r) REQUIRE(alone[r] == batch[t * 37 + r]);  // bitwise
        }
      }
    }
  }
}

TEST_CASE("the fused SwiGLU is bitwise two matmuls and silu(gate) * up") {
  for (auto [rows, cols, n] : {std::tuple<int64_t, int64_t, int64_t>{37, 200, 1},
                               std::tuple<int64_t, int64_t, int64_t>{67, 130, 3},
                               std::tuple<int64_t, int64_t, int64_t>{128, 64, 9}}) {
    Weights gate = RandomWeights(DType::kBF16, rows, cols, 11);
    Weights up = RandomWeights(DType::kBF16, rows, cols, 12);
    std::vector<float> x = RandomActivations(n * cols, 13);
    for (Isa isa : SupportedIsas()) {
      INFO(IsaName(isa) << " " << rows << "x" << cols << " n=" << n);
      ThreadPool pool(2);
      std::vector<float> g(n * rows), u(n * rows), expected(n * rows);
      MatMulWithIsa(isa, gate.matrix, x.data(), n, g.data(), pool);
      MatMulWithIsa(isa, up.matrix, x.data(), n, u.data(), pool);
      for (int64_t i = 0; i < n * rows; ++i) {
        expected[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];  // silu(g) * u
      }
      std::vector<float> fused(n * rows, NAN), scratch(n * rows);
      SwiGluWithIsa(isa, gate.matrix, up.matrix, x.data(), n, fused.data(), scratch.data(), pool);
      for (int64_t i = 0; i < n * rows; ++i) REQUIRE(fused[i] == expected[i]);
    }
  }
}

TEST_CASE("rmsnorm, rope and silu match their formulas") {
  SECTION("rmsnorm") {
    std::vector<float> x = {1, 2, 3, 4, -1, 0, 0, 1};
    std::vector<float> w = {1, 0.5f, 2, 1};
    std::vector<float> y(8);
    RmsNorm(x.data(), w.data(), 2, 4, 1e-5f, y.data());
    double rms0 = std::sqrt((1 + 4 + 9 + 16) / 4.0 + 1e-5);
    CHECK(y[1] == Approx(2 * 0.5 / rms0).epsilon(1e-6));
    double rms1 = std::sqrt(2 / 4.0 + 1e-5);
    CHECK(y[4] == Approx(-1 / rms1).epsilon(1e-6));
  }
  SECTION("rope pairs element i with i + d/2") {
    std::vector<float> x = {1, 2, 3, 4};  // one head of 4
    int64_t position = 3;
    RopeNeox(x.data(), 1, 1, 4, &position, 10000.0);
    double a0 = 3.0, a1 = 3.0 * std::pow(10000.0, -0.5);
    CHECK(x[0] == Approx(1 * std::cos(a0) - 3 * std::sin(a0)));
    CHECK(x[2] == Approx(3 * std::cos(a0) + 1 * std::sin(a0)));
    CHECK(x[1] == Approx(2 * std::cos(a1) - 4 * std::sin(a1)));
    CHECK(x[3] == Approx(4 * std::cos(a1) + 2 * std::sin(a1)));
  }
  SECTION("silu") {
    float g[2] = {0, 2}, u[2] = {3, 0.5f}, out[2];
    SiluMul(g, u, 2, out);
    CHECK(out[0] == 0);
    CHECK(out[1] == Approx(2 / (1 + std::exp(-2.0)) * 0.5));
  }
}

}  // namespace
}  // namespace moed::kernels::cpu

namespace moed::kernels::cpu {
namespace {

struct QuantizedWeights {
  std::vector<int8_t> q8;
  std::vector<uint8_t> q4;
  std::vector<float> scales;
  WeightMatrix matrix;
};

QuantizedWeights Quantize(Quantization kind, const std::vector<float>& w, int64_t rows,
                          int64_t cols, int64_t group) {
  QuantizedWeights out;
  if (kind == Quantization::kInt8PerRow) {
    out.q8.resize(rows * cols);
    out.scales.resize(rows);
    QuantizeInt8(w.data(), rows, cols, out.q8.data(), out.scales.data());
    out.matrix = {DType::kF32, out.q8.data(), rows, cols, kind, out.scales.data(), 0};
  } else {
    out.q4.resize(rows * cols / 2);
    out.scales.resize(rows * cols / group);
    QuantizeInt4(w.data(), rows, cols, group, out.q4.data(), out.scales.data());
    out.matrix = {DType::kF32, out.q4.data(), rows, cols, kind, out.scales.data(), group};
  }
  return out;
}

TEST_CASE("quantization stays within half a step of the original weights") {
  const int64_t rows = 9, cols = 128;
  std::vector<float> w = RandomActivations(rows * cols, 21);
  for (auto [kind, group, levels] : {std::tuple{Quantization::kInt8PerRow, int64_t{0}, 127.0f},
                                     std::tuple{Quantization::kInt4Grouped, int64_t{32}, 7.0f},
                                     std::tuple{Quantization::kInt4Grouped, int64_t{64}, 7.0f}}) {
    QuantizedWeights q = Quantize(kind, w, rows, cols, group);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < cols; ++c) {
        int64_t span = kind == Quantization::kInt8PerRow ? cols : group;
        float max_abs = 0;
        for (int64_t k = c / span * span; k < c / span * span + span; ++k)
          max_abs = std::max(max_abs, std::abs(w[r * cols + k]));
        float step = max_abs / levels;
        REQUIRE(std::abs(DequantizedValue(q.matrix, r, c) - w[r * cols + c]) <= step / 2 * 1.0001f);
      }
    }
  }
}

TEST_CASE(
    "int8 and int4 matmul match a double loop over the dequantized weights, batch invariantly") {
  ThreadPool pool(2);
  for (auto [kind, group] : {std::pair{Quantization::kInt8PerRow, int64_t{0}},
                             std::pair{Quantization::kInt4Grouped, int64_t{32}},
                             std::pair{Quantization::kInt4Grouped, int64_t{64}},
                             std::pair{Quantization::kInt4Grouped, int64_t{16}}}) {
    for (auto [rows, cols, n] : {std::tuple{int64_t{7}, int64_t{64}, int64_t{3}},
                                 std::tuple{int64_t{33}, int64_t{192}, int64_t{5}}}) {
      std::vector<float> w = RandomActivations(rows * cols, 3);
      QuantizedWeights q = Quantize(kind, w, rows, cols, group);
      std::vector<float> x = RandomActivations(n * cols, 4);
      for (Isa isa : SupportedIsas()) {
        INFO(IsaName(isa) << " group " << group << " " << rows << "x" << cols);
        std::vector<float> y(n * rows);
        MatMulWithIsa(isa, q.matrix, x.data(), n, y.data(), pool);
        for (int64_t t = 0; t < n; ++t) {
          for (int64_t r = 0; r < rows; ++r) {
            double expected = 0, magnitude = 0;
            for (int64_t c = 0; c < cols; ++c) {
              double term = double(DequantizedValue(q.matrix, r, c)) * x[t * cols + c];
              expected += term;
              magnitude += std::abs(term);
            }
            REQUIRE(std::abs(y[t * rows + r] - expected) <= 1e-5 * magnitude + 1e-6);
          }
        }
        for (int64_t t = 0; t < n; ++t) {
          std::vector<float> alone(rows);
          MatMulWithIsa(isa, q.matrix, x.data() + t * cols, 1, alone.data(), pool);
          for (int64_t r = 0; r < rows; ++r) REQUIRE(alone[r] == y[t * rows + r]);
        }
      }
    }
  }
}

}  // namespace
}  // namespace moed::kernels::cpu
