// The expert store: what `moed-pack` writes and the daemon serves from.
//
//   STORE/manifest.json   architecture, precisions, blob layouts, every dense tensor and
//                         every expert blob with its offset, size and xxh64 checksum
//   STORE/dense.bin       the non-expert weights (attention, norms, routers, embeddings)
//   STORE/experts.bin     one blob per (layer, expert, precision): the expert's gate, up and
//                         down matrices (and scales) back to back, each blob 4096-aligned and
//                         padded to 4096 bytes so it can be read with O_DIRECT in one request
//   STORE/config.json, tokenizer.json, ...   copied from the checkpoint
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kernels/weights.h"
#include "model/expert_provider.h"
#include "model/model_config.h"

namespace moed::cache {

// 2: the manifest carries its own checksum.
inline constexpr int kStoreVersion = 2;
inline constexpr uint64_t kBlobAlignment = 4096;

using model::Precision;
absl::string_view PrecisionName(Precision precision);  // "source", "int8", "int4"
absl::StatusOr<Precision> ParsePrecision(absl::string_view name);

// Where one matrix of an expert sits inside its blob.
struct MatrixLayout {
  kernels::DType dtype = kernels::DType::kBF16;  // source precision only
  kernels::Quantization quantization = kernels::Quantization::kNone;
  int64_t rows = 0, cols = 0;
  uint64_t offset = 0;  // of the values, from the blob's start
  uint64_t bytes = 0;
  uint64_t scales_offset = 0;  // fp32 scales (quantized only)
  uint64_t scales_bytes = 0;
};

// The same for every blob of one precision: gate, up, down.
struct BlobLayout {
  MatrixLayout gate, up, down;
  uint64_t size = 0;         // bytes used
  uint64_t padded_size = 0;  // size rounded up to kBlobAlignment
};

struct BlobEntry {
  int layer = 0;
  int expert = 0;
  Precision precision = Precision::kSource;
  uint64_t offset = 0;  // in experts.bin, a multiple of kBlobAlignment
  uint64_t xxh64 = 0;   // of the padded blob
};

struct DenseTensor {
  std::string name;
  kernels::DType dtype = kernels::DType::kBF16;
  std::vector<int64_t> shape;
  uint64_t offset = 0;  // in dense.bin
  uint64_t bytes = 0;
  uint64_t xxh64 = 0;
};

struct Manifest {
  int version = kStoreVersion;
  std::string architecture;
  kernels::DType source_dtype = kernels::DType::kBF16;
  int64_t int4_group_size = 0;
  int num_layers = 0;  // of the model; only MoE layers have blobs
  int num_experts = 0;
  std::vector<Precision> precisions;
  std::map<Precision, BlobLayout> layouts;
  std::vector<DenseTensor> dense;
  std::vector<BlobEntry> blobs;
  uint64_t dense_file_size = 0;
  uint64_t experts_file_size = 0;

  // nullptr when the store has no such blob.
  const BlobEntry* FindBlob(int layer, int expert, Precision precision) const;
  bool HasPrecision(Precision precision) const;
};

// Parses and checks a manifest: its checksum, every field's type, every offset inside its file
// (overflow-safe), blobs aligned and not overlapping, each layout's byte counts those of its
// shapes. `source` names the file in errors. `verify_checksum` false is for fuzzing only.
absl::StatusOr<Manifest> ParseManifest(absl::string_view json_text, absl::string_view source,
                                       bool verify_checksum = true);
// The manifest as JSON, its "checksum" field (xxh64 of the rest, as written) last.
std::string ManifestJson(const Manifest& manifest);

// Checks a parsed manifest against the model's config.json: the same architecture, layers and
// experts; every MoE layer has every expert in the source precision; every layout's matrices
// have the shapes the config implies (gate and up [intermediate, hidden], down [hidden,
// intermediate]) and the form its precision implies.
absl::Status CheckManifestAgainstConfig(const Manifest& manifest, const model::ModelConfig& config,
                                        absl::string_view source);

// The matrices of one expert as views into its blob's bytes.
model::ExpertWeights ExpertWeightsInBlob(const BlobLayout& layout, const uint8_t* blob);

uint64_t Checksum(const void* data, size_t bytes);

}  // namespace moed::cache
