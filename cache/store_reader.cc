#include "cache/store_reader.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "cache/aligned_buffer.h"
#include "util/status_macros.h"

namespace moed::cache {

absl::Status BlobError(const Store& store, const BlobEntry& blob, ReadFaultKind kind,
                       absl::string_view what, int attempts) {
  std::string message = absl::StrCat(
      "layer ", blob.layer, " expert ", blob.expert, " (", PrecisionName(blob.precision),
      "): ", what, " in ", store.experts_path(), " at offset ", blob.offset,
      attempts > 1 ? absl::StrCat(" (", attempts, " attempts)") : std::string());
  StoreFault fault{kind, blob.layer, blob.expert, blob.precision, blob.offset, attempts};
  return WithStoreFault(kind == ReadFaultKind::kIoError ? absl::UnavailableError(message)
                                                        : absl::DataLossError(message),
                        fault);
}

absl::StatusOr<std::shared_ptr<Store>> Store::Open(const std::string& dir) {
  std::shared_ptr<Store> store(new Store());
  store->dir_ = dir;
  std::string manifest_path = dir + "/manifest.json";
  std::ifstream in(manifest_path, std::ios::binary);
  if (!in)
    return absl::NotFoundError(
        absl::StrCat(manifest_path, ": cannot open (is ", dir, " an expert store?)"));
  std::stringstream text;
  text << in.rdbuf();
  MOED_ASSIGN_OR_RETURN(store->manifest_, ParseManifest(text.str(), manifest_path));
  MOED_ASSIGN_OR_RETURN(store->config_, model::LoadModelConfig(dir));
  const Manifest& m = store->manifest_;
  MOED_RETURN_IF_ERROR(CheckManifestAgainstConfig(m, store->config_, manifest_path));

  store->dense_path_ = dir + "/dense.bin";
  MOED_ASSIGN_OR_RETURN(store->dense_, model::MappedFile::Open(store->dense_path_));
  if (store->dense_->size() < m.dense_file_size) {
    return absl::DataLossError(absl::StrCat(store->dense_path_, ": holds ", store->dense_->size(),
                                            " bytes but the manifest lists ", m.dense_file_size,
                                            " (truncated)"));
  }
  store->dense_infos_.reserve(m.dense.size());
  for (const DenseTensor& t : m.dense) {
    if (Checksum(store->dense_->data() + t.offset, t.bytes) != t.xxh64) {
      return absl::DataLossError(absl::StrCat(store->dense_path_, ": tensor ", t.name,
                                              " fails its checksum (offset ", t.offset, ")"));
    }
    model::TensorInfo info;
    info.name = t.name;
    info.dtype = t.dtype;
    info.shape = t.shape;
    info.begin = t.offset;
    info.end = t.offset + t.bytes;
    store->dense_index_[t.name] = store->dense_infos_.size();
    store->dense_infos_.push_back(std::move(info));
  }

  store->experts_path_ = dir + "/experts.bin";
  store->experts_fd_ = ::open(store->experts_path_.c_str(), O_RDONLY | O_CLOEXEC);
  if (store->experts_fd_ < 0) {
    return absl::NotFoundError(
        absl::StrCat(store->experts_path_, ": cannot open: ", std::strerror(errno)));
  }
  MOED_RETURN_IF_ERROR(store->CheckExpertsFile());
  return store;
}

Store::~Store() {
  if (experts_fd_ >= 0) ::close(experts_fd_);
}

absl::StatusOr<model::TensorRef> Store::Find(absl::string_view name) const {
  auto it = dense_index_.find(name);
  if (it == dense_index_.end())
    return absl::NotFoundError(absl::StrCat(dir_, ": store has no dense tensor ", name));
  const model::TensorInfo& info = dense_infos_[it->second];
  return model::TensorRef{&info, dense_->data() + info.begin, &dense_path_};
}

bool Store::Contains(absl::string_view name) const { return dense_index_.contains(name); }

absl::StatusOr<const BlobEntry*> Store::Blob(int layer, int expert, Precision precision) const {
  const BlobEntry* blob = manifest_.FindBlob(layer, expert, precision);
  if (blob == nullptr) {
    return absl::NotFoundError(absl::StrCat(dir_, ": no ", PrecisionName(precision),
                                            " blob for layer ", layer, " expert ", expert,
                                            " (pack with --precisions including it)"));
  }
  return blob;
}

absl::Status Store::CheckExpertsFile() const {
  const uint64_t listed = manifest_.experts_file_size;
  auto too_short = [&](uint64_t size) {
    return absl::DataLossError(absl::StrCat(
        experts_path_, ": holds ", size, " bytes but the manifest lists ", listed, " (truncated)"));
  };
  struct stat opened {};
  if (::fstat(experts_fd_, &opened) != 0) {
    return absl::UnavailableError(
        absl::StrCat(experts_path_, ": cannot stat: ", std::strerror(errno)));
  }
  if (static_cast<uint64_t>(opened.st_size) < listed) return too_short(opened.st_size);
  int fd = ::open(experts_path_.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return absl::UnavailableError(
        absl::StrCat(experts_path_, ": cannot open: ", std::strerror(errno)));
  }
  struct stat now {};
  const int rc = ::fstat(fd, &now);
  ::close(fd);
  if (rc != 0) {
    return absl::UnavailableError(
        absl::StrCat(experts_path_, ": cannot stat: ", std::strerror(errno)));
  }
  if (static_cast<uint64_t>(now.st_size) < listed) return too_short(now.st_size);
  return absl::OkStatus();
}

absl::Status Store::ReadBlob(const BlobEntry& blob, uint8_t* buffer) const {
  const uint64_t size = manifest_.layouts.at(blob.precision).padded_size;
  uint64_t done = 0;
  while (done < size) {
    ssize_t n =
        ::pread(experts_fd_, buffer + done, size - done, static_cast<off_t>(blob.offset + done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0)
      return BlobError(*this, blob, ReadFaultKind::kIoError,
                       absl::StrCat("read error (", std::strerror(errno), ")"));
    if (n == 0)
      return BlobError(*this, blob, ReadFaultKind::kShortRead,
                       absl::StrCat("short read (", done, " of ", size, " bytes)"));
    done += static_cast<uint64_t>(n);
  }
  if (Checksum(buffer, size) != blob.xxh64)
    return BlobError(*this, blob, ReadFaultKind::kCorrupt, "checksum mismatch");
  return absl::OkStatus();
}

}  // namespace moed::cache
