// Checkpoint: the weights of an ArcFace IResNet, read from a file and validated.
//
// Contract
// - LoadCheckpoint reads a whole weights file (py-feat's safetensors, or InsightFace's ONNX
//   export: w600k_r50.onnx, glintr100.onnx), validates it completely and returns the tensors in
//   the fused-BN key layout of docs/MODEL.md (the safetensors names), all converted to float32.
//   Nothing is trusted before it is checked: a malformed, truncated, empty, wrong-architecture
//   or extra-key file gives an error status whose message names the file, the key (when there
//   is one) and what was wrong. It never aborts or throws.
// - The architecture (r50, r100, or any 4-stage IResNet) is read off the keys.
// - Blocking: reads the file on the calling thread. Thread-safe (no shared state).
// - Ownership: the returned Checkpoint owns its memory; nothing refers back to the file.
#ifndef ARCFACE_SERVER_MODEL_CHECKPOINT_H_
#define ARCFACE_SERVER_MODEL_CHECKPOINT_H_

#include <array>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "server/model/shapes.h"

namespace arcface::model {

// A dense row-major float32 tensor in host memory.
struct HostTensor {
  std::vector<int64_t> shape;
  std::vector<float> values;  // size == product of shape
};

struct Checkpoint {
  std::string arch;                  // "r50", "r100", or "r<N>" for other depths
  std::array<int, 4> blocks{};       // residual blocks per stage, e.g. {3, 4, 14, 3}
  std::map<std::string, HostTensor> tensors;  // fused-BN keys of docs/MODEL.md, prelu as [C]
  std::string sha256;                // hex SHA-256 of the file's bytes
  std::string format;                // "safetensors" or "onnx"
  std::string path;

  // "arcface-r50@" + the first 12 hex digits of sha256.
  std::string ModelId() const;
};

// Reads `path`, detecting the format from its contents (an ONNX ModelProto or safetensors).
absl::StatusOr<Checkpoint> LoadCheckpoint(const std::string& path);

// Reads the residual blocks per stage off checkpoint keys of the form `layer{1..4}.{i}.*`.
// Every stage must have a block 0 and its block indices must run 0..n-1 without a gap, else an
// error naming the stage. Keys of any other form are ignored here (the shape check reports
// them). Used by the loaders, and by tests on bare key sets.
absl::StatusOr<std::array<int, 4>> InferBlocks(const std::vector<std::string>& keys);

// The keys and shapes a fused-BN IResNet with `blocks` per stage must have (no
// num_batches_tracked). Used by the loaders to validate, and by tests to build checkpoints.
std::map<std::string, std::vector<int64_t>> ExpectedShapes(const std::array<int, 4>& blocks);

}  // namespace arcface::model

#endif  // ARCFACE_SERVER_MODEL_CHECKPOINT_H_
