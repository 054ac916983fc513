#include "server/model/dlib_weights.h"

#include <algorithm>
#include <set>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "server/model/tfjs_weights.h"

namespace arcface::model {
namespace {

constexpr int64_t kEmbeddingOut = kDlibEmbeddingDim;
// An error lists this many names; the rest are only counted.
constexpr size_t kMaxListed = 12;

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

void AddConv(const std::string& name, int64_t kernel, int64_t in, int64_t out,
             std::vector<std::pair<std::string, std::vector<int64_t>>>* shapes) {
  shapes->push_back({name + "/conv/filters", {kernel, kernel, in, out}});
  shapes->push_back({name + "/conv/bias", {out}});
  shapes->push_back({name + "/scale/weights", {out}});
  shapes->push_back({name + "/scale/biases", {out}});
}

std::string Listed(const std::vector<std::string>& names) {
  std::vector<std::string> shown(names.begin(),
                                 names.begin() + std::min(names.size(), kMaxListed));
  std::string text = absl::StrJoin(shown, ", ");
  if (names.size() > kMaxListed) {
    absl::StrAppend(&text, " and ", names.size() - kMaxListed, " more");
  }
  return text;
}

}  // namespace

const std::vector<DlibBlock>& DlibBlocks() {
  static const std::vector<DlibBlock>* const blocks = new std::vector<DlibBlock>{
      {"conv32_1", 32, 32, false},        {"conv32_2", 32, 32, false},
      {"conv32_3", 32, 32, false},        {"conv64_down", 32, 64, true},
      {"conv64_1", 64, 64, false},        {"conv64_2", 64, 64, false},
      {"conv64_3", 64, 64, false},        {"conv128_down", 64, 128, true},
      {"conv128_1", 128, 128, false},     {"conv128_2", 128, 128, false},
      {"conv256_down", 128, 256, true},   {"conv256_1", 256, 256, false},
      {"conv256_2", 256, 256, false},     {"conv256_down_out", 256, 256, true}};
  return *blocks;
}

std::vector<std::pair<std::string, std::vector<int64_t>>> DlibExpectedShapes() {
  std::vector<std::pair<std::string, std::vector<int64_t>>> shapes;
  AddConv("conv32_down", 7, 3, kDlibStemWidth, &shapes);
  for (const DlibBlock& block : DlibBlocks()) {
    AddConv(block.name + "/conv1", 3, block.in, block.out, &shapes);
    AddConv(block.name + "/conv2", 3, block.out, block.out, &shapes);
  }
  shapes.push_back({"fc", {kDlibFeatureWidth, kEmbeddingOut}});
  return shapes;
}

absl::StatusOr<Checkpoint> LoadDlibCheckpoint(const std::string& manifest_path) {
  absl::StatusOr<TfjsWeights> weights = TfjsWeights::Load(manifest_path);
  if (!weights.ok()) return weights.status();
  const std::string prefix =
      absl::StrCat(manifest_path, ": not dlib's ResNet face descriptor (face-api's ",
                   "face_recognition_model): ");

  const std::vector<std::pair<std::string, std::vector<int64_t>>> expected = DlibExpectedShapes();
  std::set<std::string> expected_names;
  std::vector<std::string> missing;
  for (const auto& [name, shape] : expected) {
    expected_names.insert(name);
    if (!weights->Has(name)) missing.push_back(name + " " + ShapeString(shape));
  }
  std::vector<std::string> extra;
  for (const auto& [name, tensor] : weights->tensors()) {
    if (expected_names.count(name) == 0) extra.push_back(name);
  }
  if (!missing.empty() || !extra.empty()) {
    std::string message = prefix;
    if (!missing.empty()) {
      absl::StrAppend(&message, missing.size(), " tensor(s) missing: ", Listed(missing));
    }
    if (!extra.empty()) {
      absl::StrAppend(&message, missing.empty() ? "" : "; ", extra.size(),
                      " unexpected tensor(s): ", Listed(extra));
    }
    return absl::InvalidArgumentError(message);
  }

  Checkpoint checkpoint;
  checkpoint.family = Family::kDlibResNet;
  checkpoint.arch = "dlib-resnet";
  checkpoint.format = "tfjs";
  checkpoint.path = manifest_path;
  checkpoint.sha256 = weights->sha256();
  for (const auto& [name, shape] : expected) {
    // Get() refuses int32 and other shapes, naming the tensor and the expected shape.
    absl::StatusOr<const TfjsTensor*> tensor = weights->Get(name, shape);
    if (!tensor.ok()) return tensor.status();
    checkpoint.tensors[name] = HostTensor{shape, (*tensor)->values};
  }
  return checkpoint;
}

}  // namespace arcface::model
