#include "server/engine/engine.h"

#include <ATen/Parallel.h>
#include <torch/torch.h>

#include <cmath>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "server/engine/device.h"
#include "server/model/dlib_resnet.h"
#include "server/model/iresnet.h"

#ifdef ARCFACE_WITH_CUDA
#include "server/engine/cuda_engine.h"
#endif

namespace arcface::engine {

struct Engine::Impl {
#ifdef ARCFACE_WITH_ONEDNN
  std::unique_ptr<OnednnNet> onednn;  // the CPU path by default; else `net` runs on libtorch
#endif
  model::IResNet net{nullptr};
  model::DlibResNet dlib{nullptr};  // the dlib family's network instead of `net`
  int64_t crop_size = kCropSize;
  torch::Device device{torch::kCPU};
  torch::ScalarType dtype = torch::kFloat32;
  bool channels_last = true;

  torch::Tensor Forward(const uint8_t* data, int64_t n) {
    c10::InferenceMode inference;
    // from_blob does not copy; the single copy is the transfer to the device (or, on the CPU,
    // the conversion to float below).
    torch::Tensor nhwc = torch::from_blob(const_cast<uint8_t*>(data),
                                          {n, crop_size, crop_size, 3}, torch::kUInt8);
    torch::Tensor x = nhwc.to(device, /*non_blocking=*/false).permute({0, 3, 1, 2});
    if (dlib) {
      x = model::DlibNormalize(x.to(torch::kFloat32).contiguous());
      return dlib->forward(x).to(torch::kCPU).contiguous();
    }
    x = x.to(torch::kFloat32).sub_(127.5).div_(127.5);
    x = x.contiguous(channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
    if (dtype != torch::kFloat32) x = x.to(dtype);
    return net->forward(x).to(torch::kFloat32).to(torch::kCPU).contiguous();
  }
};

absl::StatusOr<Precision> ParsePrecision(const std::string& name) {
  if (name == "fp32") return Precision::kFp32;
  if (name == "fp16") return Precision::kFp16;
  if (name == "bf16") return Precision::kBf16;
  if (name == "int8") return Precision::kInt8;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown precision '", name, "': expected fp32, fp16, bf16 or int8"));
}

const char* PrecisionName(Precision precision) {
  switch (precision) {
    case Precision::kFp32:
      return "fp32";
    case Precision::kFp16:
      return "fp16";
    case Precision::kBf16:
      return "bf16";
    case Precision::kInt8:
      return "int8";
  }
  return "?";
}

bool BuiltWithOnednn() {
#ifdef ARCFACE_WITH_ONEDNN
  return true;
#else
  return false;
#endif
}

bool BuiltWithCuda() {
#ifdef ARCFACE_WITH_CUDA
  return at::hasCUDA();
#else
  return false;  // the CUDA path is not compiled in, whatever the libtorch
#endif
}

absl::StatusOr<torch::Device> ResolveDevice(const std::string& name) {
  const bool cuda_built = BuiltWithCuda();
  if (name == "auto") {
    return cuda_built && torch::cuda::is_available() ? torch::Device(torch::kCUDA, 0)
                                                     : torch::Device(torch::kCPU);
  }
  if (name == "cpu") return torch::Device(torch::kCPU);
  if (name == "cuda" || absl::StartsWith(name, "cuda:")) {
    int index = 0;
    if (name != "cuda" && (!absl::SimpleAtoi(name.substr(5), &index) || index < 0)) {
      return absl::InvalidArgumentError(absl::StrCat("device '", name, "': bad CUDA device index"));
    }
    if (!cuda_built) {
      return absl::FailedPreconditionError(absl::StrCat(
          "device '", name,
          "': this server was built without CUDA (against a CPU-only libtorch); "
          "use --device=cpu, or rebuild with -DTorch_DIR=<a CUDA libtorch>/share/cmake/Torch"));
    }
    const int count = static_cast<int>(torch::cuda::device_count());
    if (index >= count) {
      return absl::FailedPreconditionError(
          absl::StrCat("device '", name, "': ", count, " CUDA device(s) visible"));
    }
    return torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(index));
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown device '", name, "': expected auto, cpu, cuda or cuda:N"));
}

namespace {

torch::ScalarType ScalarTypeOf(Precision precision) {
  switch (precision) {
    case Precision::kFp16:
      return torch::kFloat16;
    case Precision::kBf16:
      return torch::kBFloat16;
    case Precision::kFp32:
    case Precision::kInt8:
      break;
  }
  return torch::kFloat32;
}

}  // namespace

Engine::Engine(std::unique_ptr<Impl> impl, std::shared_ptr<CudaEngine> cuda, int concurrent_runs,
               std::string device_name, Precision precision,
               const model::Checkpoint& checkpoint, std::string backend)
    : impl_(std::move(impl)),
      cuda_(std::move(cuda)),
      concurrent_runs_(concurrent_runs),
      device_name_(std::move(device_name)),
      precision_(precision),
      arch_(checkpoint.arch),
      backend_(std::move(backend)),
      geometry_(checkpoint.geometry()),
      embedding_dim_(checkpoint.embedding_dim()) {}

Engine::~Engine() = default;

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(const model::Checkpoint& checkpoint,
                                                       const EngineOptions& options) {
  absl::StatusOr<torch::Device> device = ResolveDevice(options.device);
  if (!device.ok()) return device.status();
  if (checkpoint.family == model::Family::kDlibResNet && options.precision != Precision::kFp32) {
    return absl::InvalidArgumentError(
        absl::StrCat("precision ", PrecisionName(options.precision), " is not supported by the ",
                     checkpoint.arch, " family (", checkpoint.ModelId(), "): it runs in fp32"));
  }
  if (options.precision == Precision::kFp16 && device->is_cpu()) {
    return absl::InvalidArgumentError(
        "precision fp16 is not supported on the CPU; use fp32, bf16 or int8");
  }
  if (options.precision == Precision::kInt8 && !device->is_cpu()) {
    return absl::InvalidArgumentError(
        "precision int8 runs on the CPU only; use fp16 or bf16 on CUDA");
  }
  const std::string backend = !options.cpu_backend.empty() ? options.cpu_backend
                              : BuiltWithOnednn()          ? "onednn"
                                                           : "torch";
  if (backend != "onednn" && backend != "torch") {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown CPU backend '", backend, "': expected onednn or torch"));
  }
  if (backend == "onednn" && !BuiltWithOnednn()) {
    return absl::FailedPreconditionError(
        "CPU backend onednn: this build has no oneDNN (ARCFACE_ONEDNN=OFF)");
  }
  if (backend == "torch" && options.precision == Precision::kInt8) {
    return absl::InvalidArgumentError("precision int8 needs the onednn CPU backend");
  }
  if (options.threads < 0) {
    return absl::InvalidArgumentError(absl::StrCat("threads must be >= 0, got ", options.threads));
  }
  if (options.warmup_batch_size < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("warm-up batch size must be >= 0, got ", options.warmup_batch_size));
  }
  if (options.max_batch_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("max batch size must be >= 1, got ", options.max_batch_size));
  }
  if (options.cuda_lanes < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("CUDA lanes must be >= 1, got ", options.cuda_lanes));
  }
  if (options.threads > 0) at::set_num_threads(options.threads);
  if (checkpoint.family == model::Family::kDlibResNet) {
    return CreateDlib(checkpoint, options);
  }

  auto impl = std::make_unique<Impl>();
  std::shared_ptr<CudaEngine> cuda;
#ifdef ARCFACE_WITH_ONEDNN
  if (device->is_cpu() && backend == "onednn") {
    OnednnNet::Options onednn;
    onednn.precision = options.precision;
    onednn.threads = options.threads;
    onednn.warmup_batch = options.warmup_batch_size;
    onednn.winograd = options.winograd;
    absl::StatusOr<std::unique_ptr<OnednnNet>> net = OnednnNet::Create(checkpoint, onednn);
    if (!net.ok()) return net.status();
    const char* name = (*net)->winograd() ? "onednn, winograd" : "onednn";
    impl->onednn = *std::move(net);
    return std::unique_ptr<Engine>(
        new Engine(std::move(impl), nullptr, 1, "cpu", options.precision, checkpoint, name));
  }
#endif
  impl->device = *device;
  impl->dtype = ScalarTypeOf(options.precision);
  impl->channels_last = options.channels_last;
  try {
    absl::StatusOr<model::IResNet> net = model::BuildIResNet(checkpoint);
    if (!net.ok()) return net.status();
    impl->net = *std::move(net);
    impl->net->FoldHead();
    if (impl->channels_last) impl->net->WeightsToChannelsLast();
    if (impl->device.is_cuda()) {
#ifdef ARCFACE_WITH_CUDA
      CudaEngineOptions cuda_options;
      cuda_options.device_index = impl->device.index();
      cuda_options.dtype = impl->dtype;
      cuda_options.channels_last = impl->channels_last;
      cuda_options.max_batch_size = options.max_batch_size;
      if (options.cuda_graphs) {
        cuda_options.graph_batch_sizes = DefaultGraphBatchSizes(options.max_batch_size);
      }
      cuda_options.lanes = options.cuda_lanes;
      cuda = CudaEngine::Create(std::move(impl->net), cuda_options);
#endif
    } else {
      impl->net->to(impl->device, impl->dtype);
      if (options.warmup_batch_size > 0) {
        std::vector<uint8_t> zeros(kCropBytes * options.warmup_batch_size, 0);
        impl->Forward(zeros.data(), options.warmup_batch_size);
      }
    }
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("could not place the model on ", device->str(), " in ",
                                            PrecisionName(options.precision), ": ",
                                            e.what_without_backtrace()));
  }
  const int concurrent_runs = cuda ? options.cuda_lanes : 1;
  return std::unique_ptr<Engine>(new Engine(std::move(impl), std::move(cuda), concurrent_runs,
                                            device->str(), options.precision, checkpoint,
                                            "libtorch"));
}

absl::StatusOr<std::unique_ptr<Engine>> Engine::CreateDlib(const model::Checkpoint& checkpoint,
                                                           const EngineOptions& options) {
  absl::StatusOr<torch::Device> resolved = ResolveDevice(options.device);
  if (!resolved.ok()) return resolved.status();
  const torch::Device device = *resolved;
  if (options.cpu_backend == "onednn") {
    return absl::InvalidArgumentError(absl::StrCat(
        "CPU backend onednn runs ArcFace IResNets only; the ", checkpoint.arch,
        " family runs on libtorch"));
  }
  auto impl = std::make_unique<Impl>();
  impl->device = device;
  impl->crop_size = checkpoint.geometry().size;
  try {
    absl::StatusOr<model::DlibResNet> net = model::BuildDlibResNet(checkpoint);
    if (!net.ok()) return net.status();
    impl->dlib = *std::move(net);
    impl->dlib->to(device);
    const int warmup = device.is_cuda() ? 1 : options.warmup_batch_size;
    if (warmup > 0) {
      std::vector<uint8_t> zeros(checkpoint.geometry().bytes() * warmup, 0);
      impl->Forward(zeros.data(), warmup);
    }
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("could not place the ", checkpoint.arch,
                                            " model on ", device.str(), ": ",
                                            e.what_without_backtrace()));
  }
  return std::unique_ptr<Engine>(new Engine(std::move(impl), nullptr, 1, device.str(),
                                            options.precision, checkpoint, "libtorch"));
}

absl::StatusOr<EmbeddingBatch> Engine::Run(absl::Span<const uint8_t> crops) {
  const size_t crop_bytes = geometry_.bytes();
  if (crops.empty() || crops.size() % crop_bytes != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "crop buffer of ", crops.size(), " bytes is not a positive multiple of ", crop_bytes, " (",
        geometry_.size, "x", geometry_.size, "x3)"));
  }
  const int64_t n = static_cast<int64_t>(crops.size() / crop_bytes);
  EmbeddingBatch batch;
  batch.size = static_cast<int>(n);
  try {
#ifdef ARCFACE_WITH_CUDA
    if (cuda_) {
      batch.values.resize(static_cast<size_t>(n) * kEmbeddingDim);
      batch.norms.resize(static_cast<size_t>(n));
      cuda_->Run(crops.data(), n, batch.values.data(), batch.norms.data());
      return batch;
    }
#endif
    torch::Tensor out;
    {
      absl::MutexLock lock(&mu_);
#ifdef ARCFACE_WITH_ONEDNN
      if (impl_->onednn) {
        batch.values.resize(static_cast<size_t>(n) * kEmbeddingDim);
        absl::Status s = impl_->onednn->Run(crops.data(), static_cast<int>(n), batch.values.data());
        if (!s.ok()) return s;
      }
#endif
      if (batch.values.empty()) out = impl_->Forward(crops.data(), n);
    }
    if (!out.defined()) {
      batch.norms.resize(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) {
        double sum = 0;
        for (int64_t k = 0; k < kEmbeddingDim; ++k) {
          const double v = batch.values[i * kEmbeddingDim + k];
          sum += v * v;
        }
        batch.norms[i] = static_cast<float>(std::sqrt(sum));
      }
      return batch;
    }
    batch.values.assign(out.data_ptr<float>(), out.data_ptr<float>() + n * embedding_dim_);
    torch::Tensor norms = out.norm(2, {1});
    batch.norms.assign(norms.data_ptr<float>(), norms.data_ptr<float>() + n);
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("forward pass on ", device_name_, " failed: ", e.what_without_backtrace()));
  }
  return batch;
}

DeviceMemory Engine::device_memory() const {
#ifdef ARCFACE_WITH_CUDA
  if (cuda_) return cuda_->Memory();
#endif
  return DeviceMemory();
}

}  // namespace arcface::engine
