#include "kernels/cpu_backend.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <numeric>
#include <string>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "kernels/cpu_ops.h"
#include "kernels/host_memory.h"
#include "kernels/quant.h"
#include "kernels/thread_pool.h"

namespace moed::kernels {
namespace {

constexpr size_t kAlignment = 64;

std::string CpuModelName() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  while (std::getline(cpuinfo, line)) {
    if (absl::StartsWith(line, "model name")) {
      std::pair<absl::string_view, absl::string_view> kv =
          absl::StrSplit(line, absl::MaxSplits(':', 1));
      return std::string(absl::StripAsciiWhitespace(kv.second));
    }
  }
  return "CPU";
}

// Reads "MemTotal" / "MemAvailable" (kB) from /proc/meminfo.
uint64_t MemInfoBytes(absl::string_view key) {
  std::ifstream meminfo("/proc/meminfo");
  std::string line;
  while (std::getline(meminfo, line)) {
    absl::string_view rest = line;
    if (absl::ConsumePrefix(&rest, key) && absl::ConsumePrefix(&rest, ":")) {
      rest = absl::StripAsciiWhitespace(rest);
      absl::ConsumeSuffix(&rest, " kB");
      uint64_t kib = 0;
      if (absl::SimpleAtoi(rest, &kib)) return kib * 1024;
    }
  }
  return 0;
}

class CpuDevice final : public Device {
 public:
  absl::StatusOr<DeviceInfo> info() const override {
    DeviceInfo info;
    info.index = 0;
    info.name = CpuModelName();
    info.total_memory_bytes = MemInfoBytes("MemTotal");
    info.free_memory_bytes = MemInfoBytes("MemAvailable");
    info.compute_units = static_cast<int>(std::thread::hardware_concurrency());
    return info;
  }
  absl::StatusOr<DeviceBuffer> Allocate(size_t bytes) override {
    return AllocateKind(bytes, BufferKind::kDevice);
  }
  absl::StatusOr<DeviceBuffer> AllocateHost(size_t bytes) override {
    return AllocateKind(bytes, BufferKind::kPinnedHost);
  }
  bool host_memory_is_device_memory() const override { return true; }
  // Work runs in order on the calling thread: an event is done once recorded.
  absl::Status WaitForEvent(const Event& /*event*/) override { return absl::OkStatus(); }
  bool Supports(Op op, WeightFormat format) const override {
    // The embedding table is read row by row, widened: unquantized formats only.
    if (op == Op::kEmbedding) {
      return format == WeightFormat::kF32 || format == WeightFormat::kF16 ||
             format == WeightFormat::kBF16;
    }
    return true;
  }

 protected:
  void Free(void* data, size_t /*bytes*/, BufferKind /*kind*/) override { std::free(data); }

 private:
  absl::StatusOr<DeviceBuffer> AllocateKind(size_t bytes, BufferKind kind) {
    // Pinned host memory is page-aligned, as a GPU driver's is: O_DIRECT reads land in it.
    return host_memory::Allocate(this, bytes, kind,
                                 kind == BufferKind::kPinnedHost ? size_t{4096} : kAlignment);
  }
};

// Everything runs in order on the calling thread (fanned out to the pool inside an
// operator), so a stream's work is done when the call returns and events are empty.
class CpuStream final : public Stream {
 public:
  explicit CpuStream(ThreadPool* pool) : pool_(*pool) {}

  absl::Status CopyToDevice(const DeviceBuffer& dst, size_t dst_offset, const void* src,
                            size_t bytes) override {
    return host_memory::CopyToDevice(dst, dst_offset, src, bytes);
  }
  absl::Status CopyOnDevice(const DeviceBuffer& dst, size_t dst_offset, const DeviceBuffer& src,
                            size_t src_offset, size_t bytes) override {
    return host_memory::CopyOnDevice(dst, dst_offset, src, src_offset, bytes);
  }
  absl::Status CopyToHost(void* dst, const DeviceBuffer& src, size_t src_offset,
                          size_t bytes) override {
    return host_memory::CopyToHost(dst, src, src_offset, bytes);
  }
  absl::StatusOr<Event> Record() override { return Event(); }
  absl::Status Wait(const Event& /*event*/) override { return absl::OkStatus(); }
  absl::Status Synchronize() override { return absl::OkStatus(); }

  absl::Status Embed(const WeightMatrix& table, const int32_t* tokens, int64_t n,
                     float* out) override {
    const int64_t width = table.cols;
    const size_t row_bytes = static_cast<size_t>(width) * DTypeSize(table.dtype);
    for (int64_t t = 0; t < n; ++t) {
      WidenToF32(table.dtype, static_cast<const char*>(table.data) + tokens[t] * row_bytes, width,
                 out + t * width);
    }
    return absl::OkStatus();
  }
  absl::Status RmsNorm(const float* x, const float* weight, int64_t rows, int64_t width, float eps,
                       float* y) override {
    cpu::RmsNorm(x, weight, rows, width, eps, y);
    return absl::OkStatus();
  }
  absl::Status MatMul(const WeightMatrix& w, const float* x, int64_t n, float* y) override {
    cpu::MatMul(w, x, n, y, pool_);
    return absl::OkStatus();
  }
  absl::Status AddBias(float* x, const float* bias, int64_t rows, int64_t width) override {
    for (int64_t t = 0; t < rows; ++t) {
      for (int64_t i = 0; i < width; ++i) x[t * width + i] += bias[i];
    }
    return absl::OkStatus();
  }
  absl::Status Rope(float* x, int64_t n, int64_t heads, int64_t head_dim, const int64_t* positions,
                    double theta) override {
    cpu::RopeNeox(x, n, heads, head_dim, positions, theta);
    return absl::OkStatus();
  }
  absl::Status WriteKv(const PagedKv& kv, int layer, const float* k, const float* v,
                       int64_t n) override {
    cpu::PagedWriteKv(kv, layer, k, v, n);
    return absl::OkStatus();
  }
  absl::Status Attention(const PagedKv& kv, int layer, const float* q, int64_t n, int64_t heads,
                         float* out) override {
    cpu::PagedAttention(kv, layer, q, n, heads, out, pool_);
    return absl::OkStatus();
  }
  absl::Status RouterTopK(const float* logits, int64_t n, int64_t experts, int64_t k,
                          const RouterSpec& spec, int32_t* chosen, float* weights) override {
    if (absl::Status s = CheckRouterSpec(experts, k, spec); !s.ok()) return s;
    cpu::RouterTopK(logits, n, experts, k, spec, chosen, weights);
    return absl::OkStatus();
  }
  absl::Status SiluMul(const float* gate, const float* up, int64_t count, float* out) override {
    cpu::SiluMul(gate, up, count, out);
    return absl::OkStatus();
  }
  absl::Status ExpertFfn(const SwiGluWeights& w, const float* x, const int32_t* rows, int64_t m,
                         float* out, const int32_t* out_rows, float* scratch) override {
    const int64_t width = w.gate.cols, inter = w.gate.rows;
    float* gathered = scratch;
    float* gate = gathered + m * width;
    float* up = gate + m * inter;
    float* down = up + m * inter;
    for (int64_t i = 0; i < m; ++i) std::copy_n(x + rows[i] * width, width, gathered + i * width);
    cpu::SwiGlu(w.gate, w.up, gathered, m, gate, up, pool_);
    cpu::MatMul(w.down, gate, m, down, pool_);
    for (int64_t i = 0; i < m; ++i) std::copy_n(down + i * width, width, out + out_rows[i] * width);
    return absl::OkStatus();
  }
  absl::Status MoeCombine(const float* expert_out, const float* weights, int64_t n, int64_t k,
                          int64_t width, float* out) override {
    for (int64_t t = 0; t < n; ++t) {
      float* o = out + t * width;
      std::fill(o, o + width, 0.0f);
      for (int64_t r = 0; r < k; ++r) {
        const float* y = expert_out + (t * k + r) * width;
        float weight = weights[t * k + r];
        for (int64_t i = 0; i < width; ++i) o[i] += weight * y[i];
      }
    }
    return absl::OkStatus();
  }
  absl::Status Add(float* acc, const float* x, int64_t count) override {
    for (int64_t i = 0; i < count; ++i) acc[i] += x[i];
    return absl::OkStatus();
  }
  absl::Status SigmoidGatedAdd(const float* gate_logits, const float* x, int64_t n, int64_t width,
                               float* out) override {
    for (int64_t t = 0; t < n; ++t) {
      float g = 1.0f / (1.0f + std::exp(-gate_logits[t]));
      for (int64_t i = 0; i < width; ++i) out[t * width + i] += g * x[t * width + i];
    }
    return absl::OkStatus();
  }
  absl::Status GatherRows(const float* src, int64_t width, const int32_t* rows, int64_t m,
                          float* dst) override {
    for (int64_t i = 0; i < m; ++i) std::copy_n(src + rows[i] * width, width, dst + i * width);
    return absl::OkStatus();
  }
  absl::Status Rotary(float* x, int64_t n, const RotarySpec& spec,
                      const int64_t* positions) override {
    cpu::Rotary(x, n, spec, positions);
    return absl::OkStatus();
  }
  absl::Status MlaAttention(const PagedKv& kv, int layer, const float* q, int64_t n,
                            const MlaShape& shape, const WeightMatrix& kv_b, float* out,
                            float* /*scratch*/) override {
    cpu::MlaAttention(kv, layer, q, n, shape, kv_b, out, pool_);
    return absl::OkStatus();
  }

 private:
  ThreadPool& pool_;
};

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(int threads) : pool_(threads), compute_(&pool_), copy_(&pool_) {}
  absl::string_view name() const override { return "cpu"; }
  Device& device() override { return device_; }
  Stream& compute() override { return compute_; }
  Stream& copy() override { return copy_; }

 private:
  CpuDevice device_;
  ThreadPool pool_;
  CpuStream compute_;
  CpuStream copy_;
};

}  // namespace

std::unique_ptr<Backend> CreateCpuBackend(int threads) {
  return std::make_unique<CpuBackend>(threads);
}

}  // namespace moed::kernels
