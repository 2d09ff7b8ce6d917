// Every operator of the Backend seam, in every weight format and at odd shapes, on every
// backend this machine has (the CPU; the CUDA kernels' bodies run on the host; a CUDA device
// when there is one), against plain double-precision references written here from the
// operators' definitions, not from any backend's code. A second test runs every architecture
// through a recording backend and fails if the model calls an (operator, format) pair the
// table does not check.
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "cache/expert_cache.h"
#include "cache/store.h"
#include "kernels/backend.h"
#include "kernels/cuda/host_grid_backend.h"
#include "kernels/quant.h"
#include "kernels/test_backend.h"
#include "model/model.h"
#include "tests/scratch_dir.h"
#include "tools/pack/pack.h"
#include "tools/synth/synthesizer.h"

namespace moed::kernels {
namespace {

namespace fs = std::filesystem;

struct NamedBackend {
  std::string name;
  std::shared_ptr<Backend> backend;
};

std::vector<NamedBackend> BackendsUnderTest() {
  std::vector<NamedBackend> out;
  out.push_back({"cpu", TestCpuBackend(2)});
  out.push_back({"cuda-bodies-on-host", grid::CreateHostGridBackend()});
  if (!DiscoverDevices().cuda_devices.empty()) {
    absl::StatusOr<BackendChoice> cuda = CreateBackend(BackendKind::kCuda);
    REQUIRE(cuda.ok());
    out.push_back({"cuda", std::move(cuda->backend)});
  }
  return out;
}

// Device memory for a test: uploads, downloads, addresses.
class Mem {
 public:
  explicit Mem(Backend& backend) : b_(backend) {}
  template <typename T>
  T* Put(const std::vector<T>& values) {
    absl::StatusOr<DeviceBuffer> buffer = b_.device().Allocate(values.size() * sizeof(T) + 16);
    REQUIRE(buffer.ok());
    REQUIRE(b_.compute().CopyToDevice(*buffer, 0, values.data(), values.size() * sizeof(T)).ok());
    T* at = buffer->as<T>();
    buffers_.push_back(*std::move(buffer));
    return at;
  }
  template <typename T>
  T* Zeros(size_t count) {
    return Put(std::vector<T>(count));
  }
  template <typename T>
  std::vector<T> Get(const T* at, size_t count) {
    for (const DeviceBuffer& buffer : buffers_) {
      if (buffer.data() == at) {
        std::vector<T> out(count);
        REQUIRE(b_.compute().CopyToHost(out.data(), buffer, 0, count * sizeof(T)).ok());
        return out;
      }
    }
    FAIL("not a buffer of this test");
    return {};
  }
  // A weight matrix stored in `format`, uploaded; `dense` gets the values it stands for.
  WeightMatrix Weights(WeightFormat format, int64_t rows, int64_t cols, int64_t group,
                       std::mt19937& rng, std::vector<double>* dense);

 private:
  Backend& b_;
  std::vector<DeviceBuffer> buffers_;
};

std::vector<float> Random(size_t count, std::mt19937& rng, float scale = 1.0f) {
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> out(count);
  for (float& v : out) v = dist(rng);
  return out;
}

// Decoders written from the formats' definitions.
double DecodeBf16(uint16_t bits) {
  uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &wide, 4);
  return f;
}
double DecodeF16(uint16_t bits) {
  int sign = bits >> 15, exponent = (bits >> 10) & 31, mantissa = bits & 1023;
  double magnitude =
      exponent == 0 ? std::ldexp(mantissa, -24) : std::ldexp(1024 + mantissa, exponent - 25);
  return sign ? -magnitude : magnitude;
}

WeightMatrix Mem::Weights(WeightFormat format, int64_t rows, int64_t cols, int64_t group,
                          std::mt19937& rng, std::vector<double>* dense) {
  std::vector<float> w = Random(static_cast<size_t>(rows * cols), rng, 0.5f);
  dense->assign(w.size(), 0.0);
  WeightMatrix m;
  m.rows = rows;
  m.cols = cols;
  switch (format) {
    case WeightFormat::kF32:
      for (size_t i = 0; i < w.size(); ++i) (*dense)[i] = w[i];
      m.data = Put(w);
      break;
    case WeightFormat::kF16:
    case WeightFormat::kBF16: {
      std::vector<uint16_t> half(w.size());
      for (size_t i = 0; i < w.size(); ++i) {
        half[i] = format == WeightFormat::kF16 ? F32ToF16(w[i]) : F32ToBf16(w[i]);
        (*dense)[i] = format == WeightFormat::kF16 ? DecodeF16(half[i]) : DecodeBf16(half[i]);
      }
      m.dtype = format == WeightFormat::kF16 ? DType::kF16 : DType::kBF16;
      m.data = Put(half);
      break;
    }
    case WeightFormat::kInt8PerRow: {
      std::vector<int8_t> q(w.size());
      std::vector<float> scales(static_cast<size_t>(rows));
      QuantizeInt8(w.data(), rows, cols, q.data(), scales.data());
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c)
          (*dense)[r * cols + c] = double(q[r * cols + c]) * scales[r];
      m.quantization = Quantization::kInt8PerRow;
      m.data = Put(q);
      m.scales = Put(scales);
      break;
    }
    case WeightFormat::kInt4Grouped: {
      std::vector<uint8_t> packed(static_cast<size_t>(rows * cols / 2));
      const int64_t groups = cols / group;
      std::vector<float> scales(static_cast<size_t>(rows * groups));
      QuantizeInt4(w.data(), rows, cols, group, packed.data(), scales.data());
      // Byte g0/2 + j of a group holds column g0 + j (low nibble) and g0 + j + G/2 (high).
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t gi = 0; gi < groups; ++gi) {
          for (int64_t j = 0; j < group / 2; ++j) {
            uint8_t byte = packed[r * (cols / 2) + gi * (group / 2) + j];
            double scale = scales[r * groups + gi];
            (*dense)[r * cols + gi * group + j] = ((byte & 15) - 8) * scale;
            (*dense)[r * cols + gi * group + group / 2 + j] = ((byte >> 4) - 8) * scale;
          }
        }
      }
      m.quantization = Quantization::kInt4Grouped;
      m.group_size = group;
      m.data = Put(packed);
      m.scales = Put(scales);
      break;
    }
  }
  return m;
}

// |got - want| <= rel * scale + abs, where scale is the magnitude the sum was built from.
void CheckClose(const std::vector<float>& got, const std::vector<double>& want,
                const std::vector<double>& scale, double rel, double abs) {
  REQUIRE(got.size() == want.size());
  size_t bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    double limit = rel * (scale.empty() ? std::abs(want[i]) : scale[i]) + abs;
    if (!(std::abs(got[i] - want[i]) <= limit)) {
      if (bad++ < 3) {
        UNSCOPED_INFO("element " << i << ": got " << got[i] << ", want " << want[i] << " (limit "
                                 << limit << ")");
      }
    }
  }
  CHECK(bad == 0);
}

std::vector<double> RefMatMul(const std::vector<double>& w, int64_t rows, int64_t cols,
                              const std::vector<float>& x, int64_t n, std::vector<double>* scale) {
  std::vector<double> y(static_cast<size_t>(n * rows));
  scale->assign(y.size(), 0.0);
  for (int64_t t = 0; t < n; ++t)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        y[t * rows + r] += w[r * cols + c] * x[t * cols + c];
        (*scale)[t * rows + r] += std::abs(w[r * cols + c] * x[t * cols + c]);
      }
  return y;
}

double Silu(double g) { return g / (1 + std::exp(-g)); }

// One row of the table: an operator in one weight format at one shape.
struct OpCase {
  Op op;
  WeightFormat format;
  std::string shape;
  std::function<void(Backend&)> run;
};

struct MatShape {
  int64_t rows, cols, n, group;
};

std::vector<MatShape> MatShapes(WeightFormat format) {
  if (format == WeightFormat::kInt4Grouped) {
    return {{5, 64, 1, 32}, {67, 96, 2, 32}, {33, 24, 8, 8}, {20, 128, 40, 64}};
  }
  return {{1, 1, 1, 0}, {5, 37, 1, 0}, {67, 130, 2, 0}, {33, 256, 8, 0}, {17, 64, 40, 0}};
}

std::string Shape(std::initializer_list<std::pair<const char*, int64_t>> dims) {
  std::string out;
  for (auto [name, value] : dims)
    out += std::string(out.empty() ? "" : " ") + name + "=" + std::to_string(value);
  return out;
}

// A paged KV cache for a test: sequences of the given lengths, blocks of `block_size`, in
// shuffled block order so no test passes by reading blocks contiguously.
struct TestKv {
  PagedKv kv;
  std::vector<float*> block_addresses;           // on the device
  std::vector<std::vector<int32_t>> blocks_of;   // per sequence: indexes into addresses
  std::vector<std::vector<float>> keys, values;  // per sequence: [len, kv_width] per layer 0
};

// Blocks for sequences of `lengths` tokens, `block_size` tokens a block, in shuffled memory
// order (so no test passes by reading blocks contiguously); each block holds `layers` layers
// of `layer_floats`.
struct ShuffledBlocks {
  float* pool = nullptr;                        // every block, on the device
  std::vector<float*> table;                    // block index -> its address in the pool
  std::vector<std::vector<int32_t>> blocks_of;  // per sequence: indexes into table
  std::vector<int32_t> physical;                // block index -> its place in the pool
};

ShuffledBlocks MakeShuffledBlocks(Mem& mem, const std::vector<int64_t>& lengths, int64_t block_size,
                                  int64_t layers, int64_t layer_floats, std::mt19937& rng) {
  ShuffledBlocks out;
  int32_t total = 0;
  for (int64_t len : lengths) {
    out.blocks_of.emplace_back();
    for (int64_t i = 0; i < (len + block_size - 1) / block_size; ++i)
      out.blocks_of.back().push_back(total++);
  }
  out.physical.resize(static_cast<size_t>(total));
  for (int32_t i = 0; i < total; ++i) out.physical[i] = i;
  std::shuffle(out.physical.begin(), out.physical.end(), rng);
  out.pool = mem.Zeros<float>(static_cast<size_t>(total * layers * layer_floats));
  for (int32_t i = 0; i < total; ++i)
    out.table.push_back(out.pool + out.physical[i] * layers * layer_floats);
  return out;
}

std::vector<OpCase> OpTable() {
  std::vector<OpCase> cases;
  // ---- matmul: every format, odd shapes, batch 1 to 40 (cuBLAS takes n >= 32 on a GPU)
  for (WeightFormat format : kAllWeightFormats) {
    for (MatShape s : MatShapes(format)) {
      cases.push_back({Op::kMatMul, format,
                       Shape({{"rows", s.rows}, {"cols", s.cols}, {"n", s.n}, {"group", s.group}}),
                       [format, s](Backend& b) {
                         std::mt19937 rng(static_cast<uint32_t>(s.rows * 131 + s.cols + s.n));
                         Mem mem(b);
                         std::vector<double> dense, scale;
                         WeightMatrix w = mem.Weights(format, s.rows, s.cols, s.group, rng, &dense);
                         std::vector<float> x = Random(static_cast<size_t>(s.n * s.cols), rng);
                         float* y = mem.Zeros<float>(static_cast<size_t>(s.n * s.rows));
                         REQUIRE(b.compute().MatMul(w, mem.Put(x), s.n, y).ok());
                         std::vector<double> want =
                             RefMatMul(dense, s.rows, s.cols, x, s.n, &scale);
                         CheckClose(mem.Get(y, want.size()), want, scale, 2e-6, 1e-6);
                       }});
    }
  }
  // ---- expert FFN: every format; tokens gathered from and scattered to arbitrary rows
  for (WeightFormat format : kAllWeightFormats) {
    struct FfnShape {
      int64_t width, inter, m, group;
    };
    std::vector<FfnShape> shapes =
        format == WeightFormat::kInt4Grouped
            ? std::vector<FfnShape>{{64, 96, 1, 32}, {24, 40, 3, 8}, {64, 32, 8, 32}}
            : std::vector<FfnShape>{{37, 53, 1, 0}, {64, 96, 3, 0}, {16, 8, 8, 0}};
    for (FfnShape s : shapes) {
      cases.push_back(
          {Op::kExpertFfn, format, Shape({{"width", s.width}, {"inter", s.inter}, {"m", s.m}}),
           [format, s](Backend& b) {
             std::mt19937 rng(static_cast<uint32_t>(s.width + s.inter * 7 + s.m));
             Mem mem(b);
             std::vector<double> g, u, d;
             SwiGluWeights w{mem.Weights(format, s.inter, s.width, s.group, rng, &g),
                             mem.Weights(format, s.inter, s.width, s.group, rng, &u),
                             mem.Weights(format, s.width, s.inter, s.group, rng, &d)};
             const int64_t tokens = s.m + 3, slots = 2 * tokens;
             std::vector<float> x = Random(static_cast<size_t>(tokens * s.width), rng);
             std::vector<int32_t> rows, out_rows;
             for (int64_t i = 0; i < s.m; ++i) {
               rows.push_back(static_cast<int32_t>((i * 5 + 2) % tokens));
               out_rows.push_back(static_cast<int32_t>(slots - 1 - 2 * i));
             }
             std::vector<float> out_init = Random(static_cast<size_t>(slots * s.width), rng);
             float* out = mem.Put(out_init);
             float* scratch = mem.Zeros<float>(
                 static_cast<size_t>(ExpertFfnScratchFloats(s.m, s.width, s.inter)));
             REQUIRE(
                 b.compute()
                     .ExpertFfn(w, mem.Put(x), mem.Put(rows), s.m, out, mem.Put(out_rows), scratch)
                     .ok());
             std::vector<double> want(out_init.begin(), out_init.end());
             std::vector<double> scale(want.size(), 0.0);
             for (int64_t i = 0; i < s.m; ++i) {
               std::vector<double> hidden(static_cast<size_t>(s.inter));
               double hidden_scale = 0;
               for (int64_t r = 0; r < s.inter; ++r) {
                 double gate = 0, up = 0;
                 for (int64_t c = 0; c < s.width; ++c) {
                   gate += g[r * s.width + c] * x[rows[i] * s.width + c];
                   up += u[r * s.width + c] * x[rows[i] * s.width + c];
                 }
                 hidden[r] = Silu(gate) * up;
                 hidden_scale = std::max(hidden_scale, std::abs(hidden[r]));
               }
               for (int64_t c = 0; c < s.width; ++c) {
                 double sum = 0, mag = 0;
                 for (int64_t r = 0; r < s.inter; ++r) {
                   sum += d[c * s.inter + r] * hidden[r];
                   mag +=
                       std::abs(d[c * s.inter + r]) * (std::abs(hidden[r]) + hidden_scale * 1e-2);
                 }
                 want[out_rows[i] * s.width + c] = sum;
                 scale[out_rows[i] * s.width + c] = mag;
               }
             }
             CheckClose(mem.Get(out, want.size()), want, scale, 1e-5, 1e-6);
           }});
    }
  }
  // ---- embedding: unquantized tables; every bf16 bit pattern widens exactly
  for (WeightFormat format : {WeightFormat::kF32, WeightFormat::kF16, WeightFormat::kBF16}) {
    cases.push_back({Op::kEmbedding, format, "vocab=11 width=37 n=1,2,8", [format](Backend& b) {
                       std::mt19937 rng(3);
                       Mem mem(b);
                       std::vector<double> dense;
                       WeightMatrix table = mem.Weights(format, 11, 37, 0, rng, &dense);
                       for (int64_t n : {1, 2, 8}) {
                         std::vector<int32_t> tokens;
                         for (int64_t t = 0; t < n; ++t)
                           tokens.push_back(static_cast<int32_t>((t * 7 + 10) % 11));
                         float* out = mem.Zeros<float>(static_cast<size_t>(n * 37));
                         REQUIRE(b.compute().Embed(table, mem.Put(tokens), n, out).ok());
                         std::vector<double> want;
                         for (int32_t token : tokens)
                           for (int64_t c = 0; c < 37; ++c)
                             want.push_back(dense[static_cast<int64_t>(token) * 37 + c]);
                         CheckClose(mem.Get(out, want.size()), want, {}, 0, 0);
                       }
                     }});
  }
  cases.push_back({Op::kEmbedding, WeightFormat::kBF16, "every bf16 value", [](Backend& b) {
                     Mem mem(b);
                     std::vector<uint16_t> all(65536);
                     for (uint32_t i = 0; i < 65536; ++i) all[i] = static_cast<uint16_t>(i);
                     WeightMatrix table{DType::kBF16, mem.Put(all), 4096, 16};
                     std::vector<int32_t> tokens(4096);
                     for (int32_t t = 0; t < 4096; ++t) tokens[t] = t;
                     float* out = mem.Zeros<float>(65536);
                     REQUIRE(b.compute().Embed(table, mem.Put(tokens), 4096, out).ok());
                     std::vector<float> got = mem.Get(out, 65536);
                     size_t bad = 0;
                     for (uint32_t i = 0; i < 65536; ++i) {
                       double want = DecodeBf16(static_cast<uint16_t>(i));
                       bool same = std::isnan(want) ? std::isnan(got[i]) : double(got[i]) == want;
                       bad += same ? 0 : 1;
                     }
                     CHECK(bad == 0);
                   }});
  // ---- norms: model width, per head (Qwen3) and whole projection (OLMoE); y may be x
  for (const std::pair<int64_t, int64_t>& shape :
       std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {2, 37}, {8, 128}, {24, 16}, {3, 4096}}) {
    const int64_t rows = shape.first, width = shape.second;  // (not bindings: lambdas capture them)
    cases.push_back({Op::kRmsNorm, WeightFormat::kF32, Shape({{"rows", rows}, {"width", width}}),
                     [rows, width](Backend& b) {
                       std::mt19937 rng(static_cast<uint32_t>(rows * width));
                       Mem mem(b);
                       std::vector<float> x = Random(static_cast<size_t>(rows * width), rng, 3.0f);
                       std::vector<float> w = Random(static_cast<size_t>(width), rng);
                       float* xs = mem.Put(x);
                       REQUIRE(b.compute().RmsNorm(xs, mem.Put(w), rows, width, 1e-5f, xs).ok());
                       std::vector<double> want(x.size());
                       for (int64_t r = 0; r < rows; ++r) {
                         double ss = 0;
                         for (int64_t c = 0; c < width; ++c)
                           ss += double(x[r * width + c]) * x[r * width + c];
                         double inv = 1 / std::sqrt(ss / width + 1e-5);
                         for (int64_t c = 0; c < width; ++c)
                           want[r * width + c] = x[r * width + c] * inv * w[c];
                       }
                       CheckClose(mem.Get(xs, want.size()), want, {}, 1e-6, 1e-7);
                     }});
  }
  // ---- rope: positions far into the context, both thetas the architectures use
  for (const std::tuple<int64_t, int64_t, double>& shape :
       std::vector<std::tuple<int64_t, int64_t, double>>{
           {1, 2, 1e4}, {3, 8, 1e6}, {4, 64, 1e4}, {2, 128, 1e6}}) {
    const int64_t heads = std::get<0>(shape), head_dim = std::get<1>(shape);
    const double theta = std::get<2>(shape);
    cases.push_back(
        {Op::kRope, WeightFormat::kF32, Shape({{"heads", heads}, {"head_dim", head_dim}, {"n", 8}}),
         [heads, head_dim, theta](Backend& b) {
           std::mt19937 rng(static_cast<uint32_t>(heads * head_dim));
           Mem mem(b);
           const int64_t n = 8;
           std::vector<float> x = Random(static_cast<size_t>(n * heads * head_dim), rng);
           std::vector<int64_t> positions = {0, 1, 2, 17, 255, 1000, 4095, 32767};
           float* xs = mem.Put(x);
           REQUIRE(b.compute().Rope(xs, n, heads, head_dim, mem.Put(positions), theta).ok());
           std::vector<double> want(x.size());
           const int64_t half = head_dim / 2;
           for (int64_t t = 0; t < n; ++t)
             for (int64_t h = 0; h < heads; ++h)
               for (int64_t i = 0; i < half; ++i) {
                 double angle = positions[t] * std::pow(theta, -2.0 * i / head_dim);
                 size_t a = (t * heads + h) * head_dim + i, c = a + half;
                 want[a] = x[a] * std::cos(angle) - x[c] * std::sin(angle);
                 want[c] = x[c] * std::cos(angle) + x[a] * std::sin(angle);
               }
           CheckClose(mem.Get(xs, want.size()), want, {}, 1e-6, 1e-6);
         }});
  }
  // ---- paged KV: write, then attend; grouped-query heads, blocks in shuffled order
  struct AttnShape {
    int64_t heads, kv_heads, head_dim, block_size;
    std::vector<int64_t> lengths;  // per sequence, after the step
    std::vector<int64_t> step;     // tokens each sequence adds in the step
  };
  for (const AttnShape& s : std::vector<AttnShape>{{4, 2, 8, 16, {5}, {5}},
                                                   {4, 4, 3, 3, {1, 10}, {1, 2}},
                                                   {8, 2, 64, 16, {40, 17, 3}, {1, 8, 1}},
                                                   {2, 1, 128, 4, {70}, {1}}}) {
    auto run_kv = [s](Backend& b, bool check_attention) {
      std::mt19937 rng(static_cast<uint32_t>(s.head_dim * 31 + s.block_size));
      Mem mem(b);
      const int64_t width = s.kv_heads * s.head_dim, layers = 2, layer = 1;
      const int64_t layer_floats = 2 * s.block_size * width;
      ShuffledBlocks blocks =
          MakeShuffledBlocks(mem, s.lengths, s.block_size, layers, layer_floats, rng);
      const auto& [pool, table, blocks_of, physical] = blocks;
      const int32_t total_blocks = static_cast<int32_t>(table.size());
      // Every position of every sequence is written (the earlier ones "in earlier steps").
      std::vector<int32_t> start;
      std::vector<int64_t> positions;
      std::vector<float> k, v;
      std::vector<std::vector<float>> seq_k(s.lengths.size()), seq_v(s.lengths.size());
      for (size_t q = 0; q < s.lengths.size(); ++q) {
        seq_k[q] = Random(static_cast<size_t>(s.lengths[q] * width), rng);
        seq_v[q] = Random(static_cast<size_t>(s.lengths[q] * width), rng);
        for (int64_t p = 0; p < s.lengths[q]; ++p) {
          start.push_back(blocks_of[q][0]);
          positions.push_back(p);
        }
        k.insert(k.end(), seq_k[q].begin(), seq_k[q].end());
        v.insert(v.end(), seq_v[q].begin(), seq_v[q].end());
      }
      PagedKv kv{mem.Put(table), mem.Put(start), mem.Put(positions), s.block_size,
                 s.kv_heads,     s.head_dim,     layer_floats};
      REQUIRE(b.compute()
                  .WriteKv(kv, static_cast<int>(layer), mem.Put(k), mem.Put(v),
                           static_cast<int64_t>(positions.size()))
                  .ok());
      if (!check_attention) {
        std::vector<float> got =
            mem.Get(pool, static_cast<size_t>(total_blocks * layers * layer_floats));
        size_t bad = 0;
        for (size_t q = 0; q < s.lengths.size(); ++q)
          for (int64_t p = 0; p < s.lengths[q]; ++p)
            for (int64_t c = 0; c < width; ++c) {
              int64_t base = physical[blocks_of[q][p / s.block_size]] * layers * layer_floats +
                             layer * layer_floats + (p % s.block_size) * width + c;
              bad += got[base] == seq_k[q][p * width + c] ? 0 : 1;
              bad += got[base + s.block_size * width] == seq_v[q][p * width + c] ? 0 : 1;
            }
        CHECK(bad == 0);
        return;
      }
      // The step: the last `step[q]` tokens of each sequence query the cache.
      std::vector<int32_t> q_start;
      std::vector<int64_t> q_pos;
      for (size_t q = 0; q < s.lengths.size(); ++q)
        for (int64_t p = s.lengths[q] - s.step[q]; p < s.lengths[q]; ++p) {
          q_start.push_back(blocks_of[q][0]);
          q_pos.push_back(p);
        }
      const int64_t n = static_cast<int64_t>(q_pos.size());
      std::vector<float> query = Random(static_cast<size_t>(n * s.heads * s.head_dim), rng);
      PagedKv step{kv.block_table, mem.Put(q_start), mem.Put(q_pos), s.block_size,
                   s.kv_heads,     s.head_dim,       layer_floats};
      float* out = mem.Zeros<float>(query.size());
      REQUIRE(b.compute()
                  .Attention(step, static_cast<int>(layer), mem.Put(query), n, s.heads, out)
                  .ok());
      std::vector<double> want(query.size()), scale(query.size());
      int64_t t = 0;
      for (size_t q = 0; q < s.lengths.size(); ++q)
        for (int64_t p = s.lengths[q] - s.step[q]; p < s.lengths[q]; ++p, ++t)
          for (int64_t h = 0; h < s.heads; ++h) {
            const int64_t kvh = h / (s.heads / s.kv_heads);
            std::vector<double> e;
            double total = 0, max_dot = -1e300;
            for (int64_t j = 0; j <= p; ++j) {
              double dot = 0;
              for (int64_t i = 0; i < s.head_dim; ++i)
                dot += double(query[(t * s.heads + h) * s.head_dim + i]) *
                       seq_k[q][j * width + kvh * s.head_dim + i];
              e.push_back(dot / std::sqrt(double(s.head_dim)));
              max_dot = std::max(max_dot, e.back());
            }
            for (double& x : e) total += x = std::exp(x - max_dot);
            for (int64_t i = 0; i < s.head_dim; ++i) {
              double sum = 0, mag = 0;
              for (int64_t j = 0; j <= p; ++j) {
                sum += e[j] / total * seq_v[q][j * width + kvh * s.head_dim + i];
                mag += e[j] / total * std::abs(seq_v[q][j * width + kvh * s.head_dim + i]);
              }
              want[(t * s.heads + h) * s.head_dim + i] = sum;
              scale[(t * s.heads + h) * s.head_dim + i] = mag;
            }
          }
      CheckClose(mem.Get(out, want.size()), want, scale, 2e-5, 1e-6);
    };
    std::string shape = Shape({{"heads", s.heads},
                               {"kv_heads", s.kv_heads},
                               {"head_dim", s.head_dim},
                               {"block", s.block_size},
                               {"sequences", static_cast<int64_t>(s.lengths.size())}});
    cases.push_back(
        {Op::kKvWrite, WeightFormat::kF32, shape, [run_kv](Backend& b) { run_kv(b, false); }});
    cases.push_back(
        {Op::kAttention, WeightFormat::kF32, shape, [run_kv](Backend& b) { run_kv(b, true); }});
  }
  // ---- router: softmax or sigmoid, renormalised or not, scaled, with a choice bias and group
  // limits (DeepSeek), ties broken toward the lower expert id
  struct RouterCase {
    int64_t experts, k;
    RouterScoring scoring;
    bool renormalize;
    float scale;
    bool bias;
    int64_t groups, top_groups;
    GroupScore group_score;
  };
  std::vector<RouterCase> router_cases;
  for (auto [experts, k] :
       std::vector<std::pair<int64_t, int64_t>>{{8, 2}, {60, 4}, {64, 8}, {3, 1}}) {
    for (bool renormalize : {false, true}) {
      router_cases.push_back(
          {experts, k, RouterScoring::kSoftmax, renormalize, 1.0f, false, 1, 1, GroupScore::kMax});
    }
  }
  router_cases.push_back(
      {8, 2, RouterScoring::kSoftmax, false, 2.5f, false, 1, 1, GroupScore::kMax});
  router_cases.push_back(
      {64, 6, RouterScoring::kSoftmax, false, 16.0f, false, 8, 3, GroupScore::kMax});
  router_cases.push_back(
      {16, 4, RouterScoring::kSigmoid, true, 2.5f, true, 4, 2, GroupScore::kTopTwoSum});
  router_cases.push_back(
      {256, 8, RouterScoring::kSigmoid, true, 2.5f, true, 8, 4, GroupScore::kTopTwoSum});
  router_cases.push_back(
      {32, 3, RouterScoring::kSigmoid, false, 1.0f, false, 1, 1, GroupScore::kMax});
  for (const RouterCase rc : router_cases) {
    cases.push_back(
        {Op::kRouterTopK, WeightFormat::kF32,
         Shape({{"experts", rc.experts},
                {"k", rc.k},
                {"sigmoid", rc.scoring == RouterScoring::kSigmoid},
                {"renormalized", rc.renormalize},
                {"scale_x10", static_cast<int64_t>(rc.scale * 10)},
                {"bias", rc.bias},
                {"groups", rc.groups},
                {"top_groups", rc.top_groups},
                {"top_two_sum", rc.group_score == GroupScore::kTopTwoSum}}),
         [rc](Backend& b) {
           const int64_t experts = rc.experts, k = rc.k;
           std::mt19937 rng(static_cast<uint32_t>(experts * k + rc.groups));
           Mem mem(b);
           const int64_t n = 8;
           std::vector<float> logits = Random(static_cast<size_t>(n * experts), rng, 2.0f);
           // Token 0: every logit equal (all tied); token 1: pairs of equal logits.
           for (int64_t e = 0; e < experts; ++e) {
             logits[e] = 0.25f;
             const int64_t pair = e / 2;  // equal for 2k and 2k + 1
             logits[experts + e] = static_cast<float>(pair);
           }
           std::vector<float> bias = Random(static_cast<size_t>(experts), rng, 0.05f);
           RouterSpec spec;
           spec.scoring = rc.scoring;
           spec.renormalize = rc.renormalize;
           spec.scale = rc.scale;
           spec.choice_bias = rc.bias ? mem.Put(bias) : nullptr;
           spec.groups = rc.groups;
           spec.top_groups = rc.top_groups;
           spec.group_score = rc.group_score;
           int32_t* chosen = mem.Zeros<int32_t>(static_cast<size_t>(n * k));
           float* weights = mem.Zeros<float>(static_cast<size_t>(n * k));
           REQUIRE(
               b.compute().RouterTopK(mem.Put(logits), n, experts, k, spec, chosen, weights).ok());
           std::vector<int32_t> got_ids = mem.Get(chosen, static_cast<size_t>(n * k));
           std::vector<float> got_w = mem.Get(weights, static_cast<size_t>(n * k));
           std::vector<double> want_w;
           const int64_t group_size = experts / rc.groups;
           for (int64_t t = 0; t < n; ++t) {
             std::vector<double> score(static_cast<size_t>(experts)), choice(score.size());
             double max_l = -1e300, total = 0;
             for (int64_t e = 0; e < experts; ++e)
               max_l = std::max(max_l, double(logits[t * experts + e]));
             for (int64_t e = 0; e < experts; ++e)
               total += std::exp(logits[t * experts + e] - max_l);
             for (int64_t e = 0; e < experts; ++e) {
               const double l = logits[t * experts + e];
               score[e] = rc.scoring == RouterScoring::kSoftmax ? std::exp(l - max_l) / total
                                                                : 1 / (1 + std::exp(-l));
               choice[e] = score[e] + (rc.bias ? bias[e] : 0.0);
             }
             // Groups ranked by their best choice or their two best choices' sum.
             std::vector<double> group_value(static_cast<size_t>(rc.groups));
             for (int64_t g = 0; g < rc.groups; ++g) {
               std::vector<double> members(choice.begin() + g * group_size,
                                           choice.begin() + (g + 1) * group_size);
               std::sort(members.rbegin(), members.rend());
               group_value[g] = rc.group_score == GroupScore::kMax || members.size() < 2
                                    ? members[0]
                                    : members[0] + members[1];
             }
             std::vector<int> groups(static_cast<size_t>(rc.groups));
             for (int g = 0; g < rc.groups; ++g) groups[g] = g;
             std::stable_sort(groups.begin(), groups.end(),
                              [&](int a, int c) { return group_value[a] > group_value[c]; });
             std::set<int> kept(groups.begin(), groups.begin() + rc.top_groups);
             std::vector<int> ids;
             for (int e = 0; e < experts; ++e) {
               if (kept.count(static_cast<int>(e / group_size)) == 1) ids.push_back(e);
             }
             std::stable_sort(ids.begin(), ids.end(),
                              [&](int a, int c) { return choice[a] > choice[c]; });
             double sum = 0;
             for (int64_t r = 0; r < k; ++r) sum += score[ids[r]];
             for (int64_t r = 0; r < k; ++r) {
               CHECK(got_ids[t * k + r] == ids[r]);
               double w = score[ids[r]];
               want_w.push_back((rc.renormalize ? w / sum : w) * rc.scale);
             }
           }
           CheckClose(got_w, want_w, {}, 1e-5, 1e-7);
         }});
  }
  // ---- rotary from a frequency table: rotate-half and adjacent pairs, on a slice of each head
  struct RotaryCase {
    int64_t heads, stride, offset, dims;
    RotaryStyle style;
    double magnitude;
  };
  for (const RotaryCase rc : std::vector<RotaryCase>{{4, 24, 16, 8, RotaryStyle::kPairs, 1.0},
                                                     {1, 8, 0, 8, RotaryStyle::kPairs, 1.0},
                                                     {3, 64, 0, 64, RotaryStyle::kHalf, 1.0},
                                                     {2, 40, 8, 32, RotaryStyle::kPairs, 1.37},
                                                     {2, 20, 4, 12, RotaryStyle::kHalf, 0.8}}) {
    cases.push_back({Op::kRotary, WeightFormat::kF32,
                     Shape({{"heads", rc.heads},
                            {"stride", rc.stride},
                            {"offset", rc.offset},
                            {"dims", rc.dims},
                            {"pairs", rc.style == RotaryStyle::kPairs},
                            {"magnitude_x100", static_cast<int64_t>(rc.magnitude * 100)}}),
                     [rc](Backend& b) {
                       std::mt19937 rng(static_cast<uint32_t>(rc.stride * 7 + rc.dims));
                       Mem mem(b);
                       const int64_t n = 5;
                       std::vector<int64_t> positions = {0, 1, 7, 100, 3000};
                       std::vector<double> inv_freq(static_cast<size_t>(rc.dims / 2));
                       std::uniform_real_distribution<double> freq(1e-4, 1.0);
                       for (double& f : inv_freq) f = freq(rng);
                       std::vector<float> x =
                           Random(static_cast<size_t>(n * rc.heads * rc.stride), rng);
                       RotarySpec spec{rc.heads, rc.stride,         rc.offset,   rc.dims,
                                       rc.style, mem.Put(inv_freq), rc.magnitude};
                       float* xs = mem.Put(x);
                       REQUIRE(b.compute().Rotary(xs, n, spec, mem.Put(positions)).ok());
                       std::vector<double> want(x.begin(), x.end());
                       const int64_t half = rc.dims / 2;
                       for (int64_t t = 0; t < n; ++t)
                         for (int64_t h = 0; h < rc.heads; ++h)
                           for (int64_t i = 0; i < half; ++i) {
                             const int64_t base = (t * rc.heads + h) * rc.stride + rc.offset;
                             const int64_t a = base + (rc.style == RotaryStyle::kPairs ? 2 * i : i);
                             const int64_t c =
                                 base + (rc.style == RotaryStyle::kPairs ? 2 * i + 1 : i + half);
                             const double angle = double(positions[t]) * inv_freq[i];
                             const double cs = std::cos(angle) * rc.magnitude;
                             const double sn = std::sin(angle) * rc.magnitude;
                             want[a] = x[a] * cs - x[c] * sn;
                             want[c] = x[c] * cs + x[a] * sn;
                           }
                       std::vector<double> scale(want.size());
                       for (size_t i = 0; i < want.size(); ++i)
                         scale[i] = 2 * rc.magnitude * std::abs(x[i]) + 1;
                       CheckClose(mem.Get(xs, want.size()), want, scale, 1e-6, 0);
                     }});
  }
  // ---- MLA attention in every kv_b format: written into a paged cache of latents and rope
  // keys with kv_write, checked against plain attention over keys and values rebuilt from
  // the latents (the non-absorbed form)
  struct MlaCase {
    int64_t heads, nope, rope, value, latent, block, group;
    std::vector<int64_t> lengths, step;
  };
  for (WeightFormat format : kAllWeightFormats) {
    for (const MlaCase& mc : std::vector<MlaCase>{{4, 16, 8, 16, 32, 16, 16, {5, 20}, {1, 3}},
                                                  {2, 8, 4, 12, 64, 4, 32, {9}, {9}}}) {
      cases.push_back(
          {Op::kMlaAttention, format,
           Shape({{"heads", mc.heads},
                  {"nope", mc.nope},
                  {"rope", mc.rope},
                  {"value", mc.value},
                  {"latent", mc.latent},
                  {"block", mc.block}}),
           [format, mc](Backend& b) {
             std::mt19937 rng(static_cast<uint32_t>(mc.latent * 13 + mc.heads));
             Mem mem(b);
             const int64_t layers = 2, layer = 1, R = mc.latent, dr = mc.rope;
             const int64_t layer_floats = mc.block * (R + dr);
             std::vector<double> kv_b;
             WeightMatrix w =
                 mem.Weights(format, mc.heads * (mc.nope + mc.value), R,
                             format == WeightFormat::kInt4Grouped ? mc.group : 0, rng, &kv_b);
             ShuffledBlocks blocks =
                 MakeShuffledBlocks(mem, mc.lengths, mc.block, layers, layer_floats, rng);
             const auto& [pool, table, blocks_of, physical] = blocks;
             std::vector<int32_t> start;
             std::vector<int64_t> positions;
             std::vector<float> latents, rope_keys;
             std::vector<std::vector<float>> seq_c(mc.lengths.size()), seq_r(mc.lengths.size());
             for (size_t q = 0; q < mc.lengths.size(); ++q) {
               seq_c[q] = Random(static_cast<size_t>(mc.lengths[q] * R), rng);
               seq_r[q] = Random(static_cast<size_t>(mc.lengths[q] * dr), rng);
               for (int64_t p = 0; p < mc.lengths[q]; ++p) {
                 start.push_back(blocks_of[q][0]);
                 positions.push_back(p);
               }
               latents.insert(latents.end(), seq_c[q].begin(), seq_c[q].end());
               rope_keys.insert(rope_keys.end(), seq_r[q].begin(), seq_r[q].end());
             }
             PagedKv kv{mem.Put(table),
                        mem.Put(start),
                        mem.Put(positions),
                        mc.block,
                        1,
                        R,
                        layer_floats,
                        dr};
             REQUIRE(b.compute()
                         .WriteKv(kv, static_cast<int>(layer), mem.Put(latents), mem.Put(rope_keys),
                                  static_cast<int64_t>(positions.size()))
                         .ok());
             std::vector<int32_t> q_start;
             std::vector<int64_t> q_pos;
             for (size_t q = 0; q < mc.lengths.size(); ++q)
               for (int64_t p = mc.lengths[q] - mc.step[q]; p < mc.lengths[q]; ++p) {
                 q_start.push_back(blocks_of[q][0]);
                 q_pos.push_back(p);
               }
             const int64_t n = static_cast<int64_t>(q_pos.size()), qd = mc.nope + mc.rope;
             std::vector<float> query = Random(static_cast<size_t>(n * mc.heads * qd), rng, 0.5f);
             PagedKv step{kv.block_table,
                          mem.Put(q_start),
                          mem.Put(q_pos),
                          mc.block,
                          1,
                          R,
                          layer_floats,
                          dr};
             MlaShape shape{mc.heads, mc.nope, mc.rope, mc.value, R, 0.3f};
             float* out = mem.Zeros<float>(static_cast<size_t>(n * mc.heads * mc.value));
             float* scratch = mem.Zeros<float>(static_cast<size_t>(MlaScratchFloats(n, shape)));
             REQUIRE(b.compute()
                         .MlaAttention(step, static_cast<int>(layer), mem.Put(query), n, shape, w,
                                       out, scratch)
                         .ok());
             const int64_t rows_per_head = mc.nope + mc.value;
             std::vector<double> want(static_cast<size_t>(n * mc.heads * mc.value)),
                 mag(want.size());
             int64_t t = 0;
             for (size_t q = 0; q < mc.lengths.size(); ++q)
               for (int64_t p = mc.lengths[q] - mc.step[q]; p < mc.lengths[q]; ++p, ++t)
                 for (int64_t h = 0; h < mc.heads; ++h) {
                   // Keys and values of head h at every position, rebuilt from the latents.
                   std::vector<double> e;
                   std::vector<std::vector<double>> values;
                   double max_s = -1e300;
                   for (int64_t j = 0; j <= p; ++j) {
                     const float* c = &seq_c[q][j * R];
                     double s_dot = 0;
                     for (int64_t i = 0; i < mc.nope; ++i) {
                       double key = 0;
                       for (int64_t r = 0; r < R; ++r)
                         key += kv_b[(h * rows_per_head + i) * R + r] * c[r];
                       s_dot += double(query[(t * mc.heads + h) * qd + i]) * key;
                     }
                     for (int64_t i = 0; i < dr; ++i)
                       s_dot += double(query[(t * mc.heads + h) * qd + mc.nope + i]) *
                                seq_r[q][j * dr + i];
                     e.push_back(s_dot * 0.3f);
                     max_s = std::max(max_s, e.back());
                     std::vector<double>& v = values.emplace_back(mc.value);
                     for (int64_t i = 0; i < mc.value; ++i)
                       for (int64_t r = 0; r < R; ++r)
                         v[i] += kv_b[(h * rows_per_head + mc.nope + i) * R + r] * c[r];
                   }
                   double total = 0;
                   for (double& x : e) total += x = std::exp(x - max_s);
                   for (int64_t i = 0; i < mc.value; ++i) {
                     double sum = 0, m = 0;
                     for (int64_t j = 0; j <= p; ++j) {
                       sum += e[j] / total * values[j][i];
                       m += std::abs(values[j][i]);
                     }
                     want[(t * mc.heads + h) * mc.value + i] = sum;
                     mag[(t * mc.heads + h) * mc.value + i] = m + 1;
                   }
                 }
             CheckClose(mem.Get(out, want.size()), want, mag, 2e-5, 1e-6);
           }});
    }
  }
  // ---- element-wise operators over odd sizes
  for (int64_t n : {1, 2, 8}) {
    for (int64_t width : {1, 37, 1000}) {
      std::string shape = Shape({{"n", n}, {"width", width}});
      cases.push_back({Op::kAddBias, WeightFormat::kF32, shape, [n, width](Backend& b) {
                         std::mt19937 rng(1);
                         Mem mem(b);
                         std::vector<float> x = Random(static_cast<size_t>(n * width), rng),
                                            bias = Random(static_cast<size_t>(width), rng);
                         float* xs = mem.Put(x);
                         REQUIRE(b.compute().AddBias(xs, mem.Put(bias), n, width).ok());
                         std::vector<double> want(x.size());
                         for (size_t i = 0; i < x.size(); ++i)
                           want[i] = double(x[i]) + bias[i % width];
                         CheckClose(mem.Get(xs, want.size()), want, {}, 1e-7, 0);
                       }});
      cases.push_back({Op::kAdd, WeightFormat::kF32, shape, [n, width](Backend& b) {
                         std::mt19937 rng(2);
                         Mem mem(b);
                         std::vector<float> a = Random(static_cast<size_t>(n * width), rng),
                                            x = Random(a.size(), rng);
                         float* as = mem.Put(a);
                         REQUIRE(b.compute().Add(as, mem.Put(x), n * width).ok());
                         std::vector<double> want(a.size());
                         for (size_t i = 0; i < a.size(); ++i) want[i] = double(a[i]) + x[i];
                         CheckClose(mem.Get(as, want.size()), want, {}, 1e-7, 0);
                       }});
      cases.push_back({Op::kSiluMul, WeightFormat::kF32, shape, [n, width](Backend& b) {
                         std::mt19937 rng(3);
                         Mem mem(b);
                         std::vector<float> g = Random(static_cast<size_t>(n * width), rng, 4.0f),
                                            u = Random(g.size(), rng);
                         float* out = mem.Zeros<float>(g.size());
                         REQUIRE(b.compute().SiluMul(mem.Put(g), mem.Put(u), n * width, out).ok());
                         std::vector<double> want(g.size());
                         for (size_t i = 0; i < g.size(); ++i) want[i] = Silu(g[i]) * u[i];
                         CheckClose(mem.Get(out, want.size()), want, {}, 1e-6, 1e-7);
                       }});
      cases.push_back(
          {Op::kSigmoidGatedAdd, WeightFormat::kF32, shape, [n, width](Backend& b) {
             std::mt19937 rng(4);
             Mem mem(b);
             std::vector<float> gate = Random(static_cast<size_t>(n), rng, 3.0f),
                                x = Random(static_cast<size_t>(n * width), rng),
                                o = Random(x.size(), rng);
             float* out = mem.Put(o);
             REQUIRE(b.compute().SigmoidGatedAdd(mem.Put(gate), mem.Put(x), n, width, out).ok());
             std::vector<double> want(o.size());
             for (size_t i = 0; i < o.size(); ++i)
               want[i] = o[i] + x[i] / (1 + std::exp(-double(gate[i / width])));
             CheckClose(mem.Get(out, want.size()), want, {}, 1e-6, 1e-7);
           }});
      cases.push_back(
          {Op::kMoeCombine, WeightFormat::kF32, shape + " k=2,8", [n, width](Backend& b) {
             for (int64_t k : {2, 8}) {
               std::mt19937 rng(5);
               Mem mem(b);
               std::vector<float> y = Random(static_cast<size_t>(n * k * width), rng),
                                  w = Random(static_cast<size_t>(n * k), rng);
               float* out = mem.Zeros<float>(static_cast<size_t>(n * width));
               REQUIRE(b.compute().MoeCombine(mem.Put(y), mem.Put(w), n, k, width, out).ok());
               std::vector<double> want(static_cast<size_t>(n * width)), scale(want.size());
               for (int64_t t = 0; t < n; ++t)
                 for (int64_t r = 0; r < k; ++r)
                   for (int64_t i = 0; i < width; ++i) {
                     want[t * width + i] += double(w[t * k + r]) * y[(t * k + r) * width + i];
                     scale[t * width + i] +=
                         std::abs(double(w[t * k + r]) * y[(t * k + r) * width + i]);
                   }
               CheckClose(mem.Get(out, want.size()), want, scale, 1e-6, 0);
             }
           }});
      cases.push_back(
          {Op::kGatherRows, WeightFormat::kF32, shape, [n, width](Backend& b) {
             std::mt19937 rng(6);
             Mem mem(b);
             const int64_t src_rows = n + 5;
             std::vector<float> src = Random(static_cast<size_t>(src_rows * width), rng);
             std::vector<int32_t> rows;
             for (int64_t i = 0; i < n; ++i)
               rows.push_back(static_cast<int32_t>((i * 3 + 4) % src_rows));
             float* dst = mem.Zeros<float>(static_cast<size_t>(n * width));
             REQUIRE(b.compute().GatherRows(mem.Put(src), width, mem.Put(rows), n, dst).ok());
             std::vector<double> want;
             for (int32_t r : rows)
               for (int64_t i = 0; i < width; ++i) want.push_back(src[r * width + i]);
             CheckClose(mem.Get(dst, want.size()), want, {}, 0, 0);
           }});
    }
  }
  return cases;
}

std::set<std::pair<Op, WeightFormat>> Covered() {
  std::set<std::pair<Op, WeightFormat>> covered;
  for (const OpCase& c : OpTable())
    covered.insert({c.op, OpTakesWeights(c.op) ? c.format : WeightFormat::kF32});
  return covered;
}

TEST_CASE("every operator matches its reference on every backend, format and shape") {
  for (const NamedBackend& nb : BackendsUnderTest()) {
    for (const OpCase& c : OpTable()) {
      INFO(nb.name << ": " << OpName(c.op) << " " << WeightFormatName(c.format) << " " << c.shape);
      REQUIRE(nb.backend->device().Supports(c.op, c.format));
      c.run(*nb.backend);
      REQUIRE(nb.backend->compute().Synchronize().ok());
    }
  }
}

TEST_CASE("a router spec the experts cannot satisfy is refused on every backend") {
  for (const NamedBackend& nb : BackendsUnderTest()) {
    INFO(nb.name);
    Mem mem(*nb.backend);
    std::mt19937 rng(4);
    std::vector<float> logits = Random(16, rng);
    int32_t* chosen = mem.Zeros<int32_t>(8);
    float* weights = mem.Zeros<float>(8);
    RouterSpec uneven;  // 3 groups do not divide 16 experts
    uneven.groups = 3;
    RouterSpec too_few;  // the best group of 4 holds 4 experts, not 6
    too_few.groups = 4;
    too_few.top_groups = 1;
    for (const auto& [spec, k] : {std::pair{uneven, int64_t{2}}, std::pair{too_few, int64_t{6}}}) {
      absl::Status status =
          nb.backend->compute().RouterTopK(mem.Put(logits), 1, 16, k, spec, chosen, weights);
      CHECK(status.code() == absl::StatusCode::kInvalidArgument);
      CHECK(status.message().find("router_topk") != absl::string_view::npos);
    }
  }
}

TEST_CASE("the table has every operator, and every weight format of the weighted ones") {
  std::set<std::pair<Op, WeightFormat>> covered = Covered();
  for (Op op : kAllOps) {
    if (op == Op::kEmbedding) {
      for (WeightFormat f : {WeightFormat::kF32, WeightFormat::kF16, WeightFormat::kBF16})
        CHECK(covered.count({op, f}) == 1);
    } else if (OpTakesWeights(op)) {
      for (WeightFormat f : kAllWeightFormats) {
        INFO(OpName(op) << " " << WeightFormatName(f));
        CHECK(covered.count({op, f}) == 1);
      }
    } else {
      INFO(OpName(op));
      CHECK(covered.count({op, WeightFormat::kF32}) == 1);
    }
  }
}

// Forwards to a real backend and records which (operator, format) pairs were called.
class RecordingStream final : public Stream {
 public:
  RecordingStream(Stream& inner, std::set<std::pair<Op, WeightFormat>>* seen)
      : inner_(inner), seen_(*seen) {}
  absl::Status CopyToDevice(const DeviceBuffer& d, size_t o, const void* s, size_t n) override {
    return inner_.CopyToDevice(d, o, s, n);
  }
  absl::Status CopyOnDevice(const DeviceBuffer& d, size_t o, const DeviceBuffer& s, size_t so,
                            size_t n) override {
    return inner_.CopyOnDevice(d, o, s, so, n);
  }
  absl::Status CopyToHost(void* d, const DeviceBuffer& s, size_t o, size_t n) override {
    return inner_.CopyToHost(d, s, o, n);
  }
  absl::StatusOr<Event> Record() override { return inner_.Record(); }
  absl::Status Wait(const Event& e) override { return inner_.Wait(e); }
  absl::Status Synchronize() override { return inner_.Synchronize(); }
  absl::Status Embed(const WeightMatrix& t, const int32_t* tok, int64_t n, float* out) override {
    Note(Op::kEmbedding, t.format());
    Audit(t);
    return inner_.Embed(t, tok, n, out);
  }
  absl::Status RmsNorm(const float* x, const float* w, int64_t r, int64_t wd, float e,
                       float* y) override {
    Note(Op::kRmsNorm);
    if (audit) audit(w, static_cast<size_t>(wd) * sizeof(float));
    return inner_.RmsNorm(x, w, r, wd, e, y);
  }
  absl::Status MatMul(const WeightMatrix& w, const float* x, int64_t n, float* y) override {
    Note(Op::kMatMul, w.format());
    Audit(w);
    return inner_.MatMul(w, x, n, y);
  }
  absl::Status AddBias(float* x, const float* b, int64_t r, int64_t w) override {
    Note(Op::kAddBias);
    if (audit) audit(b, static_cast<size_t>(w) * sizeof(float));
    return inner_.AddBias(x, b, r, w);
  }
  absl::Status Rope(float* x, int64_t n, int64_t h, int64_t d, const int64_t* p,
                    double t) override {
    Note(Op::kRope);
    return inner_.Rope(x, n, h, d, p, t);
  }
  absl::Status WriteKv(const PagedKv& kv, int l, const float* k, const float* v,
                       int64_t n) override {
    Note(Op::kKvWrite);
    return inner_.WriteKv(kv, l, k, v, n);
  }
  absl::Status Attention(const PagedKv& kv, int l, const float* q, int64_t n, int64_t h,
                         float* o) override {
    Note(Op::kAttention);
    return inner_.Attention(kv, l, q, n, h, o);
  }
  absl::Status RouterTopK(const float* lg, int64_t n, int64_t e, int64_t k, const RouterSpec& s,
                          int32_t* c, float* w) override {
    Note(Op::kRouterTopK);
    if (audit && s.choice_bias != nullptr) audit(s.choice_bias, static_cast<size_t>(e) * 4);
    return inner_.RouterTopK(lg, n, e, k, s, c, w);
  }
  absl::Status Rotary(float* x, int64_t n, const RotarySpec& spec, const int64_t* p) override {
    Note(Op::kRotary);
    if (audit) audit(spec.inv_freq, static_cast<size_t>(spec.dims / 2) * sizeof(double));
    return inner_.Rotary(x, n, spec, p);
  }
  absl::Status MlaAttention(const PagedKv& kv, int l, const float* q, int64_t n,
                            const MlaShape& shape, const WeightMatrix& kv_b, float* o,
                            float* scratch) override {
    Note(Op::kMlaAttention, kv_b.format());
    Audit(kv_b);
    return inner_.MlaAttention(kv, l, q, n, shape, kv_b, o, scratch);
  }
  absl::Status SiluMul(const float* g, const float* u, int64_t n, float* o) override {
    Note(Op::kSiluMul);
    return inner_.SiluMul(g, u, n, o);
  }
  absl::Status ExpertFfn(const SwiGluWeights& w, const float* x, const int32_t* r, int64_t m,
                         float* o, const int32_t* orow, float* s) override {
    Note(Op::kExpertFfn, w.gate.format());
    Audit(w.gate);
    Audit(w.up);
    Audit(w.down);
    return inner_.ExpertFfn(w, x, r, m, o, orow, s);
  }
  absl::Status MoeCombine(const float* y, const float* w, int64_t n, int64_t k, int64_t wd,
                          float* o) override {
    Note(Op::kMoeCombine);
    return inner_.MoeCombine(y, w, n, k, wd, o);
  }
  absl::Status Add(float* a, const float* x, int64_t n) override {
    Note(Op::kAdd);
    return inner_.Add(a, x, n);
  }
  absl::Status SigmoidGatedAdd(const float* g, const float* x, int64_t n, int64_t w,
                               float* o) override {
    Note(Op::kSigmoidGatedAdd);
    return inner_.SigmoidGatedAdd(g, x, n, w, o);
  }
  absl::Status GatherRows(const float* s, int64_t w, const int32_t* r, int64_t m,
                          float* d) override {
    Note(Op::kGatherRows);
    return inner_.GatherRows(s, w, r, m, d);
  }

  // Called with every weight the operators read (data, scales, norm vectors, biases).
  std::function<void(const void*, size_t)> audit;

 private:
  void Note(Op op, WeightFormat format = WeightFormat::kF32) { seen_.insert({op, format}); }
  void Audit(const WeightMatrix& w) {
    if (!audit) return;
    audit(w.data, static_cast<size_t>(w.DataBytes()));
    if (w.scales != nullptr) audit(w.scales, static_cast<size_t>(w.ScaleBytes()));
  }
  Stream& inner_;
  std::set<std::pair<Op, WeightFormat>>& seen_;
};

class RecordingBackend : public Backend {
 public:
  explicit RecordingBackend(std::shared_ptr<Backend> inner)
      : inner_(std::move(inner)),
        compute_(inner_->compute(), &seen),
        copy_(inner_->copy(), &seen) {}
  absl::string_view name() const override { return inner_->name(); }
  Device& device() override { return inner_->device(); }
  Stream& compute() override { return compute_; }
  Stream& copy() override { return copy_; }
  std::set<std::pair<Op, WeightFormat>> seen;

 protected:
  std::shared_ptr<Backend> inner_;
  RecordingStream compute_, copy_;
};

// A device that, like a GPU, cannot compute on host memory: the model must copy every weight
// into its buffers (or stage each expert there). It computes on the CPU, and counts every
// weight an operator is handed outside the memory it allocated.
class DeviceOnlyMemory final : public Device {
 public:
  explicit DeviceOnlyMemory(Device& inner) : inner_(inner) {}
  absl::StatusOr<DeviceInfo> info() const override { return inner_.info(); }
  absl::StatusOr<DeviceBuffer> Allocate(size_t bytes) override {
    absl::StatusOr<DeviceBuffer> buffer = inner_.Allocate(bytes);
    if (!buffer.ok()) return buffer.status();
    // Handed out as this device's, its range remembered for the audit.
    void* data = buffer->data();
    size_t size = buffer->size();
    held_.push_back(*std::move(buffer));
    ranges_[reinterpret_cast<uintptr_t>(data)] = size;
    return DeviceBuffer(this, data, size, BufferKind::kDevice);
  }
  absl::StatusOr<DeviceBuffer> AllocateHost(size_t bytes) override {
    return inner_.AllocateHost(bytes);
  }
  bool host_memory_is_device_memory() const override { return false; }
  bool Supports(Op op, WeightFormat format) const override { return inner_.Supports(op, format); }
  absl::Status WaitForEvent(const Event& event) override { return inner_.WaitForEvent(event); }
  bool Holds(const void* at, size_t bytes) const {
    const auto address = reinterpret_cast<uintptr_t>(at);
    auto it = ranges_.upper_bound(address);
    if (it == ranges_.begin()) return false;
    --it;
    return address + bytes <= it->first + it->second;
  }

 protected:
  void Free(void* data, size_t, BufferKind) override {
    ranges_.erase(reinterpret_cast<uintptr_t>(data));
    for (auto it = held_.begin(); it != held_.end(); ++it) {
      if (it->data() == data) {
        held_.erase(it);
        return;
      }
    }
  }

 private:
  Device& inner_;
  std::vector<DeviceBuffer> held_;
  std::map<uintptr_t, size_t> ranges_;
};

class DeviceOnlyBackend final : public RecordingBackend {
 public:
  explicit DeviceOnlyBackend(std::shared_ptr<Backend> inner)
      : RecordingBackend(std::move(inner)), memory_(inner_->device()) {
    compute_.audit = [this](const void* at, size_t bytes) {
      ++weights_read;
      if (!memory_.Holds(at, bytes)) ++outside;
    };
  }
  Device& device() override { return memory_; }
  size_t weights_read = 0, outside = 0;

 private:
  DeviceOnlyMemory memory_;
};

constexpr model::Architecture kArchitectures[] = {
    model::Architecture::kMixtral,    model::Architecture::kQwen2Moe,
    model::Architecture::kQwen3Moe,   model::Architecture::kOlmoe,
    model::Architecture::kDeepseekV2, model::Architecture::kDeepseekV3};

TEST_CASE("every operator the models call is in the table, for every architecture and precision") {
  const std::set<std::pair<Op, WeightFormat>> covered = Covered();
  const testing::ScratchDir scratch("moed_backend_ops");
  const fs::path& root = scratch.path();
  std::set<std::pair<Op, WeightFormat>> all_seen;
  auto check = [&](RecordingBackend& recording, model::Model& model) {
    std::unique_ptr<model::KvCache> cache = model.NewKvCache(16);
    model::SequenceInput input{cache.get(), {1, 2, 3}, true};
    REQUIRE(model.Forward(absl::MakeSpan(&input, 1)).ok());
    model::SequenceInput next{cache.get(), {4}, false};
    REQUIRE(model.Forward(absl::MakeSpan(&next, 1)).ok());
    for (const auto& pair : recording.seen) {
      INFO(OpName(pair.first) << " " << WeightFormatName(pair.second));
      CHECK(covered.count(
                {pair.first, OpTakesWeights(pair.first) ? pair.second : WeightFormat::kF32}) == 1);
      all_seen.insert(pair);
    }
  };
  for (model::Architecture arch : kArchitectures) {
    for (DType dtype : {DType::kBF16, DType::kF16, DType::kF32}) {
      tools::SynthSpec spec = *tools::PresetSpec("tiny", arch);
      spec.dtype = dtype;
      const fs::path dir =
          root / (std::string(model::ArchitectureName(arch)) + DTypeName(dtype).data());
      REQUIRE(tools::WriteCheckpoint(spec, dir.string()).ok());
      auto recording = std::make_shared<RecordingBackend>(TestCpuBackend(1));
      auto model = model::Model::Load(dir.string(), recording);
      REQUIRE(model.ok());
      check(*recording, **model);
      if (dtype != DType::kBF16) continue;
      // The packed store's int8 and int4 experts.
      const fs::path store_dir = dir.string() + "-store";
      REQUIRE(tools::Pack(dir.string(), store_dir.string(), tools::PackOptions{}).ok());
      auto store = cache::Store::Open(store_dir.string());
      REQUIRE(store.ok());
      for (cache::Precision precision : {cache::Precision::kInt8, cache::Precision::kInt4}) {
        cache::CacheOptions options;
        options.precision = precision;
        auto experts = cache::ExpertCache::Create(*store, options);
        REQUIRE(experts.ok());
        auto quantized_recording = std::make_shared<RecordingBackend>(TestCpuBackend(1));
        auto quantized = model::Model::Create((*store)->config(), *store, *std::move(experts),
                                              quantized_recording);
        REQUIRE(quantized.ok());
        check(*quantized_recording, **quantized);
      }
    }
  }
  // The models reach the quantized expert formats and the q/k norms: the check above is live.
  CHECK(all_seen.count({Op::kExpertFfn, WeightFormat::kInt4Grouped}) == 1);
  CHECK(all_seen.count({Op::kExpertFfn, WeightFormat::kInt8PerRow}) == 1);
  CHECK(all_seen.count({Op::kSigmoidGatedAdd, WeightFormat::kF32}) == 1);
  CHECK(all_seen.count({Op::kAddBias, WeightFormat::kF32}) == 1);
  CHECK(all_seen.count({Op::kMlaAttention, WeightFormat::kBF16}) == 1);
  CHECK(all_seen.count({Op::kRotary, WeightFormat::kF32}) == 1);
}

TEST_CASE("a device that cannot read host memory gets every weight copied or staged, bitwise") {
  const testing::ScratchDir scratch("moed_device_only");
  const fs::path& root = scratch.path();
  auto logits_of = [](model::Model& model) {
    std::unique_ptr<model::KvCache> cache = model.NewKvCache(16);
    model::SequenceInput input{cache.get(), {1, 2, 3, 4, 5}, true};
    auto out = model.Forward(absl::MakeSpan(&input, 1));
    REQUIRE(out.ok());
    model::SequenceInput next{cache.get(), {6}, false};
    auto step = model.Forward(absl::MakeSpan(&next, 1));
    REQUIRE(step.ok());
    std::vector<float> all = out->logits;
    all.insert(all.end(), step->logits.begin(), step->logits.end());
    return all;
  };
  for (model::Architecture arch : kArchitectures) {
    INFO(model::ArchitectureName(arch));
    const fs::path dir = root / std::string(model::ArchitectureName(arch));
    REQUIRE(tools::WriteCheckpoint(*tools::PresetSpec("tiny", arch), dir.string()).ok());
    auto reference = model::Model::Load(dir.string(), TestCpuBackend(1));
    REQUIRE(reference.ok());
    const std::vector<float> expected = logits_of(**reference);
    {  // A checkpoint: every weight copied to the device at load.
      auto device_only = std::make_shared<DeviceOnlyBackend>(TestCpuBackend(1));
      auto model = model::Model::Load(dir.string(), device_only);
      REQUIRE(model.ok());
      CHECK(logits_of(**model) == expected);
      CHECK(device_only->weights_read > 0);
      CHECK(device_only->outside == 0);
    }
    // A store: the expert cache serves host memory, staged to the device per use.
    const fs::path store_dir = dir.string() + "-store";
    REQUIRE(tools::Pack(dir.string(), store_dir.string(), tools::PackOptions{}).ok());
    auto store = cache::Store::Open(store_dir.string());
    REQUIRE(store.ok());
    for (cache::Precision precision : {cache::Precision::kSource, cache::Precision::kInt4}) {
      cache::CacheOptions options;
      options.precision = precision;
      auto host_experts = cache::ExpertCache::Create(*store, options);
      auto staged_experts = cache::ExpertCache::Create(*store, options);
      REQUIRE((host_experts.ok() && staged_experts.ok()));
      auto on_cpu = model::Model::Create((*store)->config(), *store, *std::move(host_experts),
                                         TestCpuBackend(1));
      auto device_only = std::make_shared<DeviceOnlyBackend>(TestCpuBackend(1));
      auto staged =
          model::Model::Create((*store)->config(), *store, *std::move(staged_experts), device_only);
      REQUIRE((on_cpu.ok() && staged.ok()));
      CHECK(logits_of(**staged) == logits_of(**on_cpu));
      CHECK(device_only->outside == 0);
    }
  }
}

}  // namespace
}  // namespace moed::kernels
