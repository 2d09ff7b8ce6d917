#include "kernels/cuda/cuda_backend.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/grid_stream.h"

namespace moed::kernels::cuda {
namespace {

// Below this many tokens a GEMV kernel reads the weights once per token anyway; above it
// cuBLAS's tiled SGEMM wins.
constexpr int64_t kCublasMinTokens = 32;

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

class CudaDevice final : public Device {
 public:
  explicit CudaDevice(int index) : index_(index) {}
  absl::StatusOr<DeviceInfo> info() const override { return QueryDevice(index_); }
  absl::StatusOr<DeviceBuffer> Allocate(size_t bytes) override {
    if (bytes == 0) return DeviceBuffer(this, nullptr, 0, BufferKind::kDevice);
    if (absl::Status s = Bind(); !s.ok()) return s;
    void* data = nullptr;
    if (absl::Status s =
            CudaStatus(cudaMalloc(&data, bytes), absl::StrCat("cudaMalloc(", bytes, ")"));
        !s.ok()) {
      return s;
    }
    return DeviceBuffer(this, data, bytes, BufferKind::kDevice);
  }
  absl::StatusOr<DeviceBuffer> AllocateHost(size_t bytes) override {
    if (bytes == 0) return DeviceBuffer(this, nullptr, 0, BufferKind::kPinnedHost);
    if (absl::Status s = Bind(); !s.ok()) return s;
    void* data = nullptr;
    if (absl::Status s = CudaStatus(cudaHostAlloc(&data, bytes, cudaHostAllocDefault),
                                    absl::StrCat("cudaHostAlloc(", bytes, ")"));
        !s.ok()) {
      return s;
    }
    return DeviceBuffer(this, data, bytes, BufferKind::kPinnedHost);
  }
  bool host_memory_is_device_memory() const override { return false; }
  bool Supports(Op op, WeightFormat format) const override {
    return op != Op::kEmbedding || format == WeightFormat::kF32 || format == WeightFormat::kF16 ||
           format == WeightFormat::kBF16;
  }
  absl::Status WaitForEvent(const Event& event) override {
    if (event.handle() == nullptr) return absl::OkStatus();
    if (absl::Status s = Bind(); !s.ok()) return s;
    return CudaStatus(cudaEventSynchronize(static_cast<cudaEvent_t>(event.handle())),
                      "cudaEventSynchronize");
  }
  absl::Status Bind() const { return CudaStatus(cudaSetDevice(index_), "cudaSetDevice"); }

 protected:
  void Free(void* data, size_t /*bytes*/, BufferKind kind) override {
    cudaSetDevice(index_);
    // Work queued on the buffer may still be running: let it finish first.
    cudaDeviceSynchronize();
    if (kind == BufferKind::kPinnedHost) {
      cudaFreeHost(data);
    } else {
      cudaFree(data);
    }
  }

 private:
  int index_;
};

void DestroyEvent(void* event) { cudaEventDestroy(static_cast<cudaEvent_t>(event)); }

class CudaStream final : public grid::GridStream<DeviceLauncher> {
 public:
  CudaStream(CudaDevice* device, cudaStream_t stream, cublasHandle_t blas)
      : device_(*device), stream_(stream), blas_(blas), launcher_(stream) {}
  ~CudaStream() override {
    device_.Bind().IgnoreError();
    cudaStreamSynchronize(stream_);
    if (blas_ != nullptr) cublasDestroy(blas_);
    cudaStreamDestroy(stream_);
  }

  absl::Status CopyToDevice(const DeviceBuffer& dst, size_t dst_offset, const void* src,
                            size_t bytes) override {
    if (absl::Status s = CheckRange(dst, dst_offset, bytes); !s.ok()) return s;
    if (bytes == 0) return absl::OkStatus();
    if (absl::Status s = device_.Bind(); !s.ok()) return s;
    return CudaStatus(cudaMemcpyAsync(static_cast<char*>(dst.data()) + dst_offset, src, bytes,
                                      cudaMemcpyHostToDevice, stream_),
                      "cudaMemcpyAsync(host to device)");
  }
  absl::Status CopyOnDevice(const DeviceBuffer& dst, size_t dst_offset, const DeviceBuffer& src,
                            size_t src_offset, size_t bytes) override {
    if (absl::Status s = CheckRange(dst, dst_offset, bytes); !s.ok()) return s;
    if (absl::Status s = CheckRange(src, src_offset, bytes); !s.ok()) return s;
    if (bytes == 0) return absl::OkStatus();
    if (absl::Status s = device_.Bind(); !s.ok()) return s;
    return CudaStatus(cudaMemcpyAsync(static_cast<char*>(dst.data()) + dst_offset,
                                      static_cast<const char*>(src.data()) + src_offset, bytes,
                                      cudaMemcpyDeviceToDevice, stream_),
                      "cudaMemcpyAsync(device to device)");
  }
  absl::Status CopyToHost(void* dst, const DeviceBuffer& src, size_t src_offset,
                          size_t bytes) override {
    if (absl::Status s = CheckRange(src, src_offset, bytes); !s.ok()) return s;
    if (bytes == 0) return absl::OkStatus();
    if (absl::Status s = device_.Bind(); !s.ok()) return s;
    if (absl::Status s =
            CudaStatus(cudaMemcpyAsync(dst, static_cast<const char*>(src.data()) + src_offset,
                                       bytes, cudaMemcpyDeviceToHost, stream_),
                       "cudaMemcpyAsync(device to host)");
        !s.ok()) {
      return s;
    }
    return Synchronize();
  }
  absl::StatusOr<Event> Record() override {
    if (absl::Status s = device_.Bind(); !s.ok()) return s;
    cudaEvent_t event = nullptr;
    if (absl::Status s =
            CudaStatus(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "cudaEventCreate");
        !s.ok()) {
      return s;
    }
    Event recorded(std::shared_ptr<void>(event, DestroyEvent));
    if (absl::Status s = CudaStatus(cudaEventRecord(event, stream_), "cudaEventRecord"); !s.ok()) {
      return s;
    }
    return recorded;
  }
  absl::Status Wait(const Event& event) override {
    if (event.handle() == nullptr) return absl::OkStatus();
    if (absl::Status s = device_.Bind(); !s.ok()) return s;
    return CudaStatus(cudaStreamWaitEvent(stream_, static_cast<cudaEvent_t>(event.handle()), 0),
                      "cudaStreamWaitEvent");
  }
  absl::Status Synchronize() override {
    if (absl::Status s = device_.Bind(); !s.ok()) return s;
    return CudaStatus(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
  }

  absl::Status MatMul(const WeightMatrix& w, const float* x, int64_t n, float* y) override {
    // fp32 weights with many tokens: cuBLAS SGEMM (exact fp32 products and sums, in its own
    // order). bf16/fp16 would need the activations rounded to 16 bits for cuBLAS, which exact
    // mode does not allow, so they stay on the GEMV kernel.
    if (blas_ != nullptr && n >= kCublasMinTokens && w.quantization == Quantization::kNone &&
        w.dtype == DType::kF32) {
      if (absl::Status s = device_.Bind(); !s.ok()) return s;
      const float one = 1.0f, zero = 0.0f;
      // Column-major view: y^T [rows, n] = W [cols, rows]^T · x^T [cols, n].
      cublasStatus_t status =
          cublasSgemm(blas_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(w.rows),
                      static_cast<int>(n), static_cast<int>(w.cols), &one,
                      static_cast<const float*>(w.data), static_cast<int>(w.cols), x,
                      static_cast<int>(w.cols), &zero, y, static_cast<int>(w.rows));
      if (status != CUBLAS_STATUS_SUCCESS) {
        return absl::InternalError(absl::StrCat("cublasSgemm failed with status ", status));
      }
      return absl::OkStatus();
    }
    return GridStream::MatMul(w, x, n, y);
  }

 protected:
  DeviceLauncher& launcher() override {
    device_.Bind().IgnoreError();
    return launcher_;
  }
  absl::Status Launched(const char* op) override {
    return CudaStatus(static_cast<cudaError_t>(launcher_.TakeError()),
                      absl::StrCat(op, " kernel launch"));
  }

 private:
  CudaDevice& device_;
  cudaStream_t stream_;
  cublasHandle_t blas_;
  DeviceLauncher launcher_;
};

class CudaBackend final : public Backend {
 public:
  CudaBackend(int index, cudaStream_t compute, cublasHandle_t blas, cudaStream_t copy)
      : device_(index), compute_(&device_, compute, blas), copy_(&device_, copy, nullptr) {}
  absl::string_view name() const override { return "cuda"; }
  Device& device() override { return device_; }
  Stream& compute() override { return compute_; }
  Stream& copy() override { return copy_; }

 private:
  CudaDevice device_;
  CudaStream compute_;
  CudaStream copy_;
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
  cudaStream_t compute = nullptr, copy = nullptr;
  if (absl::Status s = CudaStatus(cudaStreamCreateWithFlags(&compute, cudaStreamNonBlocking),
                                  "cudaStreamCreate");
      !s.ok()) {
    return s;
  }
  if (absl::Status s =
          CudaStatus(cudaStreamCreateWithFlags(&copy, cudaStreamNonBlocking), "cudaStreamCreate");
      !s.ok()) {
    cudaStreamDestroy(compute);
    return s;
  }
  cublasHandle_t blas = nullptr;
  if (cublasCreate(&blas) != CUBLAS_STATUS_SUCCESS ||
      cublasSetStream(blas, compute) != CUBLAS_STATUS_SUCCESS) {
    if (blas != nullptr) cublasDestroy(blas);
    cudaStreamDestroy(compute);
    cudaStreamDestroy(copy);
    return absl::UnavailableError("cublasCreate failed");
  }
  return std::unique_ptr<Backend>(new CudaBackend(index, compute, blas, copy));
}

}  // namespace moed::kernels::cuda
