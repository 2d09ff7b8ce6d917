#include "tools/pack/pack.h"

#include <unistd.h>

#include <array>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <optional>
#include <set>

#include "absl/strings/str_cat.h"
#include "cache/aligned_buffer.h"
#include "kernels/quant.h"
#include "model/model_config.h"
#include "model/safetensors.h"
#include "tools/checkpoint_files.h"
#include "util/status_macros.h"

namespace moed::tools {
namespace {

namespace fs = std::filesystem;
using cache::BlobLayout;
using cache::MatrixLayout;
using cache::Precision;

constexpr uint64_t kPartAlignment = 64;

std::array<std::string, 3> ExpertTensorNames(const model::ModelConfig& config, int layer,
                                             int expert) {
  model::ExpertTensorNames names =
      model::RoutedExpertTensorNames(config.architecture, layer, expert);
  return {names.gate, names.up, names.down};
}

// Lays out one matrix at `*cursor` and advances it.
MatrixLayout Place(Precision precision, kernels::DType source, int64_t rows, int64_t cols,
                   int64_t group, uint64_t* cursor) {
  MatrixLayout m;
  m.rows = rows;
  m.cols = cols;
  m.dtype = source;
  uint64_t elements = static_cast<uint64_t>(rows * cols);
  switch (precision) {
    case Precision::kSource:
      m.bytes = elements * kernels::DTypeSize(source);
      break;
    case Precision::kInt8:
      m.quantization = kernels::Quantization::kInt8PerRow;
      m.bytes = elements;
      m.scales_bytes = static_cast<uint64_t>(rows) * 4;
      break;
    case Precision::kInt4:
      m.quantization = kernels::Quantization::kInt4Grouped;
      m.bytes = elements / 2;
      m.scales_bytes = static_cast<uint64_t>(rows * (cols / group)) * 4;
      break;
  }
  m.offset = *cursor;
  *cursor = cache::AlignUp(m.offset + m.bytes, kPartAlignment);
  if (m.scales_bytes > 0) {
    m.scales_offset = *cursor;
    *cursor = cache::AlignUp(m.scales_offset + m.scales_bytes, kPartAlignment);
  }
  return m;
}

BlobLayout LayoutFor(Precision precision, kernels::DType source, int64_t hidden, int64_t inter,
                     int64_t group) {
  BlobLayout layout;
  uint64_t cursor = 0;
  layout.gate = Place(precision, source, inter, hidden, group, &cursor);
  layout.up = Place(precision, source, inter, hidden, group, &cursor);
  layout.down = Place(precision, source, hidden, inter, group, &cursor);
  layout.size = cursor;
  layout.padded_size = cache::AlignUp(cursor, cache::kBlobAlignment);
  return layout;
}

// Writes one matrix of a blob from the checkpoint tensor's bytes.
void FillMatrix(const MatrixLayout& m, const model::TensorRef& tensor, std::vector<float>* scratch,
                uint8_t* blob) {
  if (m.quantization == kernels::Quantization::kNone) {
    std::memcpy(blob + m.offset, tensor.data, m.bytes);
    return;
  }
  scratch->resize(static_cast<size_t>(m.rows * m.cols));
  kernels::WidenToF32(tensor.info->dtype, tensor.data, m.rows * m.cols, scratch->data());
  auto* scales = reinterpret_cast<float*>(blob + m.scales_offset);
  if (m.quantization == kernels::Quantization::kInt8PerRow) {
    kernels::QuantizeInt8(scratch->data(), m.rows, m.cols,
                          reinterpret_cast<int8_t*>(blob + m.offset), scales);
  } else {
    int64_t group =
        m.cols / static_cast<int64_t>(m.scales_bytes / 4 / static_cast<uint64_t>(m.rows));
    kernels::QuantizeInt4(scratch->data(), m.rows, m.cols, group, blob + m.offset, scales);
  }
}

class FileWriter {
 public:
  static absl::StatusOr<FileWriter> Create(const fs::path& path) {
    FILE* file = std::fopen(path.c_str(), "wb");
    if (file == nullptr)
      return absl::UnavailableError(absl::StrCat(path.string(), ": cannot create"));
    return FileWriter(file, path.string());
  }
  FileWriter(FileWriter&& other) noexcept
      : file_(std::exchange(other.file_, nullptr)),
        path_(std::move(other.path_)),
        size_(other.size_) {}
  ~FileWriter() {
    if (file_ != nullptr) std::fclose(file_);
  }
  absl::Status Write(const void* data, size_t bytes) {
    if (bytes > 0 && std::fwrite(data, 1, bytes, file_) != bytes) {
      return absl::DataLossError(absl::StrCat(path_, ": write failed (disk full?)"));
    }
    size_ += bytes;
    return absl::OkStatus();
  }
  absl::Status PadTo(uint64_t alignment) {
    static const char zeros[4096] = {};
    uint64_t pad = cache::AlignUp(size_, alignment) - size_;
    return Write(zeros, pad);
  }
  absl::Status Close() {
    bool ok = std::fflush(file_) == 0 && fsync(fileno(file_)) == 0;
    ok = std::fclose(file_) == 0 && ok;
    file_ = nullptr;
    if (!ok) return absl::DataLossError(absl::StrCat(path_, ": cannot flush to disk"));
    return absl::OkStatus();
  }
  uint64_t size() const { return size_; }

 private:
  FileWriter(FILE* file, std::string path) : file_(file), path_(std::move(path)) {}
  FILE* file_;
  std::string path_;
  uint64_t size_ = 0;
};

int64_t ChooseGroupSize(int64_t requested, int64_t hidden, int64_t inter) {
  int64_t group = 2;
  for (int64_t g = 2; g <= requested; g *= 2) {
    if (hidden % g == 0 && inter % g == 0) group = g;
  }
  return group;
}

absl::Status PackInto(const std::string& model_dir, const fs::path& out,
                      const PackOptions& options) {
  MOED_ASSIGN_OR_RETURN(model::ModelConfig config, model::LoadModelConfig(model_dir));
  MOED_ASSIGN_OR_RETURN(std::unique_ptr<model::Checkpoint> checkpoint,
                        model::Checkpoint::Open(model_dir));
  const int64_t hidden = config.hidden_size, inter = config.expert_intermediate_size;

  cache::Manifest manifest;
  manifest.architecture = std::string(model::ArchitectureName(config.architecture));
  manifest.num_layers = static_cast<int>(config.num_layers);
  manifest.num_experts = static_cast<int>(config.num_experts);
  manifest.int4_group_size = ChooseGroupSize(options.int4_group_size, hidden, inter);

  // Which tensors are routed experts; all others are dense.
  std::set<std::string> expert_tensors;
  std::optional<kernels::DType> source_dtype;
  for (int layer = 0; layer < config.num_layers; ++layer) {
    if (!config.IsMoeLayer(layer)) continue;
    for (int e = 0; e < config.num_experts; ++e) {
      for (const std::string& name : ExpertTensorNames(config, layer, e)) {
        MOED_ASSIGN_OR_RETURN(model::TensorRef ref, checkpoint->Find(name));
        if (source_dtype.has_value() && *source_dtype != ref.info->dtype) {
          return absl::InvalidArgumentError(absl::StrCat(
              *ref.file, ": tensor ", name, " is ", kernels::DTypeName(ref.info->dtype),
              " but other experts are ", kernels::DTypeName(*source_dtype)));
        }
        source_dtype = ref.info->dtype;
        expert_tensors.insert(name);
      }
    }
  }
  if (!source_dtype.has_value())
    return absl::InvalidArgumentError(absl::StrCat(model_dir, ": the model has no routed experts"));
  manifest.source_dtype = *source_dtype;
  for (Precision p : options.precisions) {
    if (manifest.HasPrecision(p)) continue;
    manifest.precisions.push_back(p);
    manifest.layouts[p] = LayoutFor(p, *source_dtype, hidden, inter, manifest.int4_group_size);
  }
  if (!manifest.HasPrecision(Precision::kSource)) {
    return absl::InvalidArgumentError("the precisions must include source (exact mode)");
  }

  // dense.bin
  MOED_ASSIGN_OR_RETURN(FileWriter dense, FileWriter::Create(out / "dense.bin"));
  for (const std::string& name : checkpoint->TensorNames()) {
    if (expert_tensors.contains(name)) continue;
    MOED_ASSIGN_OR_RETURN(model::TensorRef ref, checkpoint->Find(name));
    cache::DenseTensor t;
    t.name = name;
    t.dtype = ref.info->dtype;
    t.shape = ref.info->shape;
    t.offset = dense.size();
    t.bytes = ref.info->end - ref.info->begin;
    t.xxh64 = cache::Checksum(ref.data, t.bytes);
    MOED_RETURN_IF_ERROR(dense.Write(ref.data, t.bytes));
    MOED_RETURN_IF_ERROR(dense.PadTo(kPartAlignment));
    manifest.dense.push_back(std::move(t));
  }
  manifest.dense_file_size = dense.size();
  MOED_RETURN_IF_ERROR(dense.Close());

  // experts.bin
  MOED_ASSIGN_OR_RETURN(FileWriter experts, FileWriter::Create(out / "experts.bin"));
  std::vector<float> scratch;
  for (int layer = 0; layer < config.num_layers; ++layer) {
    if (!config.IsMoeLayer(layer)) continue;
    for (int e = 0; e < config.num_experts; ++e) {
      auto names = ExpertTensorNames(config, layer, e);
      std::array<model::TensorRef, 3> refs;
      for (int i = 0; i < 3; ++i) {
        MOED_ASSIGN_OR_RETURN(refs[i], checkpoint->Find(names[i]));
        std::vector<int64_t> expected =
            i < 2 ? std::vector<int64_t>{inter, hidden} : std::vector<int64_t>{hidden, inter};
        if (refs[i].info->shape != expected) {
          return absl::InvalidArgumentError(absl::StrCat(*refs[i].file, ": tensor ", names[i],
                                                         " has the wrong shape for config.json"));
        }
      }
      for (Precision p : manifest.precisions) {
        const BlobLayout& layout = manifest.layouts[p];
        MOED_ASSIGN_OR_RETURN(cache::AlignedBuffer blob,
                              cache::AlignedBuffer::Allocate(layout.padded_size));
        FillMatrix(layout.gate, refs[0], &scratch, blob.data());
        FillMatrix(layout.up, refs[1], &scratch, blob.data());
        FillMatrix(layout.down, refs[2], &scratch, blob.data());
        cache::BlobEntry entry{layer, e, p, experts.size(),
                               cache::Checksum(blob.data(), layout.padded_size)};
        MOED_RETURN_IF_ERROR(experts.Write(blob.data(), layout.padded_size));
        manifest.blobs.push_back(entry);
      }
    }
  }
  manifest.experts_file_size = experts.size();
  MOED_RETURN_IF_ERROR(experts.Close());

  MOED_RETURN_IF_ERROR(CopyServingFiles(model_dir, out.string()));
  MOED_ASSIGN_OR_RETURN(FileWriter manifest_file, FileWriter::Create(out / "manifest.json"));
  std::string text = cache::ManifestJson(manifest);
  MOED_RETURN_IF_ERROR(manifest_file.Write(text.data(), text.size()));
  return manifest_file.Close();
}

}  // namespace

absl::Status Pack(const std::string& model_dir, const std::string& out_dir,
                  const PackOptions& options) {
  fs::path out = fs::path(out_dir).lexically_normal();
  if (!out.has_filename()) out = out.parent_path();
  std::error_code error;
  if (fs::exists(out, error))
    return absl::AlreadyExistsError(absl::StrCat(out.string(), " already exists"));
  fs::path temp = out;
  temp += absl::StrCat(".tmp-", getpid());
  fs::remove_all(temp, error);
  if (!fs::create_directories(temp, error)) {
    return absl::UnavailableError(
        absl::StrCat(temp.string(), ": cannot create: ", error.message()));
  }
  absl::Status status = PackInto(model_dir, temp, options);
  if (status.ok()) {
    fs::rename(temp, out, error);
    if (error)
      status =
          absl::UnavailableError(absl::StrCat("rename to ", out.string(), ": ", error.message()));
  }
  if (!status.ok()) fs::remove_all(temp, error);
  return status;
}

}  // namespace moed::tools
