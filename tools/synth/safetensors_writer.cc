#include "tools/synth/safetensors_writer.h"

#include <algorithm>
#include <memory>
#include <thread>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace moed::tools {

int64_t TensorSpec::NumElements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorSpec>& tensors,
                              const std::vector<std::pair<std::string, std::string>>& metadata,
                              const TensorFiller& fill) {
  // nlohmann::ordered_json keeps insertion order, so the header is deterministic.
  nlohmann::ordered_json header;
  nlohmann::ordered_json meta = nlohmann::ordered_json::object();
  for (const auto& [key, value] : metadata) meta[key] = value;
  header["__metadata__"] = meta;
  uint64_t offset = 0;
  for (const TensorSpec& tensor : tensors) {
    header[tensor.name] = {{"dtype", std::string(kernels::DTypeName(tensor.dtype))},
                           {"shape", tensor.shape},
                           {"data_offsets", {offset, offset + tensor.NumBytes()}}};
    offset += tensor.NumBytes();
  }
  std::string header_text = header.dump();
  // Pad with spaces so that the data starts 8-byte aligned, as the format recommends.
  header_text.append((8 - header_text.size() % 8) % 8, ' ');

  std::unique_ptr<FILE, int (*)(FILE*)> file(std::fopen(path.c_str(), "wb"), &std::fclose);
  if (!file) return absl::UnavailableError(absl::StrCat(path, ": cannot create"));
  uint64_t header_size = header_text.size();
  uint8_t size_bytes[8];
  for (int i = 0; i < 8; ++i) size_bytes[i] = static_cast<uint8_t>(header_size >> (8 * i));
  bool ok =
      std::fwrite(size_bytes, 1, 8, file.get()) == 8 &&
      std::fwrite(header_text.data(), 1, header_text.size(), file.get()) == header_text.size();

  constexpr int64_t kChunkBytes = 64 << 20;
  std::vector<uint8_t> buffer;
  for (const TensorSpec& tensor : tensors) {
    if (!ok) break;
    int64_t elements_per_chunk =
        std::max<int64_t>(1, kChunkBytes / static_cast<int64_t>(kernels::DTypeSize(tensor.dtype)));
    for (int64_t begin = 0; begin < tensor.NumElements() && ok; begin += elements_per_chunk) {
      int64_t end = std::min(tensor.NumElements(), begin + elements_per_chunk);
      buffer.resize(static_cast<size_t>(end - begin) * kernels::DTypeSize(tensor.dtype));
      fill(tensor, begin, end, buffer.data());
      ok = std::fwrite(buffer.data(), 1, buffer.size(), file.get()) == buffer.size();
    }
  }
  if (!ok || std::fflush(file.get()) != 0) {
    return absl::DataLossError(absl::StrCat(path, ": write failed (disk full?)"));
  }
  return absl::OkStatus();
}

}  // namespace moed::tools
