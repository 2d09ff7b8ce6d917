#include "model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "util/status_macros.h"

namespace moed::model {
namespace {

using nlohmann::json;

constexpr uint64_t kMaxHeaderBytes = 100 << 20;

absl::Status HeaderError(absl::string_view source, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(source, ": ", what));
}

}  // namespace

int64_t TensorInfo::NumElements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

absl::StatusOr<std::vector<TensorInfo>> ParseSafetensorsHeader(absl::string_view header_json,
                                                               uint64_t data_size,
                                                               absl::string_view source) {
  json header = json::parse(header_json.begin(), header_json.end(), nullptr, false);
  if (header.is_discarded()) return HeaderError(source, "safetensors header is not valid JSON");
  if (!header.is_object()) return HeaderError(source, "safetensors header is not a JSON object");
  std::vector<TensorInfo> tensors;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      if (!entry.is_object()) return HeaderError(source, "__metadata__ is not an object");
      continue;
    }
    const std::string& tensor_name = name;  // clang 14 cannot capture structured bindings
    auto bad = [&](absl::string_view what) {
      return HeaderError(source, absl::StrCat("tensor ", tensor_name, ": ", what));
    };
    if (!entry.is_object()) return bad("entry is not an object");
    auto dtype_it = entry.find("dtype");
    auto shape_it = entry.find("shape");
    auto offsets_it = entry.find("data_offsets");
    if (dtype_it == entry.end() || !dtype_it->is_string()) return bad("has no dtype");
    if (shape_it == entry.end() || !shape_it->is_array()) return bad("has no shape");
    if (offsets_it == entry.end() || !offsets_it->is_array() || offsets_it->size() != 2) {
      return bad("has no data_offsets [begin, end]");
    }
    TensorInfo info;
    info.name = name;
    absl::StatusOr<kernels::DType> dtype =
        kernels::ParseSafetensorsDType(dtype_it->get<std::string>());
    if (!dtype.ok()) return bad(dtype.status().message());
    info.dtype = *dtype;
    uint64_t bytes = kernels::DTypeSize(info.dtype);
    for (const json& dim : *shape_it) {
      if (!dim.is_number_unsigned()) return bad("shape holds a value that is not a size");
      uint64_t d = dim.get<uint64_t>();
      if (__builtin_mul_overflow(bytes, d, &bytes)) return bad("shape is larger than any file");
      info.shape.push_back(static_cast<int64_t>(d));
    }
    for (const json& offset : *offsets_it) {
      if (!offset.is_number_unsigned()) return bad("data_offsets are not byte offsets");
    }
    info.begin = (*offsets_it)[0].get<uint64_t>();
    info.end = (*offsets_it)[1].get<uint64_t>();
    if (info.begin > info.end || info.end > data_size) {
      return bad(absl::StrCat("data_offsets [", info.begin, ", ", info.end,
                              ") fall outside the data section of ", data_size,
                              " bytes (truncated file?)"));
    }
    if (info.end - info.begin != bytes) {
      return bad(absl::StrCat("holds ", info.end - info.begin,
                              " bytes but its shape and dtype need ", bytes));
    }
    tensors.push_back(std::move(info));
  }
  std::vector<const TensorInfo*> by_offset;
  for (const TensorInfo& t : tensors) by_offset.push_back(&t);
  std::sort(by_offset.begin(), by_offset.end(),
            [](const TensorInfo* a, const TensorInfo* b) { return a->begin < b->begin; });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    if (by_offset[i]->begin < by_offset[i - 1]->end) {
      return HeaderError(source, absl::StrCat("tensors ", by_offset[i - 1]->name, " and ",
                                              by_offset[i]->name, " overlap"));
    }
  }
  return tensors;
}

absl::StatusOr<std::unique_ptr<MappedFile>> MappedFile::Open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return absl::NotFoundError(absl::StrCat(path, ": cannot open: ", std::strerror(errno)));
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    int saved = errno;
    ::close(fd);
    return absl::UnavailableError(absl::StrCat(path, ": cannot stat: ", std::strerror(saved)));
  }
  std::unique_ptr<MappedFile> file(new MappedFile());
  file->path_ = path;
  file->size_ = static_cast<uint64_t>(st.st_size);
  if (file->size_ > 0) {
    void* mapping = mmap(nullptr, file->size_, PROT_READ, MAP_SHARED, fd, 0);
    if (mapping == MAP_FAILED) {
      int saved = errno;
      ::close(fd);
      return absl::UnavailableError(absl::StrCat(path, ": cannot map: ", std::strerror(saved)));
    }
    file->data_ = static_cast<const uint8_t*>(mapping);
  }
  ::close(fd);
  return file;
}

MappedFile::~MappedFile() {
  if (data_ != nullptr) munmap(const_cast<uint8_t*>(data_), size_);
}

absl::StatusOr<ParsedSafetensors> ParseSafetensorsBytes(const uint8_t* bytes, uint64_t size,
                                                        absl::string_view source) {
  if (size < 8) {
    return absl::DataLossError(
        absl::StrCat(source, ": too short for a safetensors file (", size, " bytes)"));
  }
  uint64_t header_size = 0;
  for (int i = 0; i < 8; ++i) header_size |= static_cast<uint64_t>(bytes[i]) << (8 * i);
  if (header_size > kMaxHeaderBytes || header_size > size - 8) {
    return absl::DataLossError(absl::StrCat(source, ": header length ", header_size,
                                            " exceeds the file (truncated or not safetensors)"));
  }
  absl::string_view header(reinterpret_cast<const char*>(bytes + 8), header_size);
  uint64_t data_size = size - 8 - header_size;
  absl::StatusOr<std::vector<TensorInfo>> tensors =
      ParseSafetensorsHeader(header, data_size, source);
  if (!tensors.ok()) {
    // Offsets past the end of the data mean the file was cut short.
    if (absl::StrContains(tensors.status().message(), "truncated")) {
      return absl::DataLossError(tensors.status().message());
    }
    return tensors.status();
  }
  return ParsedSafetensors{*std::move(tensors), 8 + header_size};
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  MOED_ASSIGN_OR_RETURN(std::unique_ptr<MappedFile> mapped, MappedFile::Open(path));
  MOED_ASSIGN_OR_RETURN(ParsedSafetensors parsed,
                        ParseSafetensorsBytes(mapped->data(), mapped->size(), path));
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->data_ = mapped->data() + parsed.data_offset;
  file->file_ = std::move(mapped);
  file->tensors_ = std::move(parsed.tensors);
  return file;
}

absl::StatusOr<std::unique_ptr<Checkpoint>> Checkpoint::Open(const std::string& dir) {
  namespace fs = std::filesystem;
  std::vector<std::string> files;
  fs::path index_path = fs::path(dir) / "model.safetensors.index.json";
  std::map<std::string, std::string> expected_location;  // tensor -> file, from the index
  std::error_code error;
  if (fs::exists(index_path, error)) {
    std::ifstream in(index_path);
    std::stringstream text;
    text << in.rdbuf();
    json index = json::parse(text.str(), nullptr, false);
    if (index.is_discarded() || !index.is_object() || !index.contains("weight_map") ||
        !index["weight_map"].is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(
          index_path.string(), ": not a safetensors index (needs a weight_map object)"));
    }
    std::set<std::string> unique_files;
    for (const auto& [tensor, file] : index["weight_map"].items()) {
      if (!file.is_string() || file.get<std::string>().find('/') != std::string::npos) {
        return absl::InvalidArgumentError(absl::StrCat(index_path.string(),
                                                       ": weight_map entry for ", tensor,
                                                       " is not a file name in the directory"));
      }
      unique_files.insert(file.get<std::string>());
      expected_location[tensor] = file.get<std::string>();
    }
    files.assign(unique_files.begin(), unique_files.end());
  } else if (fs::exists(fs::path(dir) / "model.safetensors", error)) {
    files.push_back("model.safetensors");
  } else {
    for (const auto& entry : fs::directory_iterator(dir, error)) {
      if (entry.path().extension() == ".safetensors")
        files.push_back(entry.path().filename().string());
    }
    std::sort(files.begin(), files.end());
    if (error) return absl::NotFoundError(absl::StrCat(dir, ": cannot list: ", error.message()));
  }
  if (files.empty()) return absl::NotFoundError(absl::StrCat(dir, ": no *.safetensors files"));

  std::unique_ptr<Checkpoint> checkpoint(new Checkpoint());
  checkpoint->dir_ = dir;
  for (const std::string& name : files) {
    MOED_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> file,
                          SafetensorsFile::Open((fs::path(dir) / name).string()));
    for (const TensorInfo& tensor : file->tensors()) {
      if (checkpoint->index_.contains(tensor.name)) {
        return absl::InvalidArgumentError(
            absl::StrCat(dir, ": tensor ", tensor.name, " appears in more than one file"));
      }
      if (!expected_location.empty()) {
        auto it = expected_location.find(tensor.name);
        if (it == expected_location.end() || it->second != name) {
          return absl::InvalidArgumentError(absl::StrCat(file->path(), ": holds ", tensor.name,
                                                         ", which the index places elsewhere"));
        }
      }
      checkpoint->index_[tensor.name] = TensorRef{&tensor, file->TensorData(tensor), &file->path()};
    }
    checkpoint->files_.push_back(std::move(file));
  }
  for (const auto& [tensor, file] : expected_location) {
    if (!checkpoint->index_.contains(tensor)) {
      return absl::DataLossError(absl::StrCat(dir, ": the index lists ", tensor, " in ", file,
                                              " but that file does not hold it"));
    }
  }
  return checkpoint;
}

absl::StatusOr<TensorRef> Checkpoint::Find(absl::string_view name) const {
  auto it = index_.find(name);
  if (it == index_.end()) {
    return absl::NotFoundError(absl::StrCat(dir_, ": checkpoint has no tensor ", name));
  }
  return it->second;
}

std::vector<std::string> Checkpoint::TensorNames() const {
  std::vector<std::string> names;
  for (const auto& [name, ref] : index_) names.push_back(name);
  return names;
}

}  // namespace moed::model
