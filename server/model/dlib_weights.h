// The weights of dlib's ResNet face descriptor as npm's @vladmandic/face-api ships them
// (face_recognition_model: a TF.js manifest and one uint8-quantised shard), checked against the
// network of docs/MODEL.md ("The dlib family").
//
// Contract
// - LoadDlibCheckpoint reads the manifest and its shards with the strict TF.js reader
//   (tfjs_weights.h: dequantised to float32), then requires exactly the tensors of
//   DlibExpectedShapes(): each present, float32 (not int32), of exactly its shape, and nothing
//   else. Errors are INVALID_ARGUMENT (NOT_FOUND for a missing file) naming the manifest and the
//   tensor, with the expected shape; several missing or extra tensors are listed together.
// - The Checkpoint has family kDlibResNet, arch "dlib-resnet", format "tfjs", the tensors under
//   face-api's names in TF's layouts (convolution kernels HWIO, fc [256, 128]), and the SHA-256
//   of the manifest and its shards in manifest order.
// - Blocking: reads the files on the calling thread. Thread-safe (no shared state).
#ifndef ARCFACE_SERVER_MODEL_DLIB_WEIGHTS_H_
#define ARCFACE_SERVER_MODEL_DLIB_WEIGHTS_H_

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "server/model/checkpoint.h"

namespace arcface::model {

// The manifest's file name in a face-api models folder.
inline constexpr char kDlibManifestName[] = "face_recognition_model-weights_manifest.json";

// The network's residual blocks in order, after the stem "conv32_down" (7×7, 3 → 32, stride 2).
// Each block has two 3×3 convolutions "<block>/conv1" and "<block>/conv2"; `down` blocks halve the
// resolution. Every convolution comes with its per-channel scale (dlib's affine layer: batch
// normalisation folded): `<conv>/conv/filters` [k, k, in, out], `<conv>/conv/bias`,
// `<conv>/scale/weights` and `<conv>/scale/biases` [out].
struct DlibBlock {
  std::string name;
  int64_t in;
  int64_t out;
  bool down;
};
const std::vector<DlibBlock>& DlibBlocks();
inline constexpr int64_t kDlibStemWidth = 32;
inline constexpr int64_t kDlibFeatureWidth = 256;  // fc is [256, 128]

// Every tensor the manifest must hold, with its shape, in the manifest's order (117 tensors).
std::vector<std::pair<std::string, std::vector<int64_t>>> DlibExpectedShapes();

absl::StatusOr<Checkpoint> LoadDlibCheckpoint(const std::string& manifest_path);

}  // namespace arcface::model

#endif  // ARCFACE_SERVER_MODEL_DLIB_WEIGHTS_H_
