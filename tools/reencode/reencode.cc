#include "tools/reencode/reencode.h"

#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "model/safetensors.h"
#include "nlohmann/json.hpp"
#include "tools/checkpoint_files.h"
#include "tools/synth/safetensors_writer.h"
#include "util/status_macros.h"

namespace moed::tools {
namespace {

namespace fs = std::filesystem;

const char* TorchDtype(kernels::DType dtype) {
  switch (dtype) {
    case kernels::DType::kF32:
      return "float32";
    case kernels::DType::kF16:
      return "float16";
    case kernels::DType::kBF16:
      return "bfloat16";
  }
  return "";
}

float LoadAsFloat(kernels::DType dtype, const uint8_t* data, int64_t i) {
  uint16_t half;
  switch (dtype) {
    case kernels::DType::kF32: {
      float v;
      std::memcpy(&v, data + 4 * i, 4);
      return v;
    }
    case kernels::DType::kF16:
      std::memcpy(&half, data + 2 * i, 2);
      return kernels::F16ToF32(half);
    case kernels::DType::kBF16:
      std::memcpy(&half, data + 2 * i, 2);
      return kernels::Bf16ToF32(half);
  }
  return 0;
}

}  // namespace

absl::Status Reencode(const std::string& model_dir, const std::string& out_dir,
                      const ReencodeOptions& options) {
  if (options.shards < 1) return absl::InvalidArgumentError("shards must be at least 1");
  std::error_code error;
  if (fs::exists(out_dir, error))
    return absl::AlreadyExistsError(absl::StrCat(out_dir, " already exists"));
  MOED_ASSIGN_OR_RETURN(std::unique_ptr<model::Checkpoint> checkpoint,
                        model::Checkpoint::Open(model_dir));
  fs::create_directories(out_dir, error);
  if (error) return absl::UnavailableError(absl::StrCat(out_dir, ": ", error.message()));

  // Everything that is not weights comes along; config.json gets the new dtype.
  MOED_RETURN_IF_ERROR(CopyServingFiles(model_dir, out_dir));
  {
    std::ifstream in(fs::path(model_dir) / "config.json");
    nlohmann::ordered_json config = nlohmann::ordered_json::parse(in, nullptr, false);
    if (config.is_discarded())
      return absl::InvalidArgumentError(model_dir + "/config.json: not JSON");
    config["torch_dtype"] = TorchDtype(options.dtype);
    std::ofstream(fs::path(out_dir) / "config.json") << config.dump(2) << "\n";
  }

  std::vector<std::string> names = checkpoint->TensorNames();
  nlohmann::ordered_json weight_map = nlohmann::ordered_json::object();
  for (int shard = 0; shard < options.shards; ++shard) {
    size_t begin = names.size() * shard / options.shards;
    size_t end = names.size() * (shard + 1) / options.shards;
    std::string file = options.shards == 1 ? std::string("model.safetensors")
                                           : absl::StrFormat("model-%05d-of-%05d.safetensors",
                                                             shard + 1, options.shards);
    std::vector<TensorSpec> specs;
    for (size_t i = begin; i < end; ++i) {
      MOED_ASSIGN_OR_RETURN(model::TensorRef ref, checkpoint->Find(names[i]));
      specs.push_back({names[i], ref.info->shape, options.dtype});
      weight_map[names[i]] = file;
    }
    MOED_RETURN_IF_ERROR(WriteSafetensors(
        (fs::path(out_dir) / file).string(), specs, {{"format", "pt"}},
        [&](const TensorSpec& spec, int64_t first, int64_t last, uint8_t* out) {
          model::TensorRef ref = *checkpoint->Find(spec.name);
          for (int64_t i = first; i < last; ++i) {
            float v = LoadAsFloat(ref.info->dtype, ref.data, i);
            size_t at = static_cast<size_t>(i - first);
            if (options.dtype == kernels::DType::kF32) {
              std::memcpy(out + 4 * at, &v, 4);
            } else {
              uint16_t h = options.dtype == kernels::DType::kF16 ? kernels::F32ToF16(v)
                                                                 : kernels::F32ToBf16(v);
              std::memcpy(out + 2 * at, &h, 2);
            }
          }
        }));
  }
  if (options.shards > 1) {
    nlohmann::ordered_json index = {{"metadata", nlohmann::ordered_json::object()},
                                    {"weight_map", weight_map}};
    std::ofstream(fs::path(out_dir) / "model.safetensors.index.json") << index.dump(2) << "\n";
  }
  return absl::OkStatus();
}

}  // namespace moed::tools
