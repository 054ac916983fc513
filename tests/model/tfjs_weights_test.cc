// TfjsWeights on face-api's real files (shapes, dequantisation checked against the test's own
// reading of the shards, checksums) and on a table of malformed files written by the test; and
// the dlib family's check of face_recognition_model (LoadCheckpoint) on edited copies of it.
#include "server/model/tfjs_weights.h"

#include <stdlib.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "server/model/checkpoint.h"
#include "server/model/dlib_weights.h"

namespace arcface::model {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using ::testing::AllOf;
using ::testing::HasSubstr;

std::string ReadAll(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

void WriteAll(const fs::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out << bytes;
  ASSERT_TRUE(out.good()) << "cannot write " << path;
}

// ---- face-api's files ---------------------------------------------------------------------

const fs::path kModels = ARCFACE_DETECTOR_MODELS;

// The manifest of face-api's network `net`; fails the test (never skips) when it is missing.
fs::path RealManifest(const std::string& net) {
  const fs::path manifest = kModels / (net + "_model-weights_manifest.json");
  EXPECT_TRUE(fs::exists(manifest))
      << manifest << " is missing: run deploy/fetch-models.sh " << kModels.string()
      << " (or configure with -DARCFACE_DETECTOR_MODELS=<a folder holding face-api's files>)";
  return manifest;
}

struct RealNet {
  std::string net;
  size_t tensors;
  // Shapes the networks rely on.
  std::vector<std::pair<std::string, std::vector<int64_t>>> shapes;
  // sha256 of the manifest followed by the shard (`cat MANIFEST SHARD | sha256sum`).
  std::string sha256;
};

const RealNet kRealNets[] = {
    {"ssd_mobilenetv1",
     151,
     {{"MobilenetV1/Conv2d_0_pointwise/weights", {3, 3, 3, 32}},
      {"MobilenetV1/Conv2d_13_depthwise/depthwise_weights", {3, 3, 1024, 1}},
      {"MobilenetV1/Conv2d_13_pointwise/weights", {1, 1, 1024, 1024}},
      {"Prediction/BoxPredictor_0/ClassPredictor/weights", {1, 1, 512, 9}},
      {"Prediction/BoxPredictor_5/BoxEncodingPredictor/weights", {1, 1, 128, 24}},
      {"Output/extra_dim", {1, 5118, 4}}},
     "44030ca4ed905f54fea7a800a6df242907e5ab381e560130f1fde537663e5f6c"},
    {"tiny_face_detector",
     19,
     {{"conv0/filters", {3, 3, 3, 16}},
      {"conv1/depthwise_filter", {3, 3, 16, 1}},
      {"conv8/filters", {1, 1, 512, 25}},
      {"conv8/bias", {25}}},
     "b904a79965e543aa19afb143ed0d2cc4925b66a4e9428a8a4d774205a6c51cea"},
    {"face_landmark_68",
     49,
     {{"dense0/conv0/filters", {3, 3, 3, 32}},
      {"dense3/conv3/bias", {256}},
      {"fc/weights", {256, 136}},
      {"fc/bias", {136}}},
     "4c704c0213b9f181aa16901ff0ecb64893884a05065cb512aa4ef6b42348ca41"},
    {"face_recognition",
     117,
     {{"conv32_down/conv/filters", {7, 7, 3, 32}}, {"fc", {256, 128}}},
     "c2cf51e45a1f96cf2ba75d6b588dc259d7f602a813ff6efbeba4884d7359fad1"},
};

void PrintTo(const RealNet& real, std::ostream* os) { *os << real.net; }

class RealFiles : public ::testing::TestWithParam<RealNet> {};

TEST_P(RealFiles, ShapesAndChecksum) {
  const RealNet& real = GetParam();
  const fs::path manifest = RealManifest(real.net);
  ASSERT_TRUE(fs::exists(manifest));
  absl::StatusOr<TfjsWeights> w = TfjsWeights::Load(manifest.string());
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ(w->tensors().size(), real.tensors);
  for (const auto& [name, shape] : real.shapes) {
    absl::StatusOr<const TfjsTensor*> t = w->Get(name, shape);
    ASSERT_TRUE(t.ok()) << t.status();
    int64_t numel = 1;
    for (int64_t d : shape) numel *= d;
    EXPECT_EQ((*t)->values.size(), static_cast<size_t>(numel)) << name;
  }
  EXPECT_EQ(w->sha256(), real.sha256);
  EXPECT_EQ(w->source(), manifest.string());
}

// Every tensor's values against the test's own reading of the shard: offsets as the running
// sum of the sizes before it, q * scale + min in double rounded to float, raw float32 as is,
// quantised int32 rounded half up.
TEST_P(RealFiles, ValuesEqualTheShardDequantisedIndependently) {
  const fs::path manifest_path = RealManifest(GetParam().net);
  ASSERT_TRUE(fs::exists(manifest_path));
  absl::StatusOr<TfjsWeights> w = TfjsWeights::Load(manifest_path.string());
  ASSERT_TRUE(w.ok()) << w.status();

  const json manifest = json::parse(ReadAll(manifest_path));
  ASSERT_EQ(manifest.size(), 1u);
  ASSERT_EQ(manifest[0]["paths"].size(), 1u);
  const std::string shard =
      ReadAll(manifest_path.parent_path() / manifest[0]["paths"][0].get<std::string>());
  size_t offset = 0;
  size_t quantised = 0, raw = 0, ints = 0;
  for (const json& spec : manifest[0]["weights"]) {
    const std::string name = spec["name"];
    size_t numel = 1;
    for (const json& d : spec["shape"]) numel *= d.get<size_t>();
    const TfjsTensor& t = w->tensors().at(name);
    const bool is_int = spec["dtype"] == "int32";
    ASSERT_EQ(t.is_int, is_int) << name;
    ASSERT_EQ(is_int ? t.ints.size() : t.values.size(), numel) << name;
    if (spec.contains("quantization")) {
      ASSERT_EQ(spec["quantization"]["dtype"], "uint8") << name;
      const double scale = spec["quantization"]["scale"], min = spec["quantization"]["min"];
      for (size_t i = 0; i < numel; ++i) {
        const double q = static_cast<uint8_t>(shard[offset + i]);
        if (is_int) {
          ASSERT_EQ(t.ints[i], static_cast<int32_t>(std::floor(q * scale + min + 0.5)))
              << name << "[" << i << "]";
        } else {
          ASSERT_EQ(t.values[i], static_cast<float>(q * scale + min)) << name << "[" << i << "]";
        }
      }
      offset += numel;
      ++(is_int ? ints : quantised);
    } else {
      ASSERT_FALSE(is_int) << name;
      std::vector<float> expected(numel);
      std::memcpy(expected.data(), shard.data() + offset, numel * 4);
      ASSERT_EQ(t.values, expected) << name;
      offset += numel * 4;
      ++raw;
    }
  }
  EXPECT_EQ(offset, shard.size());
  EXPECT_GT(quantised, 0u);
  RecordProperty("quantised", static_cast<int>(quantised));
  RecordProperty("raw_float32", static_cast<int>(raw));
  RecordProperty("quantised_int32", static_cast<int>(ints));
}

INSTANTIATE_TEST_SUITE_P(FaceApi, RealFiles, ::testing::ValuesIn(kRealNets),
                         [](const auto& info) { return info.param.net; });

// The SSD's int32 constants (quantised uint8 with scale 1) decode to the anchor count and
// per-layer sizes, and a float Get of one says it is int32.
TEST(RealFiles, SsdInt32Constants) {
  const fs::path manifest = RealManifest("ssd_mobilenetv1");
  ASSERT_TRUE(fs::exists(manifest));
  absl::StatusOr<TfjsWeights> w = TfjsWeights::Load(manifest.string());
  ASSERT_TRUE(w.ok()) << w.status();
  const TfjsTensor& anchors = w->tensors().at("Postprocessor/stack/1");
  ASSERT_TRUE(anchors.is_int);
  EXPECT_TRUE(anchors.shape.empty());
  EXPECT_EQ(anchors.ints, std::vector<int32_t>{5118});
  EXPECT_EQ(w->tensors().at("Preprocessor/ResizeImage/size").ints,
            (std::vector<int32_t>{512, 512}));
  absl::StatusOr<const TfjsTensor*> as_float = w->Get("Postprocessor/stack/1", {});
  EXPECT_EQ(as_float.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(as_float.status().message(), HasSubstr("is int32"));
}

// ---- synthetic files ----------------------------------------------------------------------

// A fresh folder under the test's temporary directory.
fs::path TempDir() {
  std::string pattern = (fs::path(::testing::TempDir()) / "tfjs_weights_XXXXXX").string();
  const char* dir = mkdtemp(pattern.data());
  EXPECT_NE(dir, nullptr) << "mkdtemp " << pattern;
  return dir ? fs::path(dir) : fs::path();
}

std::string Bytes(const void* data, size_t n) {
  return std::string(static_cast<const char*>(data), n);
}

// A valid manifest of three tensors in one shard "w.bin" (36 bytes):
//   a  float32 [2, 3]            24 bytes
//   b  float32 [4], uint8 q      4 bytes, scale 0.5, min -1
//   c  int32 [2]                 8 bytes
json GoodManifest() {
  return json::array({{{"paths", {"w.bin"}},
                       {"weights",
                        {{{"name", "a"}, {"shape", {2, 3}}, {"dtype", "float32"}},
                         {{"name", "b"},
                          {"shape", {4}},
                          {"dtype", "float32"},
                          {"quantization", {{"dtype", "uint8"}, {"scale", 0.5}, {"min", -1}}}},
                         {{"name", "c"}, {"shape", {2}}, {"dtype", "int32"}}}}}});
}

const float kA[6] = {1.5f, -2.25f, 0.f, 3.f, -0.125f, 1e-3f};
const uint8_t kB[4] = {0, 1, 2, 255};
const int32_t kC[2] = {-7, 123456};

std::string GoodShard() { return Bytes(kA, sizeof kA) + Bytes(kB, sizeof kB) + Bytes(kC, sizeof kC); }

// Writes manifest.json and each named shard into a fresh folder; returns the manifest's path.
fs::path WriteModel(const std::string& manifest_text,
                    const std::vector<std::pair<std::string, std::string>>& shards) {
  const fs::path dir = TempDir();
  WriteAll(dir / "manifest.json", manifest_text);
  for (const auto& [name, bytes] : shards) WriteAll(dir / name, bytes);
  return dir / "manifest.json";
}

TEST(Synthetic, GoodFileDecodes) {
  const fs::path path = WriteModel(GoodManifest().dump(), {{"w.bin", GoodShard()}});
  absl::StatusOr<TfjsWeights> w = TfjsWeights::Load(path.string());
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ(w->tensors().size(), 3u);
  EXPECT_TRUE(w->Has("a"));
  EXPECT_FALSE(w->Has("d"));
  absl::StatusOr<const TfjsTensor*> a = w->Get("a", {2, 3});
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ((*a)->values, std::vector<float>(kA, kA + 6));
  EXPECT_EQ(w->tensors().at("b").values, (std::vector<float>{-1.f, -0.5f, 0.f, 126.5f}));
  EXPECT_EQ(w->tensors().at("c").ints, (std::vector<int32_t>{-7, 123456}));
  EXPECT_EQ(w->sha256().size(), 64u);
}

// A graph model ("weightsManifest"), two groups, a group of two shards with a tensor that
// spans both, uint16 and float16 quantisation, quantised int32 rounded half up as TF.js does.
TEST(Synthetic, GraphModelGroupsShardsAndQuantisations) {
  json groups = json::array(
      {{{"paths", {"g0-1.bin", "g0-2.bin"}},
        {"weights",
         {{{"name", "h"},
           {"shape", {5}},
           {"dtype", "float32"},
           {"quantization", {{"dtype", "float16"}}}},
          {{"name", "u"},
           {"shape", {2}},
           {"dtype", "float32"},
           {"quantization", {{"dtype", "uint16"}, {"scale", 0.25}, {"min", 10}}}}}}},
       {{"paths", {"g1.bin"}},
        {"weights",
         {{{"name", "r"},
           {"shape", {4}},
           {"dtype", "int32"},
           {"quantization", {{"dtype", "uint8"}, {"scale", 0.5}, {"min", -1.5}}}}}}}});
  const json model = {{"format", "graph-model"}, {"modelTopology", json::object()},
                      {"weightsManifest", groups}};
  // float16: 1, -2, 65504 (the largest half), 2^-24 (the smallest subnormal), -0.
  const uint16_t halves[5] = {0x3c00, 0xc000, 0x7bff, 0x0001, 0x8000};
  const uint16_t u16[2] = {0, 65535};
  std::string g0 = Bytes(halves, sizeof halves) + Bytes(u16, sizeof u16);
  const uint8_t r[4] = {0, 1, 2, 5};  // -1.5 -> -1, -1 -> -1, -0.5 -> 0, 1 -> 1
  const fs::path path = WriteModel(
      model.dump(), {{"g0-1.bin", g0.substr(0, 3)}, {"g0-2.bin", g0.substr(3)},
                     {"g1.bin", Bytes(r, sizeof r)}});
  absl::StatusOr<TfjsWeights> w = TfjsWeights::Load(path.string());
  ASSERT_TRUE(w.ok()) << w.status();
  const std::vector<float> h = w->tensors().at("h").values;
  EXPECT_EQ(h, (std::vector<float>{1.f, -2.f, 65504.f, std::ldexp(1.f, -24), 0.f}));
  EXPECT_TRUE(std::signbit(h[4]));
  EXPECT_EQ(w->tensors().at("u").values, (std::vector<float>{10.f, 10.f + 65535 * 0.25f}));
  EXPECT_EQ(w->tensors().at("r").ints, (std::vector<int32_t>{-1, -1, 0, 1}));
}

TEST(Synthetic, Sha256CoversManifestAndShards) {
  const fs::path one = WriteModel(GoodManifest().dump(), {{"w.bin", GoodShard()}});
  std::string changed = GoodShard();
  changed[0] ^= 1;  // still a finite float
  const fs::path two = WriteModel(GoodManifest().dump(), {{"w.bin", changed}});
  absl::StatusOr<TfjsWeights> a = TfjsWeights::Load(one.string());
  absl::StatusOr<TfjsWeights> b = TfjsWeights::Load(two.string());
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_NE(a->sha256(), b->sha256());
  // sha256 of "manifest then shard", as `cat manifest.json w.bin | sha256sum` prints it: the
  // same bytes through Parse give the same digest.
  absl::StatusOr<TfjsWeights> c = TfjsWeights::Parse(
      GoodManifest().dump(), [](const std::string&) -> absl::StatusOr<std::string> {
        return GoodShard();
      }, "mem");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->sha256(), a->sha256());
}

TEST(Synthetic, GetNamesTensorAndExpectedShape) {
  const fs::path path = WriteModel(GoodManifest().dump(), {{"w.bin", GoodShard()}});
  absl::StatusOr<TfjsWeights> w = TfjsWeights::Load(path.string());
  ASSERT_TRUE(w.ok()) << w.status();
  absl::StatusOr<const TfjsTensor*> wrong = w->Get("a", {3, 2});
  EXPECT_EQ(wrong.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(wrong.status().message(),
              AllOf(HasSubstr(path.string()), HasSubstr("'a'"), HasSubstr("shape [2, 3]"),
                    HasSubstr("expected [3, 2]")));
  absl::StatusOr<const TfjsTensor*> rank = w->Get("a", {6});
  EXPECT_EQ(rank.status().code(), absl::StatusCode::kInvalidArgument);
  absl::StatusOr<const TfjsTensor*> absent = w->Get("zz", {1});
  EXPECT_EQ(absent.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(absent.status().message(), AllOf(HasSubstr("no tensor 'zz'"), HasSubstr("[1]")));
}

TEST(Synthetic, MissingManifestIsNotFound) {
  const fs::path path = TempDir() / "absent-weights_manifest.json";
  absl::StatusOr<TfjsWeights> w = TfjsWeights::Load(path.string());
  EXPECT_EQ(w.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(w.status().message(), HasSubstr(path.string()));
}

// One malformed file: what to change in the good manifest (or its text) and shard, and what
// the error must say.
struct Malformed {
  std::string label;
  std::function<void(json&)> edit_manifest;  // null: unchanged
  std::string manifest_text;                 // non-empty: used as is instead
  std::function<void(std::string&)> edit_shard;
  bool write_shard = true;
  absl::StatusCode code = absl::StatusCode::kInvalidArgument;
  std::vector<std::string> says;
};

void PrintTo(const Malformed& c, std::ostream* os) { *os << c.label; }

json& W(json& m, int i) { return m[0]["weights"][i]; }

const std::vector<Malformed>& MalformedTable() {
  static const auto* table = new std::vector<Malformed>{
      {"truncated_shard", nullptr, "", [](std::string& s) { s.pop_back(); }, true,
       absl::StatusCode::kInvalidArgument,
       {"tensor 'c'", "w.bin", "truncated shard", "hold only 35 bytes"}},
      {"padded_shard", nullptr, "", [](std::string& s) { s += '\0'; }, true,
       absl::StatusCode::kInvalidArgument, {"w.bin", "padded shard", "1 more", "'c'"}},
      {"unknown_dtype", [](json& m) { W(m, 0)["dtype"] = "float64"; }, "", nullptr, true,
       absl::StatusCode::kInvalidArgument, {"tensor 'a'", "unknown dtype \"float64\""}},
      {"bool_dtype", [](json& m) { W(m, 2)["dtype"] = "bool"; }, "", nullptr, true,
       absl::StatusCode::kInvalidArgument, {"tensor 'c'", "unknown dtype \"bool\""}},
      {"unknown_quantisation_dtype",
       [](json& m) { W(m, 1)["quantization"]["dtype"] = "int4"; }, "", nullptr, true,
       absl::StatusCode::kInvalidArgument, {"tensor 'b'", "unknown quantisation dtype \"int4\""}},
      {"quantisation_without_scale", [](json& m) { W(m, 1)["quantization"].erase("scale"); },
       "", nullptr, true, absl::StatusCode::kInvalidArgument, {"tensor 'b'", "\"scale\""}},
      {"float16_int32", [](json& m) { W(m, 2)["quantization"] = {{"dtype", "float16"}}; }, "",
       nullptr, true, absl::StatusCode::kInvalidArgument,
       {"tensor 'c'", "float16 quantisation of an int32 tensor"}},
      {"missing_weights", [](json& m) { m[0].erase("weights"); }, "", nullptr, true,
       absl::StatusCode::kInvalidArgument, {"group 0 has no \"weights\""}},
      {"missing_paths", [](json& m) { m[0].erase("paths"); }, "", nullptr, true,
       absl::StatusCode::kInvalidArgument, {"group 0 has no \"paths\""}},
      {"missing_shape", [](json& m) { W(m, 1).erase("shape"); }, "", nullptr, true,
       absl::StatusCode::kInvalidArgument, {"tensor 'b'", "no \"shape\""}},
      {"missing_name", [](json& m) { W(m, 1).erase("name"); }, "", nullptr, true,
       absl::StatusCode::kInvalidArgument, {"group 0 weight 1", "no \"name\""}},
      {"negative_dim", [](json& m) { W(m, 0)["shape"] = {-2, -3}; }, "", nullptr, true,
       absl::StatusCode::kInvalidArgument, {"tensor 'a'", "negative size -2"}},
      {"fractional_dim", [](json& m) { W(m, 0)["shape"] = {2, 1.5}; }, "", nullptr, true,
       absl::StatusCode::kInvalidArgument, {"tensor 'a'", "non-integer size 1.5"}},
      {"overflowing_shape",
       [](json& m) { W(m, 0)["shape"] = {int64_t{1} << 40, int64_t{1} << 40, 0}; }, "",
       nullptr, true, absl::StatusCode::kInvalidArgument, {"tensor 'a'", "overflows"}},
      {"dim_beyond_int64", [](json& m) { W(m, 0)["shape"] = {UINT64_MAX}; }, "", nullptr,
       true, absl::StatusCode::kInvalidArgument, {"tensor 'a'", "overflows"}},
      {"duplicate_name", [](json& m) { W(m, 2)["name"] = "a"; }, "", nullptr, true,
       absl::StatusCode::kInvalidArgument, {"tensor 'a'", "appears twice"}},
      {"missing_shard", nullptr, "", nullptr, false, absl::StatusCode::kNotFound,
       {"w.bin", "no such file"}},
      {"shard_outside_folder", [](json& m) { m[0]["paths"] = {"../w.bin"}; }, "", nullptr,
       true, absl::StatusCode::kInvalidArgument, {"\"../w.bin\"", "inside the manifest's folder"}},
      {"non_json_manifest", nullptr, "[{\"paths\": [\"w.bin\"], \"weights\": [", nullptr, true,
       absl::StatusCode::kInvalidArgument, {"not JSON"}},
      {"number_beyond_double", nullptr,
       "[{\"paths\": [\"w.bin\"], \"weights\": [{\"name\": \"a\", \"shape\": [1e400]}]}]",
       nullptr, true, absl::StatusCode::kInvalidArgument, {"not JSON", "number overflow"}},
      {"object_without_weights_manifest", nullptr, "{\"modelTopology\": {}}", nullptr, true,
       absl::StatusCode::kInvalidArgument, {"without \"weightsManifest\""}},
      {"no_tensors", [](json& m) { m[0]["weights"] = json::array(); }, "",
       [](std::string& s) { s.clear(); }, true, absl::StatusCode::kInvalidArgument,
       {"names no tensors"}},
      {"nan_float32",
       nullptr, "",
       [](std::string& s) {
         const float nan = std::numeric_limits<float>::quiet_NaN();
         std::memcpy(s.data() + 2 * sizeof(float), &nan, sizeof nan);
       },
       true, absl::StatusCode::kInvalidArgument, {"tensor 'a'", "value 2 is NaN"}},
      {"infinite_float32",
       nullptr, "",
       [](std::string& s) {
         const float inf = -std::numeric_limits<float>::infinity();
         std::memcpy(s.data() + 5 * sizeof(float), &inf, sizeof inf);
       },
       true, absl::StatusCode::kInvalidArgument, {"tensor 'a'", "value 5 is infinite"}},
      {"dequantised_beyond_float",
       [](json& m) { W(m, 1)["quantization"]["scale"] = 1e300; }, "", nullptr, true,
       absl::StatusCode::kInvalidArgument, {"tensor 'b'", "value 1 is infinite"}},
      {"float16_nan",
       [](json& m) {
         W(m, 1)["quantization"] = {{"dtype", "float16"}};
         W(m, 1)["shape"] = {2};
       },
       "",
       [](std::string& s) {
         const uint16_t h[2] = {0x3c00, 0x7e00};  // 1, NaN
         s.replace(24, 4, Bytes(h, sizeof h));
       },
       true, absl::StatusCode::kInvalidArgument, {"tensor 'b'", "value 1 is NaN"}},
      {"int32_out_of_range", [](json& m) {
         W(m, 2)["quantization"] = {{"dtype", "uint8"}, {"scale", 1e10}, {"min", 0}};
         W(m, 2)["shape"] = {8};
       },
       "", [](std::string& s) { s[28] = 1; }, true, absl::StatusCode::kInvalidArgument,
       {"tensor 'c'", "out of int32's range"}},
  };
  return *table;
}

class MalformedFiles : public ::testing::TestWithParam<Malformed> {};

TEST_P(MalformedFiles, RejectedWithTheReason) {
  const Malformed& c = GetParam();
  json manifest = GoodManifest();
  if (c.edit_manifest) c.edit_manifest(manifest);
  std::string shard = GoodShard();
  if (c.edit_shard) c.edit_shard(shard);
  std::vector<std::pair<std::string, std::string>> shards;
  if (c.write_shard) shards.emplace_back("w.bin", shard);
  const fs::path path =
      WriteModel(c.manifest_text.empty() ? manifest.dump() : c.manifest_text, shards);

  absl::StatusOr<TfjsWeights> w = TfjsWeights::Load(path.string());
  ASSERT_FALSE(w.ok()) << "accepted";
  EXPECT_EQ(w.status().code(), c.code) << w.status();
  // Every message names the manifest first.
  EXPECT_THAT(std::string(w.status().message()), ::testing::StartsWith(path.string() + ": "));
  for (const std::string& s : c.says) {
    EXPECT_THAT(std::string(w.status().message()), HasSubstr(s));
  }
}

INSTANTIATE_TEST_SUITE_P(Table, MalformedFiles, ::testing::ValuesIn(MalformedTable()),
                         [](const auto& info) { return info.param.label; });


// ---- the dlib family's manifest (model::LoadCheckpoint → LoadDlibCheckpoint) ---------------
// face-api's real face_recognition_model, copied into a temporary folder with one thing changed;
// the reader or the family's check must refuse it naming the file and the tensor.

namespace dlib_family {

constexpr char kShard[] = "face_recognition_model.bin";

struct DlibCase {
  std::string label;
  // Edits the manifest (a list of one group) and the shard's bytes.
  std::function<void(json&, std::string&)> edit;
  std::vector<std::string> says;
};

void PrintTo(const DlibCase& c, std::ostream* os) { *os << c.label; }

json& Spec(json& m, const std::string& name) {
  for (json& spec : m[0]["weights"]) {
    if (spec["name"] == name) return spec;
  }
  ADD_FAILURE() << "no tensor " << name << " in the real manifest";
  return m[0]["weights"][0];
}

const std::vector<DlibCase>& DlibCases() {
  static const auto* cases = new std::vector<DlibCase>{
      {"truncated_shard", [](json&, std::string& s) { s.resize(s.size() - 1000); },
       {kShard, "truncated shard", "tensor 'fc'"}},
      {"padded_shard", [](json&, std::string& s) { s += std::string(4, '\0'); },
       {kShard, "padded shard"}},
      // Same element count, other shape: the reader accepts it, the family's check does not.
      {"wrong_shape",
       [](json& m, std::string&) {
         Spec(m, "conv64_1/conv1/conv/filters")["shape"] = {3, 3, 32, 128};
       },
       {"tensor 'conv64_1/conv1/conv/filters'", "has shape [3, 3, 32, 128]",
        "expected [3, 3, 64, 64]"}},
      {"int32_dtype", [](json& m, std::string&) { Spec(m, "fc")["dtype"] = "int32"; },
       {"tensor 'fc'", "is int32, expected float32"}},
      {"unknown_dtype", [](json& m, std::string&) { Spec(m, "fc")["dtype"] = "float64"; },
       {"tensor 'fc'", "unknown dtype"}},
      // fc is the last tensor: without its entry and its bytes the file is consistent.
      {"missing_entry",
       [](json& m, std::string& s) {
         m[0]["weights"].erase(m[0]["weights"].size() - 1);
         s.resize(s.size() - 256 * 128);
       },
       {"not dlib's ResNet face descriptor", "1 tensor(s) missing: fc [256, 128]"}},
      {"renamed_entry",
       [](json& m, std::string&) { Spec(m, "conv32_2/conv2/scale/biases")["name"] = "bias"; },
       {"missing: conv32_2/conv2/scale/biases [32]", "1 unexpected tensor(s): bias"}},
      {"extra_entry",
       [](json& m, std::string& s) {
         m[0]["weights"].push_back({{"name", "extra"}, {"shape", {4}}, {"dtype", "float32"}});
         s += std::string(16, '\0');
       },
       {"1 unexpected tensor(s): extra"}},
  };
  return *cases;
}

class DlibManifest : public ::testing::TestWithParam<DlibCase> {};

TEST_P(DlibManifest, RefusedNamingFileAndTensor) {
  const fs::path real = RealManifest("face_recognition");
  json manifest = json::parse(ReadAll(real));
  std::string shard = ReadAll(real.parent_path() / kShard);
  ASSERT_EQ(manifest[0]["paths"], json::array({kShard}));
  GetParam().edit(manifest, shard);
  const fs::path dir = TempDir();
  WriteAll(dir / model::kDlibManifestName, manifest.dump());
  WriteAll(dir / kShard, shard);
  // By the folder and by the manifest itself: the same refusal.
  for (const fs::path& path : {dir, dir / model::kDlibManifestName}) {
    absl::StatusOr<Checkpoint> checkpoint = LoadCheckpoint(path.string());
    ASSERT_FALSE(checkpoint.ok()) << path;
    EXPECT_EQ(checkpoint.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(checkpoint.status().message(), HasSubstr(model::kDlibManifestName));
    for (const std::string& s : GetParam().says) {
      EXPECT_THAT(checkpoint.status().message(), HasSubstr(s)) << path;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(All, DlibManifest, ::testing::ValuesIn(DlibCases()),
                         [](const auto& info) { return info.param.label; });

TEST(DlibFamily, RealFileLoadsAsTheDlibFamily) {
  const fs::path real = RealManifest("face_recognition");
  absl::StatusOr<Checkpoint> checkpoint = LoadCheckpoint(real.parent_path().string());
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  EXPECT_EQ(checkpoint->family, Family::kDlibResNet);
  EXPECT_EQ(checkpoint->path, real.string());
  EXPECT_EQ(checkpoint->tensors.size(), DlibExpectedShapes().size());
  EXPECT_EQ(checkpoint->tensors.at("fc").shape, (std::vector<int64_t>{256, 128}));
  // The TF.js reader's digest: the manifest followed by the shard.
  EXPECT_EQ(checkpoint->ModelId(), "dlib-resnet@" + checkpoint->sha256.substr(0, 12));
  EXPECT_EQ(checkpoint->sha256,
            "c2cf51e45a1f96cf2ba75d6b588dc259d7f602a813ff6efbeba4884d7359fad1");
}

TEST(DlibFamily, AnotherFaceApiNetworkIsNotTheDlibFamily) {
  absl::StatusOr<Checkpoint> checkpoint =
      LoadCheckpoint(RealManifest("face_landmark_68").string());
  ASSERT_FALSE(checkpoint.ok());
  EXPECT_THAT(checkpoint.status().message(),
              AllOf(HasSubstr("face_landmark_68_model-weights_manifest.json"),
                    HasSubstr("not dlib's ResNet face descriptor"),
                    HasSubstr("117 tensor(s) missing"), HasSubstr("unexpected tensor(s)")));
}

TEST(DlibFamily, FolderWithoutTheManifestNamesIt) {
  const fs::path dir = TempDir();
  absl::StatusOr<Checkpoint> checkpoint = LoadCheckpoint(dir.string());
  ASSERT_FALSE(checkpoint.ok());
  EXPECT_EQ(checkpoint.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(checkpoint.status().message(),
              AllOf(HasSubstr(dir.string()), HasSubstr("not a regular file"),
                    HasSubstr(model::kDlibManifestName)));
}

}  // namespace dlib_family

}  // namespace
}  // namespace arcface::model
