// Engine: one model family's network resident on one device, turning batches of uint8 RGB crops
// into raw embeddings: an ArcFace IResNet (112×112 crops → 512 values) or dlib's ResNet face
// descriptor (150×150 chips → 128 values). geometry() and embedding_dim() say which.
//
// Contract
// - Create() validates the options (device, precision, threads, CPU backend) against the
//   checkpoint's family, builds the network from the checkpoint, places it on the device in the
//   requested precision and warms it up. Errors name the option and the reason (e.g. "cuda" on
//   a CPU-only build, fp16 on the CPU, int8 on CUDA, anything but fp32 for dlib-resnet).
// - ArcFace: on the CPU the network runs on oneDNN directly (OnednnNet, onednn_net.h: fp32, bf16,
//   int8) unless cpu_backend is "torch" or the build has no oneDNN; on CUDA, and for "torch", it
//   is libtorch's module (server/model/iresnet.h) under InferenceMode.
//   dlib-resnet: libtorch's module (server/model/dlib_resnet.h) under InferenceMode on either
//   device, fp32 only, without CUDA graphs; cpu_backend "onednn" is refused.
// - Run() takes n × geometry().bytes() bytes (n crops, HWC RGB), normalizes them as the family
//   does (ArcFace: (x - 127.5) / 127.5, the numbers of py-feat's x/255*2-1; dlib: (x - mean) / 256
//   per channel, dlib's input layer; on CUDA after one copy to the device), runs the network and
//   returns n × embedding_dim() float32 values (raw, not normalized) and their L2 norms.
// - Blocking: Run() blocks for the forward pass. It is safe to call from any thread; on the CPU
//   calls are serialized by an internal mutex (see CUDA below for the GPU).
// - Errors: torch and oneDNN exceptions are caught and returned as INTERNAL (a device or runtime
//   failure, never a caller's mistake); a batch of 0 or a wrong buffer size is INVALID_ARGUMENT.
// - Threads: options.threads > 0 sets libtorch's process-wide intra-op count and the OpenMP team
//   of the thread calling Run() on oneDNN; 0 keeps OpenMP's default (every core).
// - CUDA (only when built against a CUDA libtorch; else "cuda" is refused with "built without
//   CUDA"): for ArcFace the work is done by CudaEngine (cuda_engine.h): pinned staging buffers,
//   device-side normalization, cuDNN autotuning, CUDA graphs captured in Create() for powers of
//   two up to max_batch_size (a batch is padded up to the next), and `cuda_lanes` batches in
//   flight, so Run() is NOT serialized on CUDA: up to cuda_lanes callers run at once, more wait
//   for a lane. Create() then blocks for the warm-up and the captures (seconds). dlib-resnet's
//   module runs eagerly on the device, serialized like the CPU path (concurrent_runs() 1).
#ifndef ARCFACE_SERVER_ENGINE_ENGINE_H_
#define ARCFACE_SERVER_ENGINE_ENGINE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "server/engine/onednn_net.h"
#include "server/engine/precision.h"
#include "server/model/checkpoint.h"

namespace arcface::engine {

// Whether this binary's CPU path can run on oneDNN directly (ARCFACE_ONEDNN).
bool BuiltWithOnednn();

// Whether this binary has the CUDA path compiled in (ARCFACE_WITH_CUDA) and its libtorch has CUDA.
bool BuiltWithCuda();

struct EngineOptions {
  std::string device = "cpu";     // "cpu", "cuda", "cuda:N", or "auto" (cuda if present)
  Precision precision = Precision::kFp32;
  int threads = 0;                // intra-op threads; 0 keeps libtorch's default
  int warmup_batch_size = 8;      // CPU: 0 skips warm-up; CUDA warms every graph size anyway
  bool channels_last = true;      // memory format of activations (faster on oneDNN and cuDNN)
  // CPU only: "onednn" (the network on oneDNN directly, OnednnNet), "torch" (libtorch's module,
  // as the CUDA path runs it; for comparison), or "" for onednn where the build has it
  // (ARCFACE_ONEDNN, default ON), else torch.
  std::string cpu_backend;
  bool winograd = true;          // onednn: Winograd 3×3 convolutions (see OnednnNet)
  // CUDA only (validated everywhere, ignored by the CPU):
  int max_batch_size = 512;       // the largest captured graph; larger batches run in pieces
  bool cuda_graphs = true;        // false: run eagerly (for comparison; graphs are faster)
  int cuda_lanes = 2;             // batches in flight at once (a stream and staging buffers each)
};

// The caching allocator's view of the model's CUDA device; zeros on the CPU.
struct DeviceMemory {
  int64_t allocated_bytes = 0;  // held by live tensors (weights, staging and output buffers)
  int64_t reserved_bytes = 0;   // taken from the driver (>= allocated; holds the graphs' pools)
};

struct EmbeddingBatch {
  int size = 0;
  std::vector<float> values;  // size × the engine's embedding_dim(), row-major, raw embeddings
  std::vector<float> norms;   // size, L2 norm of each raw row
};

using model::kCropBytes;
using model::kCropSize;
using model::kEmbeddingDim;

class CudaEngine;

class Engine {
 public:
  static absl::StatusOr<std::unique_ptr<Engine>> Create(const model::Checkpoint& checkpoint,
                                                        const EngineOptions& options);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // `crops` holds n = crops.size() / geometry().bytes() crops, each size×size×3 RGB HWC.
  absl::StatusOr<EmbeddingBatch> Run(absl::Span<const uint8_t> crops);

  // The crop the network takes (model::kArcFaceCrop, model::kDlibChip) and the length of its
  // embeddings (512, 128): the checkpoint's family's.
  const model::CropGeometry& geometry() const { return geometry_; }
  int embedding_dim() const { return embedding_dim_; }

  const std::string& device() const { return device_name_; }
  Precision precision() const { return precision_; }
  const std::string& arch() const { return arch_; }
  // What runs the network: "onednn, winograd", "onednn" or "libtorch" (on CUDA always libtorch).
  const std::string& backend() const { return backend_; }
  // How many Run() calls make progress at once: the CUDA lanes, 1 on the CPU (where Run() is
  // serialized). More concurrent callers than this only wait.
  int concurrent_runs() const { return concurrent_runs_; }
  // Current device memory use; thread-safe, cheap (reads the allocator's counters).
  DeviceMemory device_memory() const;

 private:
  struct Impl;
  // Create()'s path for the dlib family, once the options common to both are checked.
  static absl::StatusOr<std::unique_ptr<Engine>> CreateDlib(const model::Checkpoint& checkpoint,
                                                            const EngineOptions& options);
  Engine(std::unique_ptr<Impl> impl, std::shared_ptr<CudaEngine> cuda, int concurrent_runs,
         std::string device_name, Precision precision, const model::Checkpoint& checkpoint,
         std::string backend);

  absl::Mutex mu_;
  std::unique_ptr<Impl> impl_ ABSL_GUARDED_BY(mu_);  // the CPU path
  // The CUDA path (thread-safe itself, so not behind mu_); null on the CPU. A shared_ptr, whose
  // deleter is bound where it is made, so that CPU builds never reference CudaEngine's code.
  const std::shared_ptr<CudaEngine> cuda_;
  const int concurrent_runs_;
  const std::string device_name_;
  const Precision precision_;
  const std::string arch_;
  const std::string backend_;
  const model::CropGeometry geometry_;
  const int embedding_dim_;
};

}  // namespace arcface::engine

#endif  // ARCFACE_SERVER_ENGINE_ENGINE_H_
