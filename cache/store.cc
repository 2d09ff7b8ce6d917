#include "cache/store.h"

#include <algorithm>
#include <set>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "nlohmann/json.hpp"
#include "util/status_macros.h"
#include "xxhash.h"

namespace moed::cache {
namespace {

using nlohmann::ordered_json;
// Key order kept as written, so that the manifest's checksum can be recomputed from the parse.
using json = nlohmann::ordered_json;

absl::string_view QuantizationName(kernels::Quantization q) {
  switch (q) {
    case kernels::Quantization::kNone:
      return "none";
    case kernels::Quantization::kInt8PerRow:
      return "int8_per_row";
    case kernels::Quantization::kInt4Grouped:
      return "int4_grouped";
  }
  return "?";
}

std::string Hex(uint64_t value) { return absl::StrFormat("%016x", value); }

// xxh64 of the manifest as written, without its "checksum" field.
uint64_t ManifestChecksum(ordered_json root) {
  root.erase("checksum");
  const std::string text = root.dump(1) + "\n";
  return XXH64(text.data(), text.size(), 0);
}

ordered_json MatrixJson(const MatrixLayout& m) {
  return {{"dtype", std::string(kernels::DTypeName(m.dtype))},
          {"quantization", std::string(QuantizationName(m.quantization))},
          {"rows", m.rows},
          {"cols", m.cols},
          {"offset", m.offset},
          {"bytes", m.bytes},
          {"scales_offset", m.scales_offset},
          {"scales_bytes", m.scales_bytes}};
}

// Reads fields with errors that name the manifest and the place.
class Reader {
 public:
  explicit Reader(absl::string_view source) : source_(source) {}
  absl::Status Error(absl::string_view where, absl::string_view what) const {
    return absl::InvalidArgumentError(absl::StrCat(source_, ": ", where, ": ", what));
  }
  absl::StatusOr<uint64_t> Unsigned(const json& node, const char* key,
                                    absl::string_view where) const {
    auto it = node.find(key);
    if (it == node.end() || !it->is_number_unsigned()) {
      return Error(where, absl::StrCat("\"", key, "\" must be a non-negative integer"));
    }
    return it->get<uint64_t>();
  }
  absl::StatusOr<std::string> String(const json& node, const char* key,
                                     absl::string_view where) const {
    auto it = node.find(key);
    if (it == node.end() || !it->is_string())
      return Error(where, absl::StrCat("\"", key, "\" must be a string"));
    return it->get<std::string>();
  }
  absl::StatusOr<uint64_t> HexValue(const json& node, const char* key,
                                    absl::string_view where) const {
    MOED_ASSIGN_OR_RETURN(std::string text, String(node, key, where));
    uint64_t value = 0;
    if (text.size() != 16 || !absl::SimpleHexAtoi(text, &value)) {
      return Error(where, absl::StrCat("\"", key, "\" must be 16 hex digits"));
    }
    return value;
  }

 private:
  absl::string_view source_;
};

absl::StatusOr<MatrixLayout> ParseMatrix(const json& node, const Reader& read,
                                         const std::string& where) {
  if (!node.is_object()) return read.Error(where, "must be an object");
  MatrixLayout m;
  MOED_ASSIGN_OR_RETURN(std::string dtype, read.String(node, "dtype", where));
  MOED_ASSIGN_OR_RETURN(m.dtype, kernels::ParseSafetensorsDType(dtype));
  MOED_ASSIGN_OR_RETURN(std::string quantization, read.String(node, "quantization", where));
  if (quantization == "none") {
    m.quantization = kernels::Quantization::kNone;
  } else if (quantization == "int8_per_row") {
    m.quantization = kernels::Quantization::kInt8PerRow;
  } else if (quantization == "int4_grouped") {
    m.quantization = kernels::Quantization::kInt4Grouped;
  } else {
    return read.Error(where, absl::StrCat("unknown quantization '", quantization, "'"));
  }
  MOED_ASSIGN_OR_RETURN(uint64_t rows, read.Unsigned(node, "rows", where));
  MOED_ASSIGN_OR_RETURN(uint64_t cols, read.Unsigned(node, "cols", where));
  if (rows == 0 || cols == 0 || rows > (1u << 24) || cols > (1u << 24))
    return read.Error(where, "bad shape");
  m.rows = static_cast<int64_t>(rows);
  m.cols = static_cast<int64_t>(cols);
  MOED_ASSIGN_OR_RETURN(m.offset, read.Unsigned(node, "offset", where));
  MOED_ASSIGN_OR_RETURN(m.bytes, read.Unsigned(node, "bytes", where));
  MOED_ASSIGN_OR_RETURN(m.scales_offset, read.Unsigned(node, "scales_offset", where));
  MOED_ASSIGN_OR_RETURN(m.scales_bytes, read.Unsigned(node, "scales_bytes", where));
  return m;
}

// Checks that a matrix's bytes match its shape and lie inside a blob of `size` bytes.
absl::Status CheckMatrix(const MatrixLayout& m, uint64_t size, int64_t group, const Reader& read,
                         const std::string& where) {
  uint64_t elements = static_cast<uint64_t>(m.rows) * static_cast<uint64_t>(m.cols);
  uint64_t expected = 0, scales = 0;
  switch (m.quantization) {
    case kernels::Quantization::kNone:
      expected = elements * kernels::DTypeSize(m.dtype);
      break;
    case kernels::Quantization::kInt8PerRow:
      expected = elements;
      scales = static_cast<uint64_t>(m.rows) * 4;
      break;
    case kernels::Quantization::kInt4Grouped:
      if (group <= 0 || group % 2 != 0 || m.cols % group != 0) {
        return read.Error(where, "int4 group size does not divide the columns");
      }
      expected = elements / 2;
      scales = static_cast<uint64_t>(m.rows) * static_cast<uint64_t>(m.cols / group) * 4;
      break;
  }
  if (m.bytes != expected || m.scales_bytes != scales)
    return read.Error(where, "byte counts do not match the shape");
  if (m.offset > size || m.bytes > size - m.offset || m.scales_offset > size ||
      m.scales_bytes > size - m.scales_offset) {
    return read.Error(where, "lies outside the blob");
  }
  // Values and scales are read as floats: scales must be 4-byte aligned.
  if (m.scales_bytes > 0 && m.scales_offset % 4 != 0)
    return read.Error(where, "scales are not 4-byte aligned");
  return absl::OkStatus();
}

}  // namespace

absl::string_view PrecisionName(Precision precision) {
  switch (precision) {
    case Precision::kSource:
      return "source";
    case Precision::kInt8:
      return "int8";
    case Precision::kInt4:
      return "int4";
  }
  return "?";
}

absl::StatusOr<Precision> ParsePrecision(absl::string_view name) {
  if (name == "source") return Precision::kSource;
  if (name == "int8") return Precision::kInt8;
  if (name == "int4") return Precision::kInt4;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown precision '", name, "' (expected source, int8 or int4)"));
}

const BlobEntry* Manifest::FindBlob(int layer, int expert, Precision precision) const {
  // Blobs are stored in (layer, expert, precision) order.
  auto key = [](const BlobEntry& b) {
    return std::tuple(b.layer, b.expert, static_cast<int>(b.precision));
  };
  auto target = std::tuple(layer, expert, static_cast<int>(precision));
  auto it = std::lower_bound(blobs.begin(), blobs.end(), target,
                             [&](const BlobEntry& b, const auto& t) { return key(b) < t; });
  if (it == blobs.end() || key(*it) != target) return nullptr;
  return &*it;
}

bool Manifest::HasPrecision(Precision precision) const {
  return std::find(precisions.begin(), precisions.end(), precision) != precisions.end();
}

std::string ManifestJson(const Manifest& m) {
  ordered_json root;
  root["format"] = "moed-store";
  root["version"] = m.version;
  root["architecture"] = m.architecture;
  root["source_dtype"] = std::string(kernels::DTypeName(m.source_dtype));
  root["int4_group_size"] = m.int4_group_size;
  root["num_layers"] = m.num_layers;
  root["num_experts"] = m.num_experts;
  root["alignment"] = kBlobAlignment;
  ordered_json layouts = ordered_json::object();
  for (Precision p : m.precisions) {
    const BlobLayout& layout = m.layouts.at(p);
    layouts[std::string(PrecisionName(p))] = {{"gate", MatrixJson(layout.gate)},
                                              {"up", MatrixJson(layout.up)},
                                              {"down", MatrixJson(layout.down)},
                                              {"size", layout.size},
                                              {"padded_size", layout.padded_size}};
  }
  root["layouts"] = layouts;
  ordered_json dense = ordered_json::array();
  for (const DenseTensor& t : m.dense) {
    dense.push_back({{"name", t.name},
                     {"dtype", std::string(kernels::DTypeName(t.dtype))},
                     {"shape", t.shape},
                     {"offset", t.offset},
                     {"bytes", t.bytes},
                     {"xxh64", Hex(t.xxh64)}});
  }
  root["dense"] = {{"file", "dense.bin"}, {"size", m.dense_file_size}, {"tensors", dense}};
  ordered_json blobs = ordered_json::array();
  for (const BlobEntry& b : m.blobs) {
    blobs.push_back({{"layer", b.layer},
                     {"expert", b.expert},
                     {"precision", std::string(PrecisionName(b.precision))},
                     {"offset", b.offset},
                     {"xxh64", Hex(b.xxh64)}});
  }
  root["experts"] = {{"file", "experts.bin"}, {"size", m.experts_file_size}, {"blobs", blobs}};
  root["checksum"] = Hex(ManifestChecksum(root));
  return root.dump(1) + "\n";
}

absl::StatusOr<Manifest> ParseManifest(absl::string_view json_text, absl::string_view source,
                                       bool verify_checksum) {
  json root = json::parse(json_text.begin(), json_text.end(), nullptr, false);
  Reader read(source);
  if (root.is_discarded() || !root.is_object()) return read.Error("manifest", "not a JSON object");
  auto format = root.find("format");
  if (format == root.end() || !format->is_string() || format->get<std::string>() != "moed-store")
    return read.Error("manifest", "\"format\" is not \"moed-store\"");
  Manifest m;
  MOED_ASSIGN_OR_RETURN(uint64_t version, read.Unsigned(root, "version", "manifest"));
  if (version != kStoreVersion) {
    return read.Error("manifest",
                      absl::StrCat("version ", version, " is not supported (this build reads ",
                                   kStoreVersion, "): pack the checkpoint again with moed-pack"));
  }
  MOED_ASSIGN_OR_RETURN(uint64_t checksum, read.HexValue(root, "checksum", "manifest"));
  if (verify_checksum && checksum != ManifestChecksum(root)) {
    return absl::DataLossError(
        absl::StrCat(source,
                     ": the manifest does not match its checksum (damaged or edited; pack the "
                     "checkpoint again with moed-pack)"));
  }
  MOED_ASSIGN_OR_RETURN(m.architecture, read.String(root, "architecture", "manifest"));
  MOED_ASSIGN_OR_RETURN(std::string source_dtype, read.String(root, "source_dtype", "manifest"));
  MOED_ASSIGN_OR_RETURN(m.source_dtype, kernels::ParseSafetensorsDType(source_dtype));
  MOED_ASSIGN_OR_RETURN(uint64_t group, read.Unsigned(root, "int4_group_size", "manifest"));
  MOED_ASSIGN_OR_RETURN(uint64_t layers, read.Unsigned(root, "num_layers", "manifest"));
  MOED_ASSIGN_OR_RETURN(uint64_t experts, read.Unsigned(root, "num_experts", "manifest"));
  if (layers == 0 || layers > 4096 || experts == 0 || experts > 65536 || group > 4096) {
    return read.Error("manifest", "implausible num_layers, num_experts or int4_group_size");
  }
  m.int4_group_size = static_cast<int64_t>(group);
  m.num_layers = static_cast<int>(layers);
  m.num_experts = static_cast<int>(experts);

  if (!root.contains("layouts") || !root["layouts"].is_object())
    return read.Error("manifest", "\"layouts\" must be an object");
  for (const auto& [name, node] : root["layouts"].items()) {
    std::string where = absl::StrCat("layout ", name);
    MOED_ASSIGN_OR_RETURN(Precision precision, ParsePrecision(name));
    if (!node.is_object()) return read.Error(where, "must be an object");
    BlobLayout layout;
    MOED_ASSIGN_OR_RETURN(layout.size, read.Unsigned(node, "size", where));
    MOED_ASSIGN_OR_RETURN(layout.padded_size, read.Unsigned(node, "padded_size", where));
    if (layout.padded_size % kBlobAlignment != 0 || layout.padded_size < layout.size ||
        layout.size == 0) {
      return read.Error(where, "padded_size must be a multiple of 4096 holding size");
    }
    for (auto [part, target] : {std::pair{"gate", &layout.gate}, std::pair{"up", &layout.up},
                                std::pair{"down", &layout.down}}) {
      if (!node.contains(part)) return read.Error(where, absl::StrCat("has no ", part));
      MOED_ASSIGN_OR_RETURN(*target, ParseMatrix(node[part], read, absl::StrCat(where, " ", part)));
      MOED_RETURN_IF_ERROR(CheckMatrix(*target, layout.size, m.int4_group_size, read,
                                       absl::StrCat(where, " ", part)));
    }
    m.layouts[precision] = layout;
    m.precisions.push_back(precision);
  }
  if (!m.HasPrecision(Precision::kSource))
    return read.Error("manifest", "the source precision is missing");

  if (!root.contains("dense") || !root["dense"].is_object() || !root["dense"].contains("tensors") ||
      !root["dense"]["tensors"].is_array()) {
    return read.Error("manifest", "\"dense\" must hold a tensors list");
  }
  MOED_ASSIGN_OR_RETURN(m.dense_file_size, read.Unsigned(root["dense"], "size", "dense"));
  for (const json& node : root["dense"]["tensors"]) {
    if (!node.is_object()) return read.Error("dense", "entries must be objects");
    DenseTensor t;
    MOED_ASSIGN_OR_RETURN(t.name, read.String(node, "name", "dense tensor"));
    std::string where = absl::StrCat("dense tensor ", t.name);
    MOED_ASSIGN_OR_RETURN(std::string dtype, read.String(node, "dtype", where));
    MOED_ASSIGN_OR_RETURN(t.dtype, kernels::ParseSafetensorsDType(dtype));
    if (!node.contains("shape") || !node["shape"].is_array())
      return read.Error(where, "\"shape\" must be a list");
    uint64_t elements = 1;
    for (const json& d : node["shape"]) {
      if (!d.is_number_unsigned() ||
          __builtin_mul_overflow(elements, d.get<uint64_t>(), &elements)) {
        return read.Error(where, "bad shape");
      }
      t.shape.push_back(d.get<int64_t>());
    }
    MOED_ASSIGN_OR_RETURN(t.offset, read.Unsigned(node, "offset", where));
    MOED_ASSIGN_OR_RETURN(t.bytes, read.Unsigned(node, "bytes", where));
    MOED_ASSIGN_OR_RETURN(t.xxh64, read.HexValue(node, "xxh64", where));
    uint64_t expected = 0;
    if (__builtin_mul_overflow(elements, kernels::DTypeSize(t.dtype), &expected) ||
        t.bytes != expected) {
      return read.Error(where, "byte count does not match the shape");
    }
    if (t.offset > m.dense_file_size || t.bytes > m.dense_file_size - t.offset) {
      return read.Error(where, "lies outside dense.bin");
    }
    m.dense.push_back(std::move(t));
  }

  if (!root.contains("experts") || !root["experts"].is_object() ||
      !root["experts"].contains("blobs") || !root["experts"]["blobs"].is_array()) {
    return read.Error("manifest", "\"experts\" must hold a blobs list");
  }
  MOED_ASSIGN_OR_RETURN(m.experts_file_size, read.Unsigned(root["experts"], "size", "experts"));
  for (const json& node : root["experts"]["blobs"]) {
    if (!node.is_object()) return read.Error("experts", "entries must be objects");
    BlobEntry b;
    MOED_ASSIGN_OR_RETURN(uint64_t layer, read.Unsigned(node, "layer", "blob"));
    MOED_ASSIGN_OR_RETURN(uint64_t expert, read.Unsigned(node, "expert", "blob"));
    std::string where = absl::StrCat("blob layer ", layer, " expert ", expert);
    if (layer >= layers || expert >= experts) return read.Error(where, "is outside the model");
    b.layer = static_cast<int>(layer);
    b.expert = static_cast<int>(expert);
    MOED_ASSIGN_OR_RETURN(std::string precision, read.String(node, "precision", where));
    MOED_ASSIGN_OR_RETURN(b.precision, ParsePrecision(precision));
    if (!m.HasPrecision(b.precision)) return read.Error(where, "uses a precision without a layout");
    MOED_ASSIGN_OR_RETURN(b.offset, read.Unsigned(node, "offset", where));
    MOED_ASSIGN_OR_RETURN(b.xxh64, read.HexValue(node, "xxh64", where));
    uint64_t padded = m.layouts[b.precision].padded_size;
    if (b.offset % kBlobAlignment != 0 || b.offset > m.experts_file_size ||
        padded > m.experts_file_size - b.offset) {
      return read.Error(where, "is not aligned or lies outside experts.bin");
    }
    m.blobs.push_back(b);
  }
  std::sort(m.blobs.begin(), m.blobs.end(), [](const BlobEntry& a, const BlobEntry& b) {
    return std::tuple(a.layer, a.expert, static_cast<int>(a.precision)) <
           std::tuple(b.layer, b.expert, static_cast<int>(b.precision));
  });
  for (size_t i = 1; i < m.blobs.size(); ++i) {
    const BlobEntry& a = m.blobs[i - 1];
    const BlobEntry& b = m.blobs[i];
    if (a.layer == b.layer && a.expert == b.expert && a.precision == b.precision) {
      return read.Error(absl::StrCat("blob layer ", b.layer, " expert ", b.expert),
                        "is listed twice");
    }
  }
  // Blobs must not overlap.
  std::vector<std::pair<uint64_t, uint64_t>> extents;
  for (const BlobEntry& b : m.blobs)
    extents.emplace_back(b.offset, b.offset + m.layouts[b.precision].padded_size);
  std::sort(extents.begin(), extents.end());
  for (size_t i = 1; i < extents.size(); ++i) {
    if (extents[i].first < extents[i - 1].second) return read.Error("experts", "blobs overlap");
  }
  return m;
}

absl::Status CheckManifestAgainstConfig(const Manifest& m, const model::ModelConfig& config,
                                        absl::string_view source) {
  auto error = [&](absl::string_view what) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": ", what, " (the store does not belong to this config.json)"));
  };
  if (std::string(model::ArchitectureName(config.architecture)) != m.architecture ||
      config.num_layers != m.num_layers || config.num_experts != m.num_experts) {
    return error(absl::StrCat("architecture ", m.architecture, " with ", m.num_layers,
                              " layers and ", m.num_experts, " experts"));
  }
  const int64_t hidden = config.hidden_size, intermediate = config.expert_intermediate_size;
  for (Precision p : m.precisions) {
    const BlobLayout& layout = m.layouts.at(p);
    const kernels::Quantization form = p == Precision::kSource ? kernels::Quantization::kNone
                                       : p == Precision::kInt8
                                           ? kernels::Quantization::kInt8PerRow
                                           : kernels::Quantization::kInt4Grouped;
    for (auto [name, matrix, rows, cols] :
         {std::tuple{"gate", &layout.gate, intermediate, hidden},
          std::tuple{"up", &layout.up, intermediate, hidden},
          std::tuple{"down", &layout.down, hidden, intermediate}}) {
      const std::string where = absl::StrCat("layout ", PrecisionName(p), " ", name);
      if (matrix->rows != rows || matrix->cols != cols) {
        return error(absl::StrCat(where, " is [", matrix->rows, ", ", matrix->cols,
                                  "] but the config implies [", rows, ", ", cols, "]"));
      }
      if (matrix->quantization != form ||
          (p == Precision::kSource && matrix->dtype != m.source_dtype)) {
        return error(absl::StrCat(where, " is not stored in the form of its precision"));
      }
    }
  }
  // Every MoE layer needs every expert in the source precision.
  for (int layer = 0; layer < m.num_layers; ++layer) {
    if (!config.IsMoeLayer(layer)) continue;
    for (int e = 0; e < m.num_experts; ++e) {
      if (m.FindBlob(layer, e, Precision::kSource) == nullptr)
        return error(absl::StrCat("no source blob for layer ", layer, " expert ", e));
    }
  }
  return absl::OkStatus();
}

model::ExpertWeights ExpertWeightsInBlob(const BlobLayout& layout, const uint8_t* blob) {
  auto view = [&](const MatrixLayout& m) {
    kernels::WeightMatrix w;
    w.dtype = m.dtype;
    w.data = blob + m.offset;
    w.rows = m.rows;
    w.cols = m.cols;
    w.quantization = m.quantization;
    w.scales =
        m.scales_bytes > 0 ? reinterpret_cast<const float*>(blob + m.scales_offset) : nullptr;
    w.group_size =
        m.quantization == kernels::Quantization::kInt4Grouped
            ? static_cast<int64_t>(m.scales_bytes > 0 ? m.cols / (m.scales_bytes / 4 / m.rows) : 0)
            : 0;
    return w;
  };
  return {view(layout.gate), view(layout.up), view(layout.down)};
}

uint64_t Checksum(const void* data, size_t bytes) { return XXH64(data, bytes, 0); }

}  // namespace moed::cache
