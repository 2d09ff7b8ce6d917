// Reading Hugging Face safetensors checkpoints: single files, sharded sets with
// model.safetensors.index.json, memory-mapped so tensor bytes are never copied on load.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kernels/dtype.h"

namespace moed::model {

struct TensorInfo {
  std::string name;
  kernels::DType dtype = kernels::DType::kF32;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // byte offsets into the data section
  uint64_t end = 0;

  int64_t NumElements() const;
};

// Validates a safetensors header (the JSON after the 8-byte length) against a data section
// of `data_size` bytes: dtypes, shapes, offsets in range, sizes matching the shapes, no
// overlaps. `source` names the file in errors.
absl::StatusOr<std::vector<TensorInfo>> ParseSafetensorsHeader(absl::string_view header_json,
                                                               uint64_t data_size,
                                                               absl::string_view source);

// Parses a whole safetensors file held in memory: the 8-byte little-endian header length, the
// header, and the data section it describes. Returns the tensors and where the data starts.
struct ParsedSafetensors {
  std::vector<TensorInfo> tensors;
  uint64_t data_offset = 0;
};
absl::StatusOr<ParsedSafetensors> ParseSafetensorsBytes(const uint8_t* bytes, uint64_t size,
                                                        absl::string_view source);

// A read-only memory mapping of a whole file.
class MappedFile {
 public:
  static absl::StatusOr<std::unique_ptr<MappedFile>> Open(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  uint64_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  MappedFile() = default;
  const uint8_t* data_ = nullptr;
  uint64_t size_ = 0;
  std::string path_;
};

class SafetensorsFile {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);

  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const std::string& path() const { return file_->path(); }
  const uint8_t* TensorData(const TensorInfo& tensor) const { return data_ + tensor.begin; }

 private:
  std::unique_ptr<MappedFile> file_;
  const uint8_t* data_ = nullptr;
  std::vector<TensorInfo> tensors_;
};

// One tensor of a checkpoint: its description and its bytes in the mapping.
struct TensorRef {
  const TensorInfo* info = nullptr;
  const uint8_t* data = nullptr;
  const std::string* file = nullptr;
};

// Named tensors in memory: a checkpoint, or an expert store's dense weights.
class TensorSource {
 public:
  virtual ~TensorSource() = default;
  // NOT_FOUND naming the tensor and where it was looked for when it is absent.
  virtual absl::StatusOr<TensorRef> Find(absl::string_view name) const = 0;
  virtual bool Contains(absl::string_view name) const = 0;
};

// Every tensor of a checkpoint directory, from model.safetensors.index.json when present,
// else from model.safetensors, else from every *.safetensors file in it.
class Checkpoint final : public TensorSource {
 public:
  static absl::StatusOr<std::unique_ptr<Checkpoint>> Open(const std::string& dir);

  absl::StatusOr<TensorRef> Find(absl::string_view name) const override;
  bool Contains(absl::string_view name) const override { return index_.contains(name); }
  const std::string& dir() const { return dir_; }
  size_t num_tensors() const { return index_.size(); }
  std::vector<std::string> TensorNames() const;

 private:
  std::string dir_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, TensorRef, std::less<>> index_;
};

}  // namespace moed::model
