#include "server/engine/cuda_engine.h"

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <map>
#include <mutex>
#include <utility>

#include <ATen/Context.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace arcface::engine {
namespace {

// One output row on the device: the embedding, then its L2 norm, so that one copy brings both.
constexpr int64_t kOutWidth = kEmbeddingDim + 1;

}  // namespace

std::vector<int> DefaultGraphBatchSizes(int max_batch_size) {
  std::vector<int> sizes;
  for (int b = 1; b < max_batch_size; b *= 2) sizes.push_back(b);
  sizes.push_back(max_batch_size);
  return sizes;
}

struct CudaEngine::State {
  // Everything one batch in flight needs; used by one Run() at a time.
  struct Lane {
    explicit Lane(c10::cuda::CUDAStream s) : stream(s) {}
    c10::cuda::CUDAStream stream;
    torch::Tensor host_in;   // pinned uint8 [max, 112, 112, 3]
    torch::Tensor host_out;  // pinned float [max, kOutWidth]
    torch::Tensor dev_in;    // device uint8 [max, 112, 112, 3]
    torch::Tensor dev_out;   // device float [max, kOutWidth]
    std::map<int64_t, std::unique_ptr<at::cuda::CUDAGraph>> graphs;  // by batch size
  };

  State(model::IResNet n, CudaEngineOptions o)
      : net(std::move(n)),
        options(std::move(o)),
        device(torch::kCUDA, static_cast<c10::DeviceIndex>(options.device_index)) {}

  // Rows [0, b) of lane.dev_in → rows [0, b) of lane.dev_out, on the current stream. This is
  // what a graph records: the uint8 → float conversion and the normalization run on the device,
  // in float32 exactly as on the CPU path, before the cast to the model's dtype.
  void Compute(Lane& lane, int64_t b) {
    torch::Tensor x = lane.dev_in.narrow(0, 0, b).permute({0, 3, 1, 2}).to(torch::kFloat32);
    x.sub_(127.5).div_(127.5);
    // The permuted NHWC buffer already is channels-last; NCHW needs one reorder.
    x = x.contiguous(options.channels_last ? at::MemoryFormat::ChannelsLast
                                           : at::MemoryFormat::Contiguous);
    if (options.dtype != torch::kFloat32) x = x.to(options.dtype);
    torch::Tensor embedding = net->forward(x).to(torch::kFloat32);
    torch::Tensor out = lane.dev_out.narrow(0, 0, b);
    out.narrow(1, 0, kEmbeddingDim).copy_(embedding);
    out.select(1, kEmbeddingDim).copy_(embedding.norm(2, {1}));
  }

  Lane* Acquire() {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [this] { return !free.empty(); });
    Lane* lane = free.back();
    free.pop_back();
    return lane;
  }

  void Release(Lane* lane) {
    {
      std::lock_guard<std::mutex> lock(mu);
      free.push_back(lane);
    }
    cv.notify_one();
  }

  // One piece of at most max_batch_size crops on `lane`.
  void RunPiece(Lane& lane, const uint8_t* crops, int64_t n, float* values, float* norms) {
    c10::cuda::CUDAStreamGuard stream_guard(lane.stream);
    // Host-side staging: this memcpy (and the copy below) overlap the other lanes' kernels.
    std::memcpy(lane.host_in.data_ptr<uint8_t>(), crops, static_cast<size_t>(n) * kCropBytes);
    lane.dev_in.narrow(0, 0, n).copy_(lane.host_in.narrow(0, 0, n), /*non_blocking=*/true);
    auto graph = lane.graphs.lower_bound(n);
    if (graph != lane.graphs.end()) {
      // Rows [n, padded) hold an earlier batch's crops; their outputs are never read.
      graph->second->replay();
    } else {
      Compute(lane, n);
    }
    lane.host_out.narrow(0, 0, n).copy_(lane.dev_out.narrow(0, 0, n), /*non_blocking=*/true);
    lane.stream.synchronize();
    const float* out = lane.host_out.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) {
      std::memcpy(values + i * kEmbeddingDim, out + i * kOutWidth, kEmbeddingDim * sizeof(float));
      norms[i] = out[i * kOutWidth + kEmbeddingDim];
    }
  }

  // Declared before `lanes` so that the graphs and buffers go before the weights.
  model::IResNet net;
  const CudaEngineOptions options;
  const torch::Device device;
  std::vector<std::unique_ptr<Lane>> lanes;
  std::mutex mu;
  std::condition_variable cv;
  std::vector<Lane*> free;  // guarded by mu
};

CudaEngine::CudaEngine(std::unique_ptr<State> state) : state_(std::move(state)) {}

CudaEngine::~CudaEngine() {
  // Nothing may still read a buffer or replay a graph when they are freed. A sticky CUDA error
  // here can only be reported, not handled.
  for (auto& lane : state_->lanes) C10_CUDA_CHECK_WARN(cudaStreamSynchronize(lane->stream.stream()));
}

std::shared_ptr<CudaEngine> CudaEngine::Create(model::IResNet net,
                                               const CudaEngineOptions& options) {
  TORCH_CHECK(options.max_batch_size >= 1, "max batch size must be >= 1, got ",
              options.max_batch_size);
  TORCH_CHECK(options.lanes >= 1, "CUDA lanes must be >= 1, got ", options.lanes);
  const std::vector<int>& sizes = options.graph_batch_sizes;
  for (size_t i = 0; i < sizes.size(); ++i) {
    TORCH_CHECK(sizes[i] >= 1 && sizes[i] <= options.max_batch_size &&
                    (i == 0 || sizes[i] > sizes[i - 1]),
                "CUDA graph batch sizes must be increasing and within 1..", options.max_batch_size);
  }
  auto state = std::make_unique<State>(std::move(net), options);
  const torch::Device device = state->device;
  c10::cuda::CUDAGuard device_guard(device);

  // Process-wide settings. cuDNN picks the fastest kernels per shape (measured once per shape
  // during the warm-up below). TF32 would round fp32 convolutions to a 10-bit mantissa: the fp32
  // engine must stay within cosine 0.99999 of the reference, so it stays off.
  at::globalContext().setBenchmarkCuDNN(true);
  at::globalContext().setAllowTF32CuDNN(false);
  at::globalContext().setAllowTF32CuBLAS(false);

  state->net->to(device, options.dtype);

  const int64_t max = options.max_batch_size;
  for (int i = 0; i < options.lanes; ++i) {
    auto lane = std::make_unique<State::Lane>(
        c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device.index()));
    // Allocated on the lane's stream: the caching allocator ties a block to its stream.
    c10::cuda::CUDAStreamGuard stream_guard(lane->stream);
    const auto pinned = torch::TensorOptions().pinned_memory(true);
    lane->host_in = torch::empty({max, kCropSize, kCropSize, 3}, pinned.dtype(torch::kUInt8));
    lane->host_out = torch::empty({max, kOutWidth}, pinned.dtype(torch::kFloat32));
    // Random pixels, not zeros, for the warm-up: the autotuner times kernels on this data.
    lane->dev_in = torch::empty({max, kCropSize, kCropSize, 3},
                                torch::TensorOptions().device(device).dtype(torch::kUInt8))
                       .random_(0, 256);
    lane->dev_out = torch::zeros({max, kOutWidth},
                                 torch::TensorOptions().device(device).dtype(torch::kFloat32));
    state->lanes.push_back(std::move(lane));
  }

  c10::InferenceMode inference;
  for (auto& lane : state->lanes) {
    c10::cuda::CUDAStreamGuard stream_guard(lane->stream);
    // The lane's graphs share one memory pool: they never run at the same time (one lane, one
    // stream), and capturing the largest first lets the smaller ones reuse its blocks.
    const auto pool = at::cuda::graph_pool_handle();
    for (auto size = sizes.rbegin(); size != sizes.rend(); ++size) {
      state->Compute(*lane, *size);  // eager: cuDNN autotunes this shape outside any capture
      lane->stream.synchronize();
      auto graph = std::make_unique<at::cuda::CUDAGraph>();
      graph->capture_begin(pool);
      state->Compute(*lane, *size);
      graph->capture_end();
      graph->replay();  // the first replay uploads the graph; keep it out of the first request
      lane->graphs.emplace(*size, std::move(graph));
    }
    if (sizes.empty()) state->Compute(*lane, max);  // autotune the eager path at one size
    lane->stream.synchronize();
    state->free.push_back(lane.get());
  }
  return std::shared_ptr<CudaEngine>(new CudaEngine(std::move(state)));
}

void CudaEngine::Run(const uint8_t* crops, int64_t n, float* values, float* norms) {
  State& s = *state_;
  State::Lane* lane = s.Acquire();
  // Released on every path, an exception included (the lane's stream is synchronized or the
  // device is in a sticky error state that fails every later call anyway).
  struct Releaser {
    State& s;
    State::Lane* lane;
    ~Releaser() { s.Release(lane); }
  } releaser{s, lane};
  c10::InferenceMode inference;
  const int64_t max = s.options.max_batch_size;
  for (int64_t start = 0; start < n; start += max) {
    const int64_t count = std::min(max, n - start);
    s.RunPiece(*lane, crops + start * kCropBytes, count, values + start * kEmbeddingDim,
               norms + start);
  }
}

DeviceMemory CudaEngine::Memory() const {
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(state_->device.index());
  // Index 0 is StatType::AGGREGATE (all pools) in every libtorch version; the enum itself moved
  // namespaces in 2.x.
  DeviceMemory memory;
  memory.allocated_bytes = stats.allocated_bytes[0].current;
  memory.reserved_bytes = stats.reserved_bytes[0].current;
  return memory;
}

}  // namespace arcface::engine
