// EmbeddingModel: what the service needs of a model, so that the service can be tested with a
// fake and never includes torch. The production implementation wraps engine::Engine
// (server/app/engine_model.h).
//
// Contract
// - Shapes: geometry() is the crop the model consumes (geometry().size² × 3 uint8 RGB, HWC,
//   row-major; ArcFace's 112×112, dlib's 150×150) and where alignment puts the five landmarks;
//   embedding_dim() the length of its rows (512, 128). Both are fixed for the model's life.
// - Run() receives n = crops.size() / geometry().bytes() crops, n >= 1, and returns an
//   EmbeddingBatch of size n: n × embedding_dim() raw (not normalized) floats, row i for crop i,
//   and the n L2 norms of those rows as the model computed them.
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
#include "server/model/shapes.h"

namespace arcface::service {

using engine::EmbeddingBatch;

class EmbeddingModel {
 public:
  virtual ~EmbeddingModel() = default;
  virtual const model::CropGeometry& geometry() const = 0;
  virtual int embedding_dim() const = 0;
  virtual absl::StatusOr<EmbeddingBatch> Run(absl::Span<const uint8_t> crops) = 0;
};

// What GetModelInfo, ListModels, /metrics and the logs report about a served model.
// dlib's verification rule is a Euclidean distance under 0.6 between its raw descriptors, which
// are not unit vectors: their norms are 1.36-1.53 (mean 1.45 over dlib's johns, docs/MODEL.md).
// Between two descriptors of norm r, distance d is the cosine 1 - d²/(2r²): at r = 1.45,
// 1 - 0.36/4.205 = 0.9144. (At r = 1, as for unit vectors, it would be 0.82, which accepts
// different people: 0.71 accuracy on johns against 1.0.)
inline constexpr float kDlibCosineThreshold = 0.9144f;

struct ModelDescription {
  std::string name;                // as requests name it (--model NAME=PATH), "arcface"
  std::string family = "arcface";  // "arcface", "dlib"
  std::string metric = "cosine";   // the family's own: "cosine", "euclidean"
  // The family's verification threshold as a cosine of unit vectors (what Compare and Identify
  // answer): ArcFace 0.4; dlib kDlibCosineThreshold.
  float default_threshold = 0.4f;
  std::string arch;            // "r50", "r100"
  std::string model_id;        // "arcface-r50@<12 hex>"
  std::string weights_sha256;  // full hex
  std::string weights_path;    // empty for demo weights
  std::string device;          // "cpu", "cuda:0"
  std::string precision;       // "fp32", "fp16", "bf16"
  std::string backend;         // the engine's, for the log: "onednn, winograd", "cuda graphs"
  bool demo_weights = false;
  // Live device memory of the model (read per GetModelInfo call and per scrape); empty: zeros.
  std::function<engine::DeviceMemory()> device_memory;
};

}  // namespace arcface::service

#endif  // ARCFACE_SERVER_SERVICE_EMBEDDING_MODEL_H_
