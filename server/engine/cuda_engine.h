// CudaEngine: the GPU half of engine::Engine. The model lives on one CUDA device; each batch of
// uint8 crops travels through page-locked staging memory, is converted and normalized on the
// device, and runs through a CUDA graph captured at start-up for the next size up.
//
// Contract
// - Create() moves the (already folded, weights laid out as wanted) network to the device in the
//   requested dtype, turns on cuDNN autotuning (and off TF32, so fp32 stays fp32), and for every
//   lane and every graph size runs the batch eagerly (autotuning happens here, never inside a
//   capture), then captures it. It blocks for that warm-up (seconds) and throws c10::Error on
//   any CUDA or libtorch failure; Engine turns that into a status.
// - Lanes: each lane owns a CUDA stream, pinned input/output staging buffers, device buffers
//   and its own graphs. Run() takes a free lane, so up to `lanes` calls run at once: one call's
//   host copy into pinned memory and its host-to-device copy overlap another call's forward
//   pass. A call that finds every lane busy waits for one.
// - Run() pads a batch of n crops up to the smallest captured size >= n (the padding rows are
//   computed and discarded; rows never influence each other in eval mode); a batch larger than
//   max_batch_size runs in pieces of max_batch_size. Without graphs (or above the largest
//   graph) the lane runs the same code eagerly. It blocks until the lane's stream is done.
// - Thread safety: Run() and Memory() may be called from any thread at any time.
// - This header needs only libtorch's C++ API; the CUDA headers stay in cuda_engine.cc, which is
//   compiled into the engine only when libtorch has CUDA (ARCFACE_WITH_CUDA), and compiled
//   without being linked in CPU builds (arcface_engine_cuda_compile_check).
#ifndef ARCFACE_SERVER_ENGINE_CUDA_ENGINE_H_
#define ARCFACE_SERVER_ENGINE_CUDA_ENGINE_H_

#include <cstdint>
#include <memory>
#include <vector>

#include <torch/torch.h>

#include "server/engine/engine.h"
#include "server/model/iresnet.h"

namespace arcface::engine {

struct CudaEngineOptions {
  int device_index = 0;
  torch::ScalarType dtype = torch::kFloat32;
  bool channels_last = true;
  int max_batch_size = 512;
  std::vector<int> graph_batch_sizes;  // strictly increasing, last == max_batch_size; empty: eager
  int lanes = 2;
};

// The sizes graphs are captured for by default: powers of two below max_batch_size, and it.
std::vector<int> DefaultGraphBatchSizes(int max_batch_size);

class CudaEngine {
 public:
  static std::shared_ptr<CudaEngine> Create(model::IResNet net, const CudaEngineOptions& options);
  ~CudaEngine();
  CudaEngine(const CudaEngine&) = delete;
  CudaEngine& operator=(const CudaEngine&) = delete;

  // `crops`: n × kCropBytes (HWC RGB uint8); writes n × kEmbeddingDim floats to `values` and n
  // L2 norms to `norms`.
  void Run(const uint8_t* crops, int64_t n, float* values, float* norms);

  // The caching allocator's view of the engine's device (the whole process's use of it).
  DeviceMemory Memory() const;

 private:
  struct State;
  explicit CudaEngine(std::unique_ptr<State> state);
  std::unique_ptr<State> state_;
};

}  // namespace arcface::engine

#endif  // ARCFACE_SERVER_ENGINE_CUDA_ENGINE_H_
