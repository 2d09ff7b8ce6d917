// A Backend that forwards to another and adds up, per operator, the wall time each call took:
// a decode step's breakdown by stage. Meaningful for backends that finish an operator before
// returning (the CPU's); on a GPU it would time the launches only.
#pragma once

#include <chrono>
#include <map>
#include <memory>
#include <utility>

#include "kernels/backend.h"

namespace moed::tools {

class TimingStream final : public kernels::Stream {
 public:
  explicit TimingStream(kernels::Stream& inner) : inner_(inner) {}

  // Seconds spent in each operator since the last Reset, and calls.
  struct Total {
    double seconds = 0;
    uint64_t calls = 0;
  };
  const std::map<kernels::Op, Total>& totals() const { return totals_; }
  void Reset() { totals_.clear(); }

  absl::Status CopyToDevice(const kernels::DeviceBuffer& d, size_t o, const void* s,
                            size_t n) override {
    return inner_.CopyToDevice(d, o, s, n);
  }
  absl::Status CopyOnDevice(const kernels::DeviceBuffer& d, size_t o,
                            const kernels::DeviceBuffer& s, size_t so, size_t n) override {
    return inner_.CopyOnDevice(d, o, s, so, n);
  }
  absl::Status CopyToHost(void* d, const kernels::DeviceBuffer& s, size_t o, size_t n) override {
    return inner_.CopyToHost(d, s, o, n);
  }
  absl::StatusOr<kernels::Event> Record() override { return inner_.Record(); }
  absl::Status Wait(const kernels::Event& e) override { return inner_.Wait(e); }
  absl::Status Synchronize() override { return inner_.Synchronize(); }

  absl::Status Embed(const kernels::WeightMatrix& t, const int32_t* tok, int64_t n,
                     float* out) override {
    return Timed(kernels::Op::kEmbedding, [&] { return inner_.Embed(t, tok, n, out); });
  }
  absl::Status RmsNorm(const float* x, const float* w, int64_t r, int64_t wd, float e,
                       float* y) override {
    return Timed(kernels::Op::kRmsNorm, [&] { return inner_.RmsNorm(x, w, r, wd, e, y); });
  }
  absl::Status MatMul(const kernels::WeightMatrix& w, const float* x, int64_t n,
                      float* y) override {
    return Timed(kernels::Op::kMatMul, [&] { return inner_.MatMul(w, x, n, y); });
  }
  absl::Status AddBias(float* x, const float* b, int64_t r, int64_t w) override {
    return Timed(kernels::Op::kAddBias, [&] { return inner_.AddBias(x, b, r, w); });
  }
  absl::Status Rope(float* x, int64_t n, int64_t h, int64_t d, const int64_t* p,
                    double t) override {
    return Timed(kernels::Op::kRope, [&] { return inner_.Rope(x, n, h, d, p, t); });
  }
  absl::Status WriteKv(const kernels::PagedKv& kv, int l, const float* k, const float* v,
                       int64_t n) override {
    return Timed(kernels::Op::kKvWrite, [&] { return inner_.WriteKv(kv, l, k, v, n); });
  }
  absl::Status Attention(const kernels::PagedKv& kv, int l, const float* q, int64_t n, int64_t h,
                         float* o) override {
    return Timed(kernels::Op::kAttention, [&] { return inner_.Attention(kv, l, q, n, h, o); });
  }
  absl::Status RouterTopK(const float* lg, int64_t n, int64_t e, int64_t k,
                          const kernels::RouterSpec& s, int32_t* c, float* w) override {
    return Timed(kernels::Op::kRouterTopK, [&] { return inner_.RouterTopK(lg, n, e, k, s, c, w); });
  }
  absl::Status SiluMul(const float* g, const float* u, int64_t n, float* o) override {
    return Timed(kernels::Op::kSiluMul, [&] { return inner_.SiluMul(g, u, n, o); });
  }
  absl::Status ExpertFfn(const kernels::SwiGluWeights& w, const float* x, const int32_t* r,
                         int64_t m, float* o, const int32_t* orow, float* s) override {
    return Timed(kernels::Op::kExpertFfn, [&] { return inner_.ExpertFfn(w, x, r, m, o, orow, s); });
  }
  absl::Status MoeCombine(const float* y, const float* w, int64_t n, int64_t k, int64_t wd,
                          float* o) override {
    return Timed(kernels::Op::kMoeCombine, [&] { return inner_.MoeCombine(y, w, n, k, wd, o); });
  }
  absl::Status Add(float* a, const float* x, int64_t n) override {
    return Timed(kernels::Op::kAdd, [&] { return inner_.Add(a, x, n); });
  }
  absl::Status SigmoidGatedAdd(const float* g, const float* x, int64_t n, int64_t w,
                               float* o) override {
    return Timed(kernels::Op::kSigmoidGatedAdd,
                 [&] { return inner_.SigmoidGatedAdd(g, x, n, w, o); });
  }
  absl::Status GatherRows(const float* s, int64_t w, const int32_t* r, int64_t m,
                          float* d) override {
    return Timed(kernels::Op::kGatherRows, [&] { return inner_.GatherRows(s, w, r, m, d); });
  }
  absl::Status Rotary(float* x, int64_t n, const kernels::RotarySpec& spec,
                      const int64_t* p) override {
    return Timed(kernels::Op::kRotary, [&] { return inner_.Rotary(x, n, spec, p); });
  }
  absl::Status MlaAttention(const kernels::PagedKv& kv, int l, const float* q, int64_t n,
                            const kernels::MlaShape& shape, const kernels::WeightMatrix& kv_b,
                            float* o, float* scratch) override {
    return Timed(kernels::Op::kMlaAttention,
                 [&] { return inner_.MlaAttention(kv, l, q, n, shape, kv_b, o, scratch); });
  }

 private:
  template <class Call>
  absl::Status Timed(kernels::Op op, const Call& call) {
    const auto start = std::chrono::steady_clock::now();
    absl::Status status = call();
    Total& total = totals_[op];
    total.seconds +=
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    ++total.calls;
    return status;
  }

  kernels::Stream& inner_;
  std::map<kernels::Op, Total> totals_;
};

class TimingBackend final : public kernels::Backend {
 public:
  explicit TimingBackend(std::shared_ptr<kernels::Backend> inner)
      : inner_(std::move(inner)), compute_(inner_->compute()) {}
  absl::string_view name() const override { return inner_->name(); }
  kernels::Device& device() override { return inner_->device(); }
  kernels::Stream& compute() override { return compute_; }
  kernels::Stream& copy() override { return inner_->copy(); }
  TimingStream& timing() { return compute_; }

 private:
  std::shared_ptr<kernels::Backend> inner_;
  TimingStream compute_;
};

}  // namespace moed::tools
