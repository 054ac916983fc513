// OnednnNet: the CPU forward pass of an IResNet built directly on oneDNN (Debian's libdnnl 2.6,
// the library libtorch itself calls), without libtorch in between.
//
// Why: through libtorch every convolution is a separate oneDNN call on channels-last tensors,
// with the block's BatchNorm, PReLU and residual add as further passes over memory and a
// weights-format check on every call. Here the network is a fixed list of primitives created
// once per batch size: activations stay in the blocked layout oneDNN's kernels choose from
// layer to layer, PReLU and the residual sum run inside the convolutions as post-ops, the
// post-conv BatchNorms are folded into the weights, and the weights are reordered once.
// docs/PERFORMANCE.md has what this gave against libtorch and ONNX Runtime.
//
// Contract
// - Create() folds and copies the checkpoint's tensors (the checkpoint may die afterwards),
//   builds and runs the plan of `warmup_batch` (if > 0) and returns errors as statuses:
//   INVALID_ARGUMENT for a precision this CPU cannot run (bf16 needs AVX512-BF16, int8
//   AVX-512), INTERNAL for a oneDNN failure (its message included).
// - Run() takes n uint8 RGB crops (HWC, 112×112), normalizes them as (x − 127.5) / 127.5 and
//   writes n × 512 raw float embeddings; above max_chunk faces in chunks of max_chunk. The plan of
//   a chunk size is built on its first use (tens of milliseconds: oneDNN JIT-compiles its kernels)
//   and kept; the activation arenas are sized for the largest chunk seen so far.
// - Precisions: fp32; bf16 (bf16 weights and activations, f32 accumulation, the residual
//   stream and the head in f32); int8 (s8 weights per output channel, s8 convolution inputs
//   with per-channel ranges calibrated at load time on the 16 real face crops compiled into
//   the binary (int8_calibration/crops.h; about a second), the residual stream, the stem, the
//   shortcut convolutions and the head in f32).
// - Threads: oneDNN runs on OpenMP; Run() sets the calling thread's OpenMP team size to
//   `threads` when it is > 0.
// - Not thread-safe: one Run() at a time (Engine serializes them). Never throws: oneDNN's
//   exceptions are caught at this boundary and returned as INTERNAL.
#ifndef ARCFACE_SERVER_ENGINE_ONEDNN_NET_H_
#define ARCFACE_SERVER_ENGINE_ONEDNN_NET_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "server/engine/precision.h"
#include "server/model/checkpoint.h"

namespace arcface::engine {

class OnednnNet {
 public:
  struct Options {
    Precision precision = Precision::kFp32;
    int threads = 0;        // OpenMP threads for Run(); 0 leaves OpenMP's default
    int warmup_batch = 8;   // 0 skips the warm-up
    bool winograd = false;  // 3×3 stride-1 convolutions by Winograd F(4,3) where oneDNN has it
    // Larger batches run as chunks of exactly this many faces (the last one padded), so at most
    // max_chunk plans and arenas for max_chunk faces exist (each plan holds JIT code and, for
    // Winograd, weights transformed for its batch size). On 2 cores throughput is flat from 8
    // faces up.
    int max_chunk = 8;
  };

  // Whether the fp32 3×3 stride-1 convolutions run by Winograd (options.winograd, fp32 only).
  bool winograd() const;

  static absl::StatusOr<std::unique_ptr<OnednnNet>> Create(const model::Checkpoint& checkpoint,
                                                           const Options& options);
  ~OnednnNet();
  OnednnNet(const OnednnNet&) = delete;
  OnednnNet& operator=(const OnednnNet&) = delete;

  // `crops`: n × 112 × 112 × 3 bytes; `embeddings`: n × 512 floats.
  absl::Status Run(const uint8_t* crops, int n, float* embeddings);

 private:

  struct Impl;
  explicit OnednnNet(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Whether this CPU has what `precision` needs on oneDNN: bf16 needs AVX512-BF16, int8
// AVX512-BW (fast only with VNNI). Returns an empty string when supported,
// else the reason.
std::string CpuLacksFor(Precision precision);

}  // namespace arcface::engine

#endif  // ARCFACE_SERVER_ENGINE_ONEDNN_NET_H_
