#include "kernels/backend.h"

#include "absl/strings/str_cat.h"

namespace moed::kernels {

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& other) noexcept {
  if (this != &other) {
    if (data_ != nullptr) owner_->Free(data_, bytes_, kind_);
    owner_ = std::exchange(other.owner_, nullptr);
    data_ = std::exchange(other.data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
    kind_ = other.kind_;
  }
  return *this;
}

DeviceBuffer::~DeviceBuffer() {
  if (data_ != nullptr) owner_->Free(data_, bytes_, kind_);
}

absl::Status CheckRange(const DeviceBuffer& buffer, size_t offset, size_t bytes) {
  if (offset > buffer.size() || bytes > buffer.size() - offset) {
    return absl::OutOfRangeError(absl::StrCat("range [", offset, ", ", offset + bytes,
                                              ") is outside a buffer of ", buffer.size(),
                                              " bytes"));
  }
  return absl::OkStatus();
}

absl::StatusOr<BackendKind> ParseBackendKind(absl::string_view text) {
  if (text == "auto") return BackendKind::kAuto;
  if (text == "cpu") return BackendKind::kCpu;
  if (text == "cuda") return BackendKind::kCuda;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown backend '", text, "' (expected auto, cpu or cuda)"));
}

absl::string_view BackendKindName(BackendKind kind) {
  switch (kind) {
    case BackendKind::kAuto:
      return "auto";
    case BackendKind::kCpu:
      return "cpu";
    case BackendKind::kCuda:
      return "cuda";
  }
  return "?";
}

const char* OpName(Op op) {
  switch (op) {
    case Op::kEmbedding:
      return "embedding";
    case Op::kRmsNorm:
      return "rms_norm";
    case Op::kMatMul:
      return "matmul";
    case Op::kAddBias:
      return "add_bias";
    case Op::kRope:
      return "rope";
    case Op::kKvWrite:
      return "kv_write";
    case Op::kAttention:
      return "attention";
    case Op::kRouterTopK:
      return "router_topk";
    case Op::kSiluMul:
      return "silu_mul";
    case Op::kExpertFfn:
      return "expert_ffn";
    case Op::kMoeCombine:
      return "moe_combine";
    case Op::kAdd:
      return "add";
    case Op::kSigmoidGatedAdd:
      return "sigmoid_gated_add";
    case Op::kGatherRows:
      return "gather_rows";
    case Op::kRotary:
      return "rotary";
    case Op::kMlaAttention:
      return "mla_attention";
  }
  return "?";
}

absl::Status CheckRouterSpec(int64_t experts, int64_t k, const RouterSpec& spec) {
  if (k < 1 || k > experts || spec.groups < 1 || experts % spec.groups != 0 ||
      spec.top_groups < 1 || spec.top_groups > spec.groups ||
      k > spec.top_groups * (experts / spec.groups)) {
    return absl::InvalidArgumentError(absl::StrCat("router_topk: top-", k, " of ", experts,
                                                   " in the best ", spec.top_groups, " of ",
                                                   spec.groups, " groups"));
  }
  return absl::OkStatus();
}

bool OpTakesWeights(Op op) {
  return op == Op::kEmbedding || op == Op::kMatMul || op == Op::kExpertFfn ||
         op == Op::kMlaAttention;
}

}  // namespace moed::kernels
