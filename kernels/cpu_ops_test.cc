#include "kernels/cpu_ops.h"

#include <catch2/catch.hpp>
#include <cmath>
#include <random>
#include <vector>

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
    for (auto [rows, cols, n] : {std::tuple{1, 1, 1}, std::tuple{5, 17, 3}, std::tuple{67, 130, 5},
                                 std::tuple{128, 64, 8}}) {
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
  Weights w = RandomWeights(DType::kBF16, 37, 200, 5);
  std::vector<float> x = RandomActivations(9 * 200, 6);
  for (Isa isa : SupportedIsas()) {
    INFO(IsaName(isa));
    ThreadPool one(1), two(2);
    std::vector<float> batch(9 * 37);
    MatMulWithIsa(isa, w.matrix, x.data(), 9, batch.data(), two);
    for (int64_t t = 0; t < 9; ++t) {
      std::vector<float> alone(37);
      MatMulWithIsa(isa, w.matrix, x.data() + t * 200, 1, alone.data(), one);
      for (int64_t r = 0; r < 37; ++r) REQUIRE(alone[r] == batch[t * 37 + r]);  // bitwise
    }
  }
}

TEST_CASE("rmsnorm, rope, silu and attention match their formulas") {
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
  SECTION("attention with GQA against a direct softmax") {
    ThreadPool pool(2);
    const int64_t heads = 4, kv_heads = 2, d = 8, len = 5;
    std::vector<float> k = RandomActivations(len * kv_heads * d, 1);
    std::vector<float> v = RandomActivations(len * kv_heads * d, 2);
    std::vector<float> q = RandomActivations(2 * heads * d, 3);
    int64_t positions[2] = {2, 4};
    std::vector<float> out(2 * heads * d);
    Attention(q.data(), 2, heads, kv_heads, d, k.data(), v.data(), positions, out.data(), pool);
    for (int t = 0; t < 2; ++t) {
      for (int h = 0; h < heads; ++h) {
        int kv = h / (heads / kv_heads);  // repeat_kv: query heads 0,1 share KV head 0
        std::vector<double> p;
        double total = 0;
        for (int64_t s = 0; s <= positions[t]; ++s) {
          double dot = 0;
          for (int i = 0; i < d; ++i) dot += q[(t * heads + h) * d + i] * k[(s * kv_heads + kv) * d + i];
          p.push_back(std::exp(dot / std::sqrt(double(d))));
          total += p.back();
        }
        for (int i = 0; i < d; ++i) {
          double expected = 0;
          for (int64_t s = 0; s <= positions[t]; ++s) expected += p[s] / total * v[(s * kv_heads + kv) * d + i];
          CHECK(out[(t * heads + h) * d + i] == Approx(expected).margin(1e-5));
        }
      }
    }
  }
}

}  // namespace
}  // namespace moed::kernels::cpu
