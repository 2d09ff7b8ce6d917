// Opening an expert store: the manifest, the memory-mapped dense weights (checksums verified
// at open) and positioned reads of expert blobs (checksums verified on every read).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "cache/store.h"
#include "cache/store_fault.h"
#include "model/expert_provider.h"
#include "model/model_config.h"
#include "model/safetensors.h"

namespace moed::cache {

class Store final : public model::TensorSource {
 public:
  static absl::StatusOr<std::shared_ptr<Store>> Open(const std::string& dir);
  ~Store() override;

  const Manifest& manifest() const { return manifest_; }
  const model::ModelConfig& config() const { return config_; }
  const std::string& dir() const { return dir_; }
  const std::string& experts_path() const { return experts_path_; }

  absl::StatusOr<model::TensorRef> Find(absl::string_view name) const override;
  bool Contains(absl::string_view name) const override;

  // Reads the blob of (layer, expert, precision) into `buffer` (at least its padded size) and
  // verifies its checksum. Errors name the layer, the expert and where in experts.bin.
  absl::Status ReadBlob(const BlobEntry& blob, uint8_t* buffer) const;
  absl::StatusOr<const BlobEntry*> Blob(int layer, int expert, Precision precision) const;
  // OK when experts.bin can be opened and both it and the file opened at start hold at least
  // the bytes the manifest lists (the file may have been truncated or removed since).
  absl::Status CheckExpertsFile() const;

 private:
  Store() = default;
  std::string dir_;
  std::string experts_path_;
  Manifest manifest_;
  model::ModelConfig config_;
  std::unique_ptr<model::MappedFile> dense_;
  std::vector<model::TensorInfo> dense_infos_;
  std::map<std::string, size_t, std::less<>> dense_index_;
  std::string dense_path_;
  int experts_fd_ = -1;
};

// A failed read of a blob, shared by every reader: "layer L expert E (precision): checksum
// mismatch in experts.bin at offset O". DATA_LOSS, or UNAVAILABLE for an I/O error (which may
// pass), with the StoreFault naming the blob attached.
absl::Status BlobError(const Store& store, const BlobEntry& blob, ReadFaultKind kind,
                       absl::string_view what, int attempts = 1);

}  // namespace moed::cache
