// The compute seam: everything above kernels/ computes through a Backend and never branches on
// which implementation it has. Split as ggml splits it: a Device (memory, pinned host memory,
// capability queries per operator and weight format) and Streams (ordered queues of copies and
// operators, with events so one queue can wait for another). A Backend is one device with a
// compute stream and a copy stream.
//
// Every pointer an operator takes is in the device's memory (DeviceBuffer::data() plus an
// offset); activations and the KV cache are fp32. Operators are queued: their results are
// visible to later work on the same stream, to the host after CopyToHost or Synchronize, and
// to another stream after it waits for an event recorded behind them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kernels/weights.h"

namespace moed::kernels {

enum class BackendKind { kAuto, kCpu, kCuda };

// Parses "auto", "cpu" or "cuda".
absl::StatusOr<BackendKind> ParseBackendKind(absl::string_view text);
absl::string_view BackendKindName(BackendKind kind);

struct DeviceInfo {
  int index = 0;
  std::string name;
  uint64_t total_memory_bytes = 0;
  uint64_t free_memory_bytes = 0;
  // CUDA compute capability ("9.0"); empty for the CPU.
  std::string compute_capability;
  // Streaming multiprocessors on a GPU, hardware threads on the CPU.
  int compute_units = 0;
};

// The operators the architectures need. The cross-backend test has a row for each.
enum class Op {
  kEmbedding,        // rows of an embedding table, widened to fp32
  kRmsNorm,          // also the per-head and whole-width q/k norms
  kMatMul,           // y = x W^T per weight format (GEMV when n is small)
  kAddBias,          // x[t] += bias
  kRope,             // rotate-half rotary embedding
  kKvWrite,          // keys and values of new tokens into their paged KV blocks
  kAttention,        // causal attention of new tokens over the paged KV cache
  kRouterTopK,       // softmax over experts, top-k, optional renormalisation
  kSiluMul,          // SwiGLU: silu(gate) * up
  kExpertFfn,        // one expert's SwiGLU FFN over the tokens routed to it
  kMoeCombine,       // the gate-weighted sum of each token's expert outputs, in rank order
  kAdd,              // residual: acc += x
  kSigmoidGatedAdd,  // out[t] += sigmoid(gate[t]) * x[t] (Qwen2-MoE's shared expert)
  kGatherRows,       // dst[i] = src[rows[i]]
  kRotary,           // rotary embedding on a slice of each head from a frequency table
  kMlaAttention,     // Multi-head Latent Attention over a paged cache of latents and rope keys
};
inline constexpr Op kAllOps[] = {
    Op::kEmbedding,   Op::kRmsNorm,   Op::kMatMul,          Op::kAddBias,    Op::kRope,
    Op::kKvWrite,     Op::kAttention, Op::kRouterTopK,      Op::kSiluMul,    Op::kExpertFfn,
    Op::kMoeCombine,  Op::kAdd,       Op::kSigmoidGatedAdd, Op::kGatherRows, Op::kRotary,
    Op::kMlaAttention};
const char* OpName(Op op);
// True for the operators whose capability depends on a weight format.
bool OpTakesWeights(Op op);

enum class BufferKind { kDevice, kPinnedHost };

// A recorded point in a stream. Copyable; empty when the backend runs everything in order.
class Event {
 public:
  Event() = default;
  explicit Event(std::shared_ptr<void> handle) : handle_(std::move(handle)) {}
  void* handle() const { return handle_.get(); }

 private:
  std::shared_ptr<void> handle_;
};

class Device;

// Memory owned by a device: device memory, or pinned host memory the device can copy from
// without staging. On the CPU backend both are aligned RAM. Move-only; freed when it goes
// out of scope, after the work queued on it.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(Device* owner, void* data, size_t bytes, BufferKind kind)
      : owner_(owner), data_(data), bytes_(bytes), kind_(kind) {}
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& other) noexcept { *this = std::move(other); }
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
  ~DeviceBuffer();

  void* data() const { return data_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }
  size_t size() const { return bytes_; }
  BufferKind kind() const { return kind_; }
  explicit operator bool() const { return data_ != nullptr; }

 private:
  Device* owner_ = nullptr;
  void* data_ = nullptr;
  size_t bytes_ = 0;
  BufferKind kind_ = BufferKind::kDevice;
};

// Fails with OUT_OF_RANGE when [offset, offset + bytes) is not inside the buffer.
absl::Status CheckRange(const DeviceBuffer& buffer, size_t offset, size_t bytes);

class Device {
 public:
  virtual ~Device() = default;
  // What it is, with its free memory read now.
  virtual absl::StatusOr<DeviceInfo> info() const = 0;
  virtual absl::StatusOr<DeviceBuffer> Allocate(size_t bytes) = 0;
  // Host memory the device's copy engine reads directly (page-locked on a GPU).
  virtual absl::StatusOr<DeviceBuffer> AllocateHost(size_t bytes) = 0;
  // True when operators can read ordinary host memory (the CPU): weights then stay where they
  // were loaded (a checkpoint's mapping, the expert cache's slots) instead of being copied.
  virtual bool host_memory_is_device_memory() const = 0;
  // Whether `op` runs with weights in `format` (ignored for operators without weights).
  virtual bool Supports(Op op, WeightFormat format) const = 0;
  // Blocks the calling thread until the work recorded behind `event` is done (an empty event:
  // at once). The expert cache calls it from a thread of its own to reuse the pinned buffers a
  // copy reads from.
  virtual absl::Status WaitForEvent(const Event& event) = 0;

 protected:
  friend class DeviceBuffer;
  virtual void Free(void* data, size_t bytes, BufferKind kind) = 0;
};

// A SwiGLU FFN's weights: down(silu(gate x) * up x).
struct SwiGluWeights {
  WeightMatrix gate;  // [intermediate, hidden]
  WeightMatrix up;    // [intermediate, hidden]
  WeightMatrix down;  // [hidden, intermediate]
};

// The paged KV cache as the attention operators see one step. Each sequence owns a list of
// fixed-size blocks; a block holds `block_size` tokens of every layer:
//   layer l keys   at block + l * layer_floats,                 [block_size, kv_heads, head_dim]
//   layer l values at block + l * layer_floats + block_size * kv_width(),
//                                                               [block_size, kv_heads, value_dim]
// Token t of the step sits at positions[t] of its sequence, whose block addresses start at
// block_table[table_start[t]]. MLA keeps one "head": the normed latent in the key part
// (head_dim = kv_lora_rank) and the rotated rope key in the value part (value_dim = rope dim).
struct PagedKv {
  float* const* block_table = nullptr;
  const int32_t* table_start = nullptr;
  const int64_t* positions = nullptr;
  int64_t block_size = 0;
  int64_t kv_heads = 0;
  int64_t head_dim = 0;
  int64_t layer_floats = 0;  // block_size * (kv_width() + value_width())
  int64_t value_dim = 0;     // floats per head of the value part; 0: head_dim

  int64_t kv_width() const { return kv_heads * head_dim; }
  int64_t value_width() const { return kv_heads * (value_dim > 0 ? value_dim : head_dim); }
};

// How the router turns logits into expert scores.
enum class RouterScoring {
  kSoftmax,  // softmax over all experts
  kSigmoid,  // sigmoid of each logit (DeepSeek-V3)
};
// How a group of experts is ranked when the router limits a token to its best groups.
enum class GroupScore {
  kMax,        // its best expert's score (DeepSeek-V2's group_limited_greedy)
  kTopTwoSum,  // the sum of its two best biased scores (DeepSeek-V3's noaux_tc)
};
// A router's selection: scores from the logits; optionally only the `top_groups` best of
// `groups` equal groups of consecutive experts stay eligible; the k best eligible experts by
// score + choice_bias (ties to the lower id); their weights are their scores (without the
// bias), divided by the k weights' sum when `renormalize`, then multiplied by `scale`.
struct RouterSpec {
  RouterScoring scoring = RouterScoring::kSoftmax;
  bool renormalize = false;
  float scale = 1.0f;
  const float* choice_bias = nullptr;  // [experts] in device memory, or null
  int64_t groups = 1;
  int64_t top_groups = 1;
  GroupScore group_score = GroupScore::kMax;
};

// Fails with INVALID_ARGUMENT unless top-k of `experts` can be chosen as `spec` says: groups
// that divide the experts, top_groups among them, and k no more than those groups hold.
absl::Status CheckRouterSpec(int64_t experts, int64_t k, const RouterSpec& spec);

// A rotary embedding applied to `dims` consecutive floats at `offset` inside each of `heads`
// heads of `head_stride` floats per token. Pair i rotates by the angle position *
// inv_freq[i] (inv_freq: dims / 2 doubles in device memory), its cosine and sine multiplied
// by `magnitude` (YaRN's attention factor; 1 otherwise). kHalf pairs element i with
// i + dims / 2 (rotate-half, "NEOX"); kPairs pairs 2i with 2i + 1 (DeepSeek's rope slice).
enum class RotaryStyle { kHalf, kPairs };
struct RotarySpec {
  int64_t heads = 0;
  int64_t head_stride = 0;
  int64_t offset = 0;
  int64_t dims = 0;
  RotaryStyle style = RotaryStyle::kHalf;
  const double* inv_freq = nullptr;
  double magnitude = 1.0;
};

// Multi-head Latent Attention's shapes. Queries are [n, heads, nope_dim + rope_dim], the rope
// part already rotated. kv_b is the checkpoint's kv_b_proj, [heads * (nope_dim + value_dim),
// latent_dim]: per head nope_dim rows that map the latent to the key's nope part, then
// value_dim rows that map it to the value.
struct MlaShape {
  int64_t heads = 0;
  int64_t nope_dim = 0;
  int64_t rope_dim = 0;
  int64_t value_dim = 0;
  int64_t latent_dim = 0;
  float scale = 0;  // multiplies the scores (1/sqrt(nope_dim + rope_dim), YaRN-corrected)
};

class Stream {
 public:
  virtual ~Stream() = default;

  // ---- copies and ordering ----
  // Queues a host-to-device copy. `src` must stay valid until the copy is done (Synchronize,
  // or an event recorded behind it has completed).
  virtual absl::Status CopyToDevice(const DeviceBuffer& dst, size_t dst_offset, const void* src,
                                    size_t bytes) = 0;
  // Queues a device-to-device copy.
  virtual absl::Status CopyOnDevice(const DeviceBuffer& dst, size_t dst_offset,
                                    const DeviceBuffer& src, size_t src_offset, size_t bytes) = 0;
  // Waits for this stream's earlier work, then copies device memory to the host.
  virtual absl::Status CopyToHost(void* dst, const DeviceBuffer& src, size_t src_offset,
                                  size_t bytes) = 0;
  // A point behind everything queued so far.
  virtual absl::StatusOr<Event> Record() = 0;
  // Later work on this stream starts after `event` (recorded on any stream of the device).
  virtual absl::Status Wait(const Event& event) = 0;
  // Returns when everything queued on this stream is done.
  virtual absl::Status Synchronize() = 0;

  // ---- operators (pointers in device memory) ----
  // out[t] = table[tokens[t]] widened to fp32; the table is [vocab, width], unquantized.
  virtual absl::Status Embed(const WeightMatrix& table, const int32_t* tokens, int64_t n,
                             float* out) = 0;
  // y[t] = x[t] * weight / sqrt(mean(x[t]^2) + eps) over `rows` rows of `width`; y may be x.
  virtual absl::Status RmsNorm(const float* x, const float* weight, int64_t rows, int64_t width,
                               float eps, float* y) = 0;
  // y[t, r] = sum_c w[r, c] * x[t, c]: x is [n, w.cols], y is [n, w.rows].
  virtual absl::Status MatMul(const WeightMatrix& w, const float* x, int64_t n, float* y) = 0;
  // x[t, i] += bias[i] for t < rows, i < width.
  virtual absl::Status AddBias(float* x, const float* bias, int64_t rows, int64_t width) = 0;
  // Rotate-half ("NEOX") rotary embedding in place on x[t, head, :], token t at positions[t].
  virtual absl::Status Rope(float* x, int64_t n, int64_t heads, int64_t head_dim,
                            const int64_t* positions, double theta) = 0;
  // Writes token t's keys k[t] and values v[t] ([n, kv_heads * head_dim]) of `layer` at its
  // position in its sequence's blocks.
  virtual absl::Status WriteKv(const PagedKv& kv, int layer, const float* k, const float* v,
                               int64_t n) = 0;
  // Causal attention: token t's query heads q[t] ([n, heads, head_dim]) over cache rows
  // 0..positions[t] of its sequence (grouped-query: heads / kv_heads queries per kv head).
  virtual absl::Status Attention(const PagedKv& kv, int layer, const float* q, int64_t n,
                                 int64_t heads, float* out) = 0;
  // For each token: scores over `experts` logits, the k chosen as `spec` says in rank order
  // into chosen[t * k + r], their weights into weights[t * k + r].
  virtual absl::Status RouterTopK(const float* logits, int64_t n, int64_t experts, int64_t k,
                                  const RouterSpec& spec, int32_t* chosen, float* weights) = 0;
  // out[i] = silu(gate[i]) * up[i]; out may be gate.
  virtual absl::Status SiluMul(const float* gate, const float* up, int64_t count, float* out) = 0;
  // The grouped expert FFN for one expert: for i < m, out[out_rows[i]] = ffn(x[rows[i]]), rows
  // of w.gate.cols. `scratch` holds ExpertFfnScratchFloats(m, ...) floats.
  virtual absl::Status ExpertFfn(const SwiGluWeights& w, const float* x, const int32_t* rows,
                                 int64_t m, float* out, const int32_t* out_rows,
                                 float* scratch) = 0;
  // out[t] = sum over r < k, in rank order, of weights[t * k + r] * expert_out[t * k + r].
  virtual absl::Status MoeCombine(const float* expert_out, const float* weights, int64_t n,
                                  int64_t k, int64_t width, float* out) = 0;
  // acc[i] += x[i].
  virtual absl::Status Add(float* acc, const float* x, int64_t count) = 0;
  // out[t, i] += sigmoid(gate_logits[t]) * x[t, i].
  virtual absl::Status SigmoidGatedAdd(const float* gate_logits, const float* x, int64_t n,
                                       int64_t width, float* out) = 0;
  // dst[i] = src[rows[i]] for rows of `width`.
  virtual absl::Status GatherRows(const float* src, int64_t width, const int32_t* rows, int64_t m,
                                  float* dst) = 0;
  // The rotary embedding `spec` describes, in place on x ([n, spec.heads * spec.head_stride]),
  // token t at positions[t].
  virtual absl::Status Rotary(float* x, int64_t n, const RotarySpec& spec,
                              const int64_t* positions) = 0;
  // Causal MLA of n query tokens over the paged cache (latent and rope key per position, see
  // PagedKv), in the absorbed form: per head, the query's nope part is mapped into the latent
  // space through kv_b's key rows, scored against every cached latent plus the rope keys,
  // and the softmax-weighted latent is mapped to the value through kv_b's value rows.
  // out is [n, heads * value_dim]; scratch holds MlaScratchFloats(n, shape) floats.
  virtual absl::Status MlaAttention(const PagedKv& kv, int layer, const float* q, int64_t n,
                                    const MlaShape& shape, const WeightMatrix& kv_b, float* out,
                                    float* scratch) = 0;
};

inline int64_t MlaScratchFloats(int64_t n, const MlaShape& shape) {
  return n * shape.heads * 2 * shape.latent_dim;
}

inline int64_t ExpertFfnScratchFloats(int64_t m, int64_t width, int64_t intermediate) {
  return m * (2 * width + 2 * intermediate);
}

class Backend {
 public:
  virtual ~Backend() = default;
  // "cpu" or "cuda".
  virtual absl::string_view name() const = 0;
  virtual Device& device() = 0;
  // Where operators and the engine's own uploads run.
  virtual Stream& compute() = 0;
  // A second queue for staging weights while the compute stream works.
  virtual Stream& copy() = 0;
};

// Every device a compiled backend can see. Never fails: a backend that cannot enumerate
// (no driver) contributes no devices and says why in `problems`.
struct Discovery {
  std::vector<DeviceInfo> cuda_devices;
  std::vector<std::string> problems;
};
Discovery DiscoverDevices();

struct BackendOptions {
  int cuda_device = 0;
  int cpu_threads = 0;  // 0: one per hardware thread
};

struct BackendChoice {
  std::unique_ptr<Backend> backend;
  // Set when kAuto wanted a GPU and fell back to the CPU: why.
  std::string fallback_reason;
};

// The only way to make a backend. kAuto picks the CUDA device when there is one and the CPU
// otherwise; kCuda without a usable device is an error.
absl::StatusOr<BackendChoice> CreateBackend(BackendKind kind, const BackendOptions& options = {});

// True when this binary was built with the CUDA backend.
bool CudaCompiledIn();

}  // namespace moed::kernels
