#include "kernels/cuda/cuda_backend.h"

#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"
#include "kernels/cpu_backend.h"
#include "kernels/cuda/cuda_ops.h"

namespace moed::kernels::cuda {
namespace {

absl::Status CudaStatus(cudaError_t error, absl::string_view what) {
  if (error == cudaSuccess) return absl::OkStatus();
  absl::StatusCode code = absl::StatusCode::kInternal;
  if (error == cudaErrorMemoryAllocation) code = absl::StatusCode::kResourceExhausted;
  if (error == cudaErrorNoDevice || error == cudaErrorInsufficientDriver ||
      error == cudaErrorInvalidDevice) {
    code = absl::StatusCode::kUnavailable;
  }
  return absl::Status(code, absl::StrCat(what, ": ", cudaGetErrorName(error), " (",
                                         cudaGetErrorString(error), ")"));
}

absl::StatusOr<DeviceInfo> QueryDevice(int index) {
  cudaDeviceProp props{};
  if (absl::Status s = CudaStatus(cudaGetDeviceProperties(&props, index),
                                  absl::StrCat("cudaGetDeviceProperties(", index, ")"));
      !s.ok()) {
    return s;
  }
  if (absl::Status s = CudaStatus(cudaSetDevice(index), absl::StrCat("cudaSetDevice(", index, ")"));
      !s.ok()) {
    return s;
  }
  size_t free_bytes = 0, total_bytes = 0;
  if (absl::Status s = CudaStatus(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo");
      !s.ok()) {
    return s;
  }
  DeviceInfo info;
  info.index = index;
  info.name = props.name;
  info.total_memory_bytes = total_bytes;
  info.free_memory_bytes = free_bytes;
  info.compute_capability = absl::StrCat(props.major, ".", props.minor);
  info.compute_units = props.multiProcessorCount;
  return info;
}

class CudaBackend final : public Backend {
 public:
  CudaBackend(int index, cudaStream_t stream) : index_(index), stream_(stream) {}
  ~CudaBackend() override {
    cudaSetDevice(index_);
    cudaStreamSynchronize(stream_);
    cudaStreamDestroy(stream_);
  }

  absl::string_view name() const override { return "cuda"; }
  absl::StatusOr<DeviceInfo> device() const override { return QueryDevice(index_); }

  absl::StatusOr<DeviceBuffer> Allocate(size_t bytes) override {
    if (bytes == 0) return DeviceBuffer(this, nullptr, 0);
    if (absl::Status s = Bind(); !s.ok()) return s;
    void* data = nullptr;
    if (absl::Status s =
            CudaStatus(cudaMalloc(&data, bytes), absl::StrCat("cudaMalloc(", bytes, ")"));
        !s.ok()) {
      return s;
    }
    return DeviceBuffer(this, data, bytes);
  }

  absl::Status CopyToDeviceAsync(const DeviceBuffer& dst, size_t dst_offset, const void* src,
                                 size_t bytes) override {
    if (absl::Status s = CheckRange(dst, dst_offset, bytes); !s.ok()) return s;
    if (bytes == 0) return absl::OkStatus();
    if (absl::Status s = Bind(); !s.ok()) return s;
    return CudaStatus(cudaMemcpyAsync(static_cast<char*>(dst.data()) + dst_offset, src, bytes,
                                      cudaMemcpyHostToDevice, stream_),
                      "cudaMemcpyAsync(host to device)");
  }

  absl::Status CopyToHost(void* dst, const DeviceBuffer& src, size_t src_offset,
                          size_t bytes) override {
    if (absl::Status s = CheckRange(src, src_offset, bytes); !s.ok()) return s;
    if (bytes == 0) return absl::OkStatus();
    if (absl::Status s = Bind(); !s.ok()) return s;
    if (absl::Status s =
            CudaStatus(cudaMemcpyAsync(dst, static_cast<const char*>(src.data()) + src_offset,
                                       bytes, cudaMemcpyDeviceToHost, stream_),
                       "cudaMemcpyAsync(device to host)");
        !s.ok()) {
      return s;
    }
    return Synchronize();
  }

  absl::Status Synchronize() override {
    if (absl::Status s = Bind(); !s.ok()) return s;
    return CudaStatus(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
  }

  absl::Status ConvertBf16ToF32(const DeviceBuffer& src, const DeviceBuffer& dst,
                                size_t count) override {
    if (absl::Status s = CheckRange(src, 0, count * sizeof(uint16_t)); !s.ok()) return s;
    if (absl::Status s = CheckRange(dst, 0, count * sizeof(float)); !s.ok()) return s;
    if (absl::Status s = Bind(); !s.ok()) return s;
    return CudaStatus(static_cast<cudaError_t>(
                          LaunchConvertBf16ToF32(static_cast<const uint16_t*>(src.data()),
                                                 static_cast<float*>(dst.data()), count, stream_)),
                      "ConvertBf16ToF32 kernel launch");
  }

 protected:
  void Free(void* data, size_t /*bytes*/) override {
    cudaSetDevice(index_);
    cudaStreamSynchronize(stream_);
    cudaFree(data);
  }

 private:
  // The CUDA current device is per thread: set it on every entry.
  absl::Status Bind() const { return CudaStatus(cudaSetDevice(index_), "cudaSetDevice"); }

  int index_;
  cudaStream_t stream_;
};

}  // namespace

absl::StatusOr<std::vector<DeviceInfo>> ListDevices() {
  int count = 0;
  if (absl::Status s = CudaStatus(cudaGetDeviceCount(&count), "cudaGetDeviceCount"); !s.ok()) {
    return s;
  }
  if (count == 0) return absl::UnavailableError("cudaGetDeviceCount: no CUDA device");
  std::vector<DeviceInfo> devices;
  for (int i = 0; i < count; ++i) {
    absl::StatusOr<DeviceInfo> info = QueryDevice(i);
    if (!info.ok()) return info.status();
    devices.push_back(*std::move(info));
  }
  return devices;
}

absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(int index) {
  absl::StatusOr<std::vector<DeviceInfo>> devices = ListDevices();
  if (!devices.ok()) return devices.status();
  if (index < 0 || index >= static_cast<int>(devices->size())) {
    return absl::InvalidArgumentError(
        absl::StrCat("CUDA device ", index, " does not exist (", devices->size(), " visible)"));
  }
  if (absl::Status s = CudaStatus(cudaSetDevice(index), "cudaSetDevice"); !s.ok()) return s;
  cudaStream_t stream = nullptr;
  if (absl::Status s =
          CudaStatus(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
      !s.ok()) {
    return s;
  }
  return std::unique_ptr<Backend>(new CudaBackend(index, stream));
}

}  // namespace moed::kernels::cuda
