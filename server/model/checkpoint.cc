#include "server/model/checkpoint.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <filesystem>
#include <set>
#include <system_error>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "common/files.h"
#include "server/model/dlib_weights.h"
#include "server/model/onnx_weights.h"
#include "server/model/onnx_weights.pb.h"
#include "server/model/safetensors.h"
#include "server/model/sha256.h"

namespace arcface::model {
namespace {

constexpr int64_t kStageWidths[4] = {64, 128, 256, 512};
constexpr int64_t kStemWidth = 64;
constexpr int64_t kFcInputs = 512 * 7 * 7;
// Block indices beyond this are not read as blocks (a 10^6-block IResNet does not exist), so
// that a hostile key cannot make the expected key set huge.
constexpr int kMaxBlocksPerStage = 10'000;
// An error lists this many problems; the rest are only counted.
constexpr size_t kMaxListedProblems = 12;

absl::Status WithPrefix(const absl::Status& status, absl::string_view prefix) {
  return absl::Status(status.code(), absl::StrCat(prefix, status.message()));
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ","), "]");
}

std::string ArchName(const std::array<int, 4>& blocks) {
  // Each block has two 3×3 convs; the stem conv and fc make the +2 (r50 = 2·24 + 2).
  return absl::StrCat("r", 2 * (blocks[0] + blocks[1] + blocks[2] + blocks[3]) + 2);
}

// Parses "layer<L>.<i>.<rest>" with L in 1..4 and i a canonical decimal (no sign, no leading
// zero), so that "layer1.01.x" is not mistaken for block 1 (it will be an unexpected key).
bool ParseBlockKey(absl::string_view key, int* stage, int* block) {
  constexpr absl::string_view kLayer = "layer";
  if (!absl::ConsumePrefix(&key, kLayer) || key.size() < 2 || key[0] < '1' || key[0] > '4' ||
      key[1] != '.') {
    return false;
  }
  *stage = key[0] - '1';
  key.remove_prefix(2);
  const size_t dot = key.find('.');
  if (dot == absl::string_view::npos || dot == 0 || dot + 1 == key.size()) return false;
  const absl::string_view index = key.substr(0, dot);
  if (index.size() > 1 && index[0] == '0') return false;
  for (char c : index) {
    if (!absl::ascii_isdigit(static_cast<unsigned char>(c))) return false;
  }
  return absl::SimpleAtoi(index, block) && *block < kMaxBlocksPerStage;
}

// Key layouts of known near misses, so that the error says what the file is.
std::string LayoutHint(const std::map<std::string, HostTensor>& tensors) {
  bool has_bn3 = false, has_prelu = false;
  for (const auto& [key, unused] : tensors) {
    has_bn3 = has_bn3 || absl::StrContains(key, ".bn3.");
    has_prelu = has_prelu || absl::StrContains(key, "prelu.");
  }
  // bn3 alone could be a torchvision Bottleneck; with PReLUs it is InsightFace's IBasicBlock.
  if (has_bn3 && has_prelu) {
    return "; the keys look like an unfused InsightFace IResNet (BatchNorm layers after the "
           "convolutions, as in InsightFace's training checkpoints): fold them into the "
           "convolutions first, or load InsightFace's ONNX export";
  }
  return "";
}

absl::Status CheckValues(const std::map<std::string, HostTensor>& tensors) {
  for (const auto& [key, t] : tensors) {
    const bool is_variance = absl::EndsWith(key, ".running_var");
    for (size_t i = 0; i < t.values.size(); ++i) {
      const float v = t.values[i];
      if (!std::isfinite(v)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "tensor '", key, "' holds a non-finite value (", std::isnan(v) ? "NaN" : "Inf",
            ") at flat index ", i));
      }
      if (is_variance && v < 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            "tensor '", key, "' holds a negative running variance (", v, ") at flat index ", i));
      }
    }
  }
  return absl::OkStatus();
}

// Checks that `tensors` is exactly the key set of docs/MODEL.md for the blocks its keys imply.
absl::StatusOr<std::array<int, 4>> ValidateTensors(
    const std::map<std::string, HostTensor>& tensors) {
  std::vector<std::string> keys;
  keys.reserve(tensors.size());
  for (const auto& [key, unused] : tensors) keys.push_back(key);
  absl::StatusOr<std::array<int, 4>> blocks = InferBlocks(keys);
  if (!blocks.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("not an ArcFace IResNet checkpoint: ",
                                                   blocks.status().message(),
                                                   LayoutHint(tensors)));
  }
  const std::map<std::string, std::vector<int64_t>> expected = ExpectedShapes(*blocks);
  std::vector<std::string> problems;
  size_t missing = 0, unexpected = 0, misshaped = 0;
  for (const auto& [key, shape] : expected) {
    const auto it = tensors.find(key);
    if (it == tensors.end()) {
      ++missing;
      problems.push_back(absl::StrCat("missing key '", key, "' ", ShapeString(shape)));
    } else if (it->second.shape != shape) {
      ++misshaped;
      problems.push_back(absl::StrCat("key '", key, "' has shape ",
                                      ShapeString(it->second.shape), ", expected ",
                                      ShapeString(shape)));
    }
  }
  for (const auto& [key, t] : tensors) {
    if (expected.count(key) == 0) {
      ++unexpected;
      problems.push_back(absl::StrCat("unexpected key '", key, "' ", ShapeString(t.shape)));
    }
  }
  if (!problems.empty()) {
    const size_t listed = std::min(problems.size(), kMaxListedProblems);
    std::string message = absl::StrCat(
        "does not match an IResNet ", ArchName(*blocks), " with blocks {",
        absl::StrJoin(*blocks, ","), "} (read off the layer keys): ", missing, " missing, ",
        unexpected, " unexpected, ", misshaped, " mis-shaped key(s): ",
        absl::StrJoin(problems.begin(), problems.begin() + listed, "; "));
    if (listed < problems.size()) {
      absl::StrAppend(&message, "; and ", problems.size() - listed, " more");
    }
    absl::StrAppend(&message, LayoutHint(tensors));
    return absl::InvalidArgumentError(message);
  }
  if (absl::Status s = CheckValues(tensors); !s.ok()) return s;
  return *blocks;
}

}  // namespace

std::string Checkpoint::ModelId() const {
  const absl::string_view family_prefix = family == Family::kArcFace ? "arcface-" : "";
  return absl::StrCat(family_prefix, arch, "@", sha256.substr(0, 12));
}

const CropGeometry& Checkpoint::geometry() const {
  return family == Family::kDlibResNet ? kDlibChip : kArcFaceCrop;
}

int Checkpoint::embedding_dim() const {
  return family == Family::kDlibResNet ? kDlibEmbeddingDim : kEmbeddingDim;
}

absl::StatusOr<std::array<int, 4>> InferBlocks(const std::vector<std::string>& keys) {
  std::array<std::set<int>, 4> seen;
  for (const std::string& key : keys) {
    int stage = 0, block = 0;
    if (ParseBlockKey(key, &stage, &block)) seen[stage].insert(block);
  }
  std::array<int, 4> blocks{};
  for (int stage = 0; stage < 4; ++stage) {
    const std::set<int>& indices = seen[stage];
    if (indices.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("no keys for stage 'layer", stage + 1,
                                                     "' (expected 'layer", stage + 1,
                                                     ".0.*')"));
    }
    int expect = 0;
    for (int index : indices) {
      if (index != expect) {
        return absl::InvalidArgumentError(absl::StrCat(
            "stage 'layer", stage + 1, "' has block ", index, " but no block 'layer", stage + 1,
            ".", expect, "' (blocks must be numbered from 0 without gaps)"));
      }
      ++expect;
    }
    blocks[stage] = static_cast<int>(indices.size());
  }
  return blocks;
}

std::map<std::string, std::vector<int64_t>> ExpectedShapes(const std::array<int, 4>& blocks) {
  std::map<std::string, std::vector<int64_t>> shapes;
  shapes["conv1.weight"] = {kStemWidth, 3, 3, 3};
  shapes["conv1.bias"] = {kStemWidth};
  shapes["prelu.weight"] = {kStemWidth};
  int64_t in_channels = kStemWidth;
  for (int stage = 0; stage < 4; ++stage) {
    const int64_t c = kStageWidths[stage];
    for (int block = 0; block < blocks[stage]; ++block) {
      const int64_t cin = block == 0 ? in_channels : c;
      const std::string p = absl::StrCat("layer", stage + 1, ".", block, ".");
      for (const char* stat : {"weight", "bias", "running_mean", "running_var"}) {
        shapes[absl::StrCat(p, "bn1.", stat)] = {cin};
      }
      shapes[p + "conv1.weight"] = {c, cin, 3, 3};
      shapes[p + "conv1.bias"] = {c};
      shapes[p + "prelu.weight"] = {c};
      shapes[p + "conv2.weight"] = {c, c, 3, 3};
      shapes[p + "conv2.bias"] = {c};
      if (block == 0) {
        shapes[p + "downsample.weight"] = {c, cin, 1, 1};
        shapes[p + "downsample.bias"] = {c};
      }
    }
    in_channels = c;
  }
  for (const char* stat : {"weight", "bias", "running_mean", "running_var"}) {
    shapes[absl::StrCat("bn2.", stat)] = {kStageWidths[3]};
    shapes[absl::StrCat("features.", stat)] = {kEmbeddingDim};
  }
  shapes["fc.weight"] = {kEmbeddingDim, kFcInputs};
  shapes["fc.bias"] = {kEmbeddingDim};
  return shapes;
}

absl::StatusOr<Checkpoint> LoadCheckpoint(const std::string& path) {
  const std::string prefix = absl::StrCat(path, ": ");
  std::error_code error;
  if (std::filesystem::is_directory(path, error)) {
    const std::filesystem::path manifest = std::filesystem::path(path) / kDlibManifestName;
    if (std::filesystem::exists(manifest, error)) return LoadDlibCheckpoint(manifest.string());
    return absl::InvalidArgumentError(absl::StrCat(
        prefix, "not a regular file (a directory), and no ", kDlibManifestName,
        " in it (a face-api models folder holds the dlib family's weights)"));
  }
  absl::StatusOr<std::string> bytes = common::ReadFile(path);  // its errors name the path
  if (!bytes.ok()) return bytes.status();
  if (bytes->empty()) return absl::InvalidArgumentError(prefix + "file is empty");
  // A TF.js manifest is a JSON array. Neither binary format begins so: safetensors is ruled out
  // first, and for protobuf '[' would open a group (wire type 3), which ONNX never uses.
  const size_t first = bytes->find_first_not_of(" \t\r\n");
  if (!LooksLikeSafetensors(*bytes) && first != std::string::npos && (*bytes)[first] == '[') {
    return LoadDlibCheckpoint(path);
  }

  Checkpoint checkpoint;
  checkpoint.path = path;
  absl::StatusOr<std::string> sha256 = Sha256Hex(*bytes);
  if (!sha256.ok()) return WithPrefix(sha256.status(), prefix);
  checkpoint.sha256 = *std::move(sha256);

  // Safetensors is sniffed by its '{' at byte 8; ONNX by parsing. Each is tried in turn so a
  // file is only called unrecognized when neither reader accepts it.
  absl::StatusOr<std::map<std::string, HostTensor>> tensors;
  if (LooksLikeSafetensors(*bytes)) {
    checkpoint.format = "safetensors";
    tensors = ParseSafetensors(*bytes);
    if (!tensors.ok()) {
      absl::StatusOr<std::unique_ptr<onnx::ModelProto>> model = ParseOnnxModel(*bytes);
      if (!model.ok()) return WithPrefix(tensors.status(), prefix);
      *bytes = std::string();
      checkpoint.format = "onnx";
      tensors = ExtractOnnxWeights(model->get());
    }
  } else {
    absl::StatusOr<std::unique_ptr<onnx::ModelProto>> model = ParseOnnxModel(*bytes);
    if (model.ok()) {
      *bytes = std::string();  // the parsed proto holds its own copy of the weights
      checkpoint.format = "onnx";
      tensors = ExtractOnnxWeights(model->get());
    } else {
      checkpoint.format = "safetensors";
      tensors = ParseSafetensors(*bytes);
      if (!tensors.ok()) {
        return absl::InvalidArgumentError(absl::StrCat(
            prefix, "not a safetensors or ONNX file (as safetensors: ",
            tensors.status().message(), "; as ONNX: ", model.status().message(), ")"));
      }
    }
  }
  if (!tensors.ok()) return WithPrefix(tensors.status(), prefix);
  *bytes = std::string();

  absl::StatusOr<std::array<int, 4>> blocks = ValidateTensors(*tensors);
  if (!blocks.ok()) {
    return WithPrefix(blocks.status(), absl::StrCat(prefix, checkpoint.format, ": "));
  }
  checkpoint.blocks = *blocks;
  checkpoint.arch = ArchName(*blocks);
  checkpoint.tensors = *std::move(tensors);
  return checkpoint;
}

}  // namespace arcface::model
