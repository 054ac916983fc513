// Fuzz target: bytes → ParseOnnxModel → ExtractOnnxWeights, checked against their contract.
// (LoadCheckpoint adds nothing reachable here: an ONNX file it would accept holds fc.weight,
// 512 × 25088 floats, far beyond a fuzz input; fuzz_safetensors covers its validation.)
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "server/model/onnx_weights.h"
#include "server/model/onnx_weights.pb.h"

namespace {

void Fail(const std::string& what) {
  std::fprintf(stderr, "fuzz_onnx: %s\n", what.c_str());
  std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const absl::string_view bytes(reinterpret_cast<const char*>(data), size);
  auto model = arcface::model::ParseOnnxModel(bytes);
  if (!model.ok()) {
    if (model.status().code() != absl::StatusCode::kInvalidArgument) {
      Fail(model.status().ToString());
    }
    return -1;  // not a ModelProto with nodes: nothing of ours beyond protobuf ran
  }
  auto tensors = arcface::model::ExtractOnnxWeights(model->get());
  if (!tensors.ok()) {
    // onnx_weights.h: INVALID_ARGUMENT, the message starting with "ONNX: ".
    if (tensors.status().code() != absl::StatusCode::kInvalidArgument ||
        !absl::StartsWith(tensors.status().message(), "ONNX: ")) {
      Fail(tensors.status().ToString());
    }
    return 0;
  }
  for (const auto& [name, t] : *tensors) {
    uint64_t numel = 1;
    for (int64_t d : t.shape) numel *= static_cast<uint64_t>(d);
    if (numel != t.values.size()) Fail(absl::StrCat("'", name, "' has the wrong value count"));
  }
  return 0;
}
