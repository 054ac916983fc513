// EmbeddingModel: what the service needs of a model, so that the service can be tested with a
// fake and never includes torch. The production implementation wraps engine::Engine
// (server/app/engine_model.h).
//
// Contract
// - Run() receives n = crops.size() / kCropBytes crops (112×112×3 uint8 RGB, HWC, row-major),
//   n >= 1, and returns an EmbeddingBatch of size n: n × kEmbeddingDim raw (not normalized)
//   floats, row i for crop i, and the n L2 norms of those rows as the model computed them.
//   The service reports those norms (Embedding.norm) and divides by them to normalize; it
//   never computes them again.
// - Blocking: Run() blocks for the forward pass. The service calls it from the batcher's model
//   threads: with max_batches_in_flight == 1 from one at a time, so an implementation need not
//   be reentrant; with more, concurrently, and it must be (the engine is).
// - Errors: a non-OK status fails every request with crops in that batch (the model, not the
//   caller, failed: INTERNAL or UNAVAILABLE, never INVALID_ARGUMENT for valid crops).
#ifndef ARCFACE_SERVER_SERVICE_EMBEDDING_MODEL_H_
#define ARCFACE_SERVER_SERVICE_EMBEDDING_MODEL_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "server/engine/engine.h"

namespace arcface::service {

using engine::EmbeddingBatch;
using engine::kCropBytes;
using engine::kCropSize;
using engine::kEmbeddingDim;

class EmbeddingModel {
 public:
  virtual ~EmbeddingModel() = default;
  virtual absl::StatusOr<EmbeddingBatch> Run(absl::Span<const uint8_t> crops) = 0;
};

// What GetModelInfo, /metrics and the logs report about the served model.
struct ModelDescription {
  std::string arch;            // "r50", "r100"
  std::string model_id;        // "arcface-r50@<12 hex>"
  std::string weights_sha256;  // full hex
  std::string weights_path;    // empty for demo weights
  std::string device;          // "cpu", "cuda:0"
  std::string precision;       // "fp32", "fp16", "bf16"
  bool demo_weights = false;
  // Live device memory of the model (read per GetModelInfo call and per scrape); empty: zeros.
  std::function<engine::DeviceMemory()> device_memory;
};

}  // namespace arcface::service

#endif  // ARCFACE_SERVER_SERVICE_EMBEDDING_MODEL_H_
