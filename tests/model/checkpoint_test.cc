// LoadCheckpoint on safetensors files, the key/shape validation shared by both formats, and
// SHA-256. Every malformed case asserts an error status AND that the message names the key or
// the reason, so a regression that fails for the wrong reason is caught too.
#include "server/model/checkpoint.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "server/model/safetensors.h"
#include "server/model/sha256.h"
#include "tests/model/test_checkpoints.h"

namespace arcface::model {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;
using test_util::EncodeRaw;
using test_util::EncodeSafetensors;
using test_util::MakeTensors;
using test_util::RawEntry;
using test_util::TempPath;
using test_util::ToEntries;
using test_util::Values;
using test_util::WriteFile;

// The smallest IResNet the loader accepts: real channel counts, one block per stage ("r10").
constexpr std::array<int, 4> kSmall = {1, 1, 1, 1};
constexpr std::array<int, 4> kR50 = {3, 4, 14, 3};
constexpr std::array<int, 4> kR100 = {3, 13, 30, 3};

// Built once: the fc alone is 12.8 M values.
const std::map<std::string, HostTensor>& SmallExact16() {
  static const auto* tensors = new std::map<std::string, HostTensor>(
      MakeTensors(kSmall, Values::kExact16));
  return *tensors;
}

struct Loaded {
  std::string path;
  absl::StatusOr<Checkpoint> checkpoint;
};

Loaded LoadBytes(const std::string& bytes, const std::string& name = "model.safetensors") {
  Loaded out{TempPath(name), absl::UnknownError("not loaded")};
  WriteFile(out.path, bytes);
  out.checkpoint = LoadCheckpoint(out.path);
  std::filesystem::remove(out.path);
  return out;
}

// Loads `bytes`, expects failure, returns the message (which must start with the path).
std::string LoadError(const std::string& bytes) {
  Loaded loaded = LoadBytes(bytes);
  EXPECT_FALSE(loaded.checkpoint.ok()) << "unexpectedly loaded";
  if (loaded.checkpoint.ok()) return "";
  EXPECT_EQ(loaded.checkpoint.status().code(), absl::StatusCode::kInvalidArgument);
  const std::string message(loaded.checkpoint.status().message());
  EXPECT_THAT(message, StartsWith(loaded.path + ": "));
  return message;
}

// The small net in F16, with the entries passed through `edit` first.
template <typename Edit>
std::string SmallFileWith(Edit edit) {
  std::vector<RawEntry> entries = ToEntries(SmallExact16(), "F16");
  edit(entries);
  return EncodeSafetensors(entries);
}

RawEntry F32Entry(const std::string& name, std::vector<int64_t> shape,
                  const std::vector<float>& values) {
  return {name, "F32", std::move(shape),
          std::string(reinterpret_cast<const char*>(values.data()), values.size() * 4)};
}

RawEntry* Find(std::vector<RawEntry>& entries, const std::string& name) {
  for (RawEntry& e : entries) {
    if (e.name == name) return &e;
  }
  ADD_FAILURE() << "no entry " << name;
  return &entries.front();
}

void ExpectSameTensors(const std::map<std::string, HostTensor>& actual,
                       const std::map<std::string, HostTensor>& expected) {
  ASSERT_EQ(actual.size(), expected.size());
  for (const auto& [key, t] : expected) {
    const auto it = actual.find(key);
    ASSERT_NE(it, actual.end()) << key;
    EXPECT_EQ(it->second.shape, t.shape) << key;
    // Bitwise: conversion must be exact, not merely close.
    ASSERT_EQ(it->second.values.size(), t.values.size()) << key;
    EXPECT_EQ(std::memcmp(it->second.values.data(), t.values.data(), t.values.size() * 4), 0)
        << key;
  }
}

// ---------------------------------------------------------------- valid files

TEST(SafetensorsLoad, F32ValuesRoundTripExactly) {
  const auto tensors = MakeTensors(kSmall, Values::kAnyFloat);
  const std::string bytes = EncodeSafetensors(ToEntries(tensors, "F32"), {{"format", "pt"}});
  Loaded loaded = LoadBytes(bytes);
  ASSERT_TRUE(loaded.checkpoint.ok()) << loaded.checkpoint.status();
  const Checkpoint& c = *loaded.checkpoint;
  EXPECT_EQ(c.arch, "r10");
  EXPECT_EQ(c.blocks, kSmall);
  EXPECT_EQ(c.format, "safetensors");
  EXPECT_EQ(c.path, loaded.path);
  EXPECT_EQ(c.tensors.size(), ExpectedShapes(kSmall).size());
  ExpectSameTensors(c.tensors, tensors);
  EXPECT_EQ(c.sha256, *Sha256Hex(bytes));
  EXPECT_EQ(c.ModelId(), "arcface-r10@" + c.sha256.substr(0, 12));
}

TEST(SafetensorsLoad, F16ConvertsExactly) {
  Loaded loaded = LoadBytes(EncodeSafetensors(ToEntries(SmallExact16(), "F16")));
  ASSERT_TRUE(loaded.checkpoint.ok()) << loaded.checkpoint.status();
  ExpectSameTensors(loaded.checkpoint->tensors, SmallExact16());
}

TEST(SafetensorsLoad, BF16ConvertsExactly) {
  Loaded loaded = LoadBytes(EncodeSafetensors(ToEntries(SmallExact16(), "BF16")));
  ASSERT_TRUE(loaded.checkpoint.ok()) << loaded.checkpoint.status();
  ExpectSameTensors(loaded.checkpoint->tensors, SmallExact16());
}

TEST(SafetensorsLoad, IgnoresNumBatchesTracked) {
  const std::string bytes = SmallFileWith([](std::vector<RawEntry>& entries) {
    const int64_t count = 12345;
    const std::string data(reinterpret_cast<const char*>(&count), 8);
    entries.push_back({"layer1.0.bn1.num_batches_tracked", "I64", {}, data});
    entries.push_back({"bn2.num_batches_tracked", "I64", {}, data});
    entries.push_back({"features.num_batches_tracked", "I64", {1}, data});
  });
  Loaded loaded = LoadBytes(bytes);
  ASSERT_TRUE(loaded.checkpoint.ok()) << loaded.checkpoint.status();
  EXPECT_EQ(loaded.checkpoint->tensors.count("bn2.num_batches_tracked"), 0u);
  ExpectSameTensors(loaded.checkpoint->tensors, SmallExact16());
}

TEST(SafetensorsLoad, R50LayoutIsInferredAndLoadsQuickly) {
  // The real r50's size (≈174 MB, float32), zero-filled.
  std::string bytes;
  {
    const auto tensors = MakeTensors(kR50, Values::kZero);
    ASSERT_EQ(tensors.size(), 237u);  // docs/MODEL.md
    bytes = EncodeSafetensors(ToEntries(tensors, "F32"));
  }
  const std::string path = TempPath("r50.safetensors");
  WriteFile(path, bytes);
  bytes.clear();
  bytes.shrink_to_fit();
  const auto start = std::chrono::steady_clock::now();
  absl::StatusOr<Checkpoint> c = LoadCheckpoint(path);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::filesystem::remove(path);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->arch, "r50");
  EXPECT_EQ(c->blocks, kR50);
  EXPECT_EQ(c->tensors.size(), 237u);
  EXPECT_EQ(c->tensors.at("fc.weight").shape, (std::vector<int64_t>{512, 25088}));
  EXPECT_THAT(c->ModelId(), StartsWith("arcface-r50@"));
  // A loose bound (shared CI machines); the point is "not minutes".
  EXPECT_LT(seconds, 10.0);
  std::printf("r50 (174 MB) loaded in %.3f s\n", seconds);
}

// ---------------------------------------------------------------- blocks and expected keys

TEST(CheckpointKeys, InferBlocksFromKeySets) {
  auto keys_of = [](const std::array<int, 4>& blocks) {
    std::vector<std::string> keys;
    for (const auto& [key, shape] : ExpectedShapes(blocks)) keys.push_back(key);
    return keys;
  };
  EXPECT_EQ(*InferBlocks(keys_of(kR50)), kR50);
  EXPECT_EQ(*InferBlocks(keys_of(kR100)), kR100);
  EXPECT_EQ(*InferBlocks(keys_of(kSmall)), kSmall);
  EXPECT_EQ(*InferBlocks(keys_of({2, 5, 1, 7})), (std::array<int, 4>{2, 5, 1, 7}));

  absl::StatusOr<std::array<int, 4>> gap =
      InferBlocks({"layer1.0.a", "layer1.2.a", "layer2.0.a", "layer3.0.a", "layer4.0.a"});
  ASSERT_FALSE(gap.ok());
  EXPECT_THAT(gap.status().message(), HasSubstr("layer1.1"));

  absl::StatusOr<std::array<int, 4>> no_stage =
      InferBlocks({"layer1.0.a", "layer2.0.a", "layer4.0.a"});
  ASSERT_FALSE(no_stage.ok());
  EXPECT_THAT(no_stage.status().message(), HasSubstr("layer3"));

  // Non-canonical indices and layer5 are not blocks (they become unexpected keys).
  EXPECT_EQ(*InferBlocks({"layer1.0.a", "layer1.01.a", "layer2.0.a", "layer3.0.a",
                          "layer4.0.a", "layer5.0.a", "layer1.-1.a", "layer1.1"}),
            kSmall);
}

TEST(CheckpointKeys, ExpectedShapesMatchArcfaceMd) {
  const auto r50 = ExpectedShapes(kR50);
  EXPECT_EQ(r50.size(), 237u);
  EXPECT_EQ(ExpectedShapes(kR100).size(), 3u + 49 * 9 + 8 + 10);
  EXPECT_EQ(r50.at("conv1.weight"), (std::vector<int64_t>{64, 3, 3, 3}));
  EXPECT_EQ(r50.at("layer2.0.bn1.running_var"), (std::vector<int64_t>{64}));
  EXPECT_EQ(r50.at("layer2.0.downsample.weight"), (std::vector<int64_t>{128, 64, 1, 1}));
  EXPECT_EQ(r50.at("layer3.13.conv2.weight"), (std::vector<int64_t>{256, 256, 3, 3}));
  EXPECT_EQ(r50.at("layer4.0.conv1.weight"), (std::vector<int64_t>{512, 256, 3, 3}));
  EXPECT_EQ(r50.count("layer4.1.downsample.weight"), 0u);
  EXPECT_EQ(r50.at("fc.weight"), (std::vector<int64_t>{512, 25088}));
  EXPECT_EQ(r50.at("features.running_mean"), (std::vector<int64_t>{512}));
  int64_t parameters = 0;
  for (const auto& [key, shape] : r50) {
    if (key.find("running_") != std::string::npos) continue;
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    parameters += n;
  }
  EXPECT_EQ(parameters, 43578176);  // docs/MODEL.md (includes features.weight/bias)
}

// ---------------------------------------------------------------- file-level failures

TEST(SafetensorsLoad, MissingFileIsNotFound) {
  const std::string path = TempPath("does_not_exist.safetensors");
  absl::StatusOr<Checkpoint> c = LoadCheckpoint(path);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(c.status().message(), HasSubstr(path));
}

TEST(SafetensorsLoad, DirectoryIsRefused) {
  const std::string path = TempPath("a_directory");
  std::filesystem::create_directories(path);
  absl::StatusOr<Checkpoint> c = LoadCheckpoint(path);
  std::filesystem::remove(path);
  ASSERT_FALSE(c.ok());
  EXPECT_THAT(c.status().message(), HasSubstr("not a regular file"));
}

TEST(SafetensorsLoad, EmptyFile) { EXPECT_THAT(LoadError(""), HasSubstr("file is empty")); }

TEST(SafetensorsLoad, ShorterThanLengthPrefix) {
  const std::string message = LoadError("abc");
  EXPECT_THAT(message, HasSubstr("not a safetensors or ONNX file"));
  EXPECT_THAT(message, HasSubstr("shorter than the 8-byte"));
}

TEST(SafetensorsLoad, HeaderLengthLargerThanFile) {
  const std::string bytes = EncodeRaw(std::string(100, ' '), "");
  std::string cut = bytes.substr(0, 8) + "{}";
  EXPECT_THAT(LoadError(cut), HasSubstr("header length 100 is larger than the 2 bytes"));
}

TEST(SafetensorsLoad, HeaderLengthAbsurd) {
  const uint64_t length = uint64_t{1} << 63;
  std::string bytes(reinterpret_cast<const char*>(&length), 8);
  bytes += "{\"a\":{}}";
  EXPECT_THAT(LoadError(bytes), HasSubstr("header length 9223372036854775808"));
}

TEST(SafetensorsLoad, HeaderLengthZero) {
  std::string bytes(8, '\0');
  bytes += "{}";
  EXPECT_THAT(LoadError(bytes), HasSubstr("too short for a JSON object"));
}

TEST(SafetensorsLoad, HeaderNotJson) {
  EXPECT_THAT(LoadError(EncodeRaw("{not json}", "")), HasSubstr("not valid JSON"));
  // Without the '{' sniff the file is tried as ONNX too; the safetensors reason still shows.
  const std::string message = LoadError(EncodeRaw("garbage!", ""));
  EXPECT_THAT(message, HasSubstr("not a safetensors or ONNX file"));
  EXPECT_THAT(message, HasSubstr("not valid JSON"));
}

TEST(SafetensorsLoad, HeaderNotAnObject) {
  EXPECT_THAT(LoadError(EncodeRaw("[1, 2, 3]", "")), HasSubstr("JSON array, not an object"));
}

TEST(SafetensorsLoad, DuplicateName) {
  const std::string header =
      R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
      R"("a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})";
  EXPECT_THAT(LoadError(EncodeRaw(header, std::string(8, '\0'))),
              HasSubstr("names \"a\" twice"));
}

TEST(SafetensorsLoad, MetadataMustBeStringMap) {
  const std::string header = R"({"__metadata__":{"format":"pt","epoch":3}})";
  EXPECT_THAT(LoadError(EncodeRaw(header, "")), HasSubstr("\"epoch\" is a JSON number"));
}

struct EntryCase {
  const char* label;
  const char* entry;  // the JSON of tensor "w"
  const char* reason;
};

class MalformedEntry : public ::testing::TestWithParam<EntryCase> {};

TEST_P(MalformedEntry, NamesTensorAndReason) {
  const EntryCase& c = GetParam();
  const std::string header = absl::StrCat(R"({"ok":{"dtype":"F32","shape":[2],)",
                                          R"("data_offsets":[0,8]},"w":)", c.entry, "}");
  const std::string message = LoadError(EncodeRaw(header, std::string(16, '\0')));
  EXPECT_THAT(message, HasSubstr("tensor 'w'"));
  EXPECT_THAT(message, HasSubstr(c.reason));
}

INSTANTIATE_TEST_SUITE_P(
    SafetensorsLoad, MalformedEntry,
    ::testing::Values(
        EntryCase{"NotAnObject", "[1]", "header entry is a JSON array"},
        EntryCase{"MissingDtype", R"({"shape":[2],"data_offsets":[8,16]})", "no \"dtype\""},
        EntryCase{"MissingShape", R"({"dtype":"F32","data_offsets":[8,16]})", "no \"shape\""},
        EntryCase{"MissingOffsets", R"({"dtype":"F32","shape":[2]})", "no \"data_offsets\""},
        EntryCase{"DtypeNotString", R"({"dtype":4,"shape":[2],"data_offsets":[8,16]})",
                  "\"dtype\" is not a string"},
        EntryCase{"UnknownDtype", R"({"dtype":"F33","shape":[2],"data_offsets":[8,16]})",
                  "unknown dtype 'F33'"},
        EntryCase{"UnsupportedDtype", R"({"dtype":"F64","shape":[1],"data_offsets":[8,16]})",
                  "unsupported dtype 'F64'"},
        EntryCase{"I64Weight", R"({"dtype":"I64","shape":[1],"data_offsets":[8,16]})",
                  "I64 is accepted only for *.num_batches_tracked"},
        EntryCase{"ShapeNotArray", R"({"dtype":"F32","shape":2,"data_offsets":[8,16]})",
                  "\"shape\" is not an array"},
        EntryCase{"NegativeDim", R"({"dtype":"F32","shape":[-2],"data_offsets":[8,16]})",
                  "holds -2, not a non-negative integer"},
        EntryCase{"FractionalDim", R"({"dtype":"F32","shape":[2.5],"data_offsets":[8,16]})",
                  "holds 2.5, not a non-negative integer"},
        EntryCase{"StringDim", R"({"dtype":"F32","shape":["2"],"data_offsets":[8,16]})",
                  "not a non-negative integer"},
        EntryCase{"HugeShape",
                  R"({"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[8,16]})",
                  "more elements than can exist"},
        EntryCase{"OffsetsNotPair", R"({"dtype":"F32","shape":[2],"data_offsets":[8]})",
                  "not [begin, end]"},
        EntryCase{"NegativeOffset", R"({"dtype":"F32","shape":[2],"data_offsets":[-8,0]})",
                  "not [begin, end]"},
        EntryCase{"OffsetsReversed", R"({"dtype":"F32","shape":[0],"data_offsets":[16,8]})",
                  "end before they begin"},
        EntryCase{"OffsetsPastData", R"({"dtype":"F32","shape":[2],"data_offsets":[12,20]})",
                  "reach past the end of the data region (16 bytes)"},
        EntryCase{"ByteSizeMismatch", R"({"dtype":"F32","shape":[3],"data_offsets":[8,16]})",
                  "byte size mismatch: data_offsets span 8 bytes but dtype F32 and shape [3] "
                  "need 12"},
        EntryCase{"Overlap", R"({"dtype":"F32","shape":[2],"data_offsets":[4,12]})",
                  "overlap those of tensor 'ok'"},
        EntryCase{"UnexpectedField",
                  R"({"dtype":"F32","shape":[2],"data_offsets":[8,16],"scale":1})",
                  "unexpected field \"scale\""}),
    [](const ::testing::TestParamInfo<EntryCase>& info) { return info.param.label; });

TEST(SafetensorsLoad, DeeplyNestedValueIsDescribedNotDumped) {
  // Serializing this for the message would recurse a million levels and overflow the stack.
  const std::string nested = std::string(1000000, '[') + std::string(1000000, ']');
  const std::string header =
      absl::StrCat(R"({"w":{"dtype":"F32","shape":)", nested, R"(,"data_offsets":[0,0]}})");
  EXPECT_THAT(LoadError(EncodeRaw(header, "")),
              HasSubstr("\"shape\" holds a JSON array of 1 elements"));
}

TEST(SafetensorsLoad, TruncatedData) {
  std::string bytes = EncodeSafetensors(ToEntries(SmallExact16(), "F16"));
  // Entries are laid out in key order; cut into the last one only (prelu.weight, 128 bytes).
  bytes.resize(bytes.size() - 10);
  const std::string last = SmallExact16().rbegin()->first;
  const std::string message = LoadError(bytes);
  EXPECT_THAT(message, HasSubstr(absl::StrCat("tensor '", last, "'")));
  EXPECT_THAT(message, HasSubstr("truncated"));
}

// ---------------------------------------------------------------- key-level failures

TEST(CheckpointValidation, MissingKey) {
  const std::string message = LoadError(SmallFileWith([](std::vector<RawEntry>& entries) {
    entries.erase(entries.begin() + std::distance(entries.data(),
                                                  Find(entries, "layer2.0.downsample.bias")));
  }));
  EXPECT_THAT(message, HasSubstr("1 missing, 0 unexpected, 0 mis-shaped"));
  EXPECT_THAT(message, HasSubstr("missing key 'layer2.0.downsample.bias' [128]"));
}

TEST(CheckpointValidation, ExtraKey) {
  const std::string message = LoadError(SmallFileWith([](std::vector<RawEntry>& entries) {
    entries.push_back(F32Entry("layer1.0.bn3.weight", {64}, std::vector<float>(64, 1.0f)));
  }));
  EXPECT_THAT(message, HasSubstr("unexpected key 'layer1.0.bn3.weight' [64]"));
  // bn3 next to PReLUs: InsightFace's unfused training layout, and the message says so.
  EXPECT_THAT(message, HasSubstr("unfused InsightFace IResNet"));
}

TEST(CheckpointValidation, ExtraBlockIsAnExtraKeySet) {
  // A second block in layer4 changes the inferred blocks; its keys are then expected in full.
  const std::string message = LoadError(SmallFileWith([](std::vector<RawEntry>& entries) {
    entries.push_back(F32Entry("layer4.1.conv1.bias", {512}, std::vector<float>(512, 0.0f)));
  }));
  EXPECT_THAT(message, HasSubstr("blocks {1,1,1,2}"));
  EXPECT_THAT(message, HasSubstr("missing key 'layer4.1.conv1.weight'"));
}

TEST(CheckpointValidation, MisShapedKey) {
  const std::string message = LoadError(SmallFileWith([](std::vector<RawEntry>& entries) {
    Find(entries, "layer3.0.conv1.weight")->shape = {256, 128, 1, 9};  // same byte size
  }));
  EXPECT_THAT(message,
              HasSubstr("key 'layer3.0.conv1.weight' has shape [256,128,1,9], expected "
                        "[256,128,3,3]"));
}

TEST(CheckpointValidation, NaNValue) {
  const std::string message = LoadError(SmallFileWith([](std::vector<RawEntry>& entries) {
    std::vector<float> values(512, 0.25f);
    values[7] = std::numeric_limits<float>::quiet_NaN();
    *Find(entries, "fc.bias") = F32Entry("fc.bias", {512}, values);
  }));
  EXPECT_THAT(message, HasSubstr("tensor 'fc.bias' holds a non-finite value (NaN) at flat "
                                 "index 7"));
}

TEST(CheckpointValidation, InfValueInF16) {
  const std::string message = LoadError(SmallFileWith([](std::vector<RawEntry>& entries) {
    RawEntry* e = Find(entries, "layer1.0.prelu.weight");
    const uint16_t inf = 0xfc00;  // -Inf in binary16
    std::memcpy(e->data.data() + 2 * 3, &inf, 2);
  }));
  EXPECT_THAT(message, HasSubstr("tensor 'layer1.0.prelu.weight' holds a non-finite value "
                                 "(Inf) at flat index 3"));
}

TEST(CheckpointValidation, NegativeRunningVariance) {
  const std::string message = LoadError(SmallFileWith([](std::vector<RawEntry>& entries) {
    *Find(entries, "bn2.running_var") =
        F32Entry("bn2.running_var", {512}, std::vector<float>(512, -1.0f));
  }));
  EXPECT_THAT(message, HasSubstr("tensor 'bn2.running_var' holds a negative running variance"));
}

TEST(CheckpointValidation, WrongArchitectureResNet18) {
  // torchvision's resnet18 keys: same stage names, different everything else.
  std::vector<RawEntry> entries;
  auto add = [&](const std::string& name, std::vector<int64_t> shape) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    entries.push_back(F32Entry(name, std::move(shape), std::vector<float>(n, 0.0f)));
  };
  auto add_bn = [&](const std::string& p, int64_t c) {
    for (const char* s : {".weight", ".bias", ".running_mean", ".running_var"}) add(p + s, {c});
  };
  add("conv1.weight", {64, 3, 7, 7});
  add_bn("bn1", 64);
  int64_t in = 64;
  for (int stage = 0; stage < 4; ++stage) {
    const int64_t c = 64 << stage;
    for (int block = 0; block < 2; ++block) {
      const std::string p = absl::StrCat("layer", stage + 1, ".", block, ".");
      const int64_t cin = block == 0 ? in : c;
      add(p + "conv1.weight", {c, cin, 3, 3});
      add_bn(p + "bn1", c);
      add(p + "conv2.weight", {c, c, 3, 3});
      add_bn(p + "bn2", c);
      if (block == 0 && stage > 0) {
        add(p + "downsample.0.weight", {c, cin, 1, 1});
        add_bn(p + "downsample.1", c);
      }
    }
    in = c;
  }
  add("fc.weight", {1000, 512});
  add("fc.bias", {1000});
  const std::string message = LoadError(EncodeSafetensors(entries));
  EXPECT_THAT(message, HasSubstr("does not match an IResNet r18 with blocks {2,2,2,2}"));
  EXPECT_THAT(message, HasSubstr("key 'conv1.weight' has shape [64,3,7,7], expected [64,3,3,3]"));
  EXPECT_THAT(message, HasSubstr("missing key 'conv1.bias'"));
}

TEST(CheckpointValidation, WrongArchitectureNoStages) {
  std::vector<RawEntry> entries = {
      F32Entry("encoder.weight", {2}, {1.0f, 2.0f}),
      F32Entry("decoder.weight", {2}, {1.0f, 2.0f}),
  };
  const std::string message = LoadError(EncodeSafetensors(entries));
  EXPECT_THAT(message, HasSubstr("not an ArcFace IResNet checkpoint"));
  EXPECT_THAT(message, HasSubstr("no keys for stage 'layer1'"));
}

TEST(CheckpointValidation, BlockGap) {
  const std::string message = LoadError(SmallFileWith([](std::vector<RawEntry>& entries) {
    for (RawEntry& e : entries) {
      if (e.name.rfind("layer2.0.", 0) == 0) e.name.replace(0, 8, "layer2.1");
    }
  }));
  EXPECT_THAT(message, HasSubstr("has block 1 but no block 'layer2.0'"));
}

// ---------------------------------------------------------------- conversions and hashing

TEST(HalfConversion, EveryBinary16PatternIsExact) {
  for (uint32_t bits = 0; bits <= 0xffff; ++bits) {
    const int sign = (bits & 0x8000) ? -1 : 1;
    const int exponent = (bits >> 10) & 0x1f;
    const int mantissa = bits & 0x3ff;
    const float got = HalfToFloat(static_cast<uint16_t>(bits));
    if (exponent == 0x1f) {
      if (mantissa == 0) {
        EXPECT_EQ(got, sign * std::numeric_limits<float>::infinity()) << bits;
      } else {
        EXPECT_TRUE(std::isnan(got)) << bits;
      }
      continue;
    }
    const double expected =
        exponent == 0 ? sign * std::ldexp(mantissa, -24)
                      : sign * std::ldexp(1024 + mantissa, exponent - 25);
    ASSERT_EQ(static_cast<double>(got), expected) << "bits " << bits;
    EXPECT_EQ(std::signbit(got), sign < 0) << bits;
  }
}

TEST(HalfConversion, BFloat16) {
  EXPECT_EQ(BFloat16ToFloat(0x3f80), 1.0f);
  EXPECT_EQ(BFloat16ToFloat(0xc000), -2.0f);
  EXPECT_EQ(BFloat16ToFloat(0x3e20), 0.15625f);
  EXPECT_EQ(BFloat16ToFloat(0x0001), std::ldexp(1.0f, -133));  // smallest subnormal
  EXPECT_EQ(BFloat16ToFloat(0x7f80), std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(BFloat16ToFloat(0x7fc0)));
}

TEST(Sha256, KnownVectors) {
  EXPECT_EQ(*Sha256Hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(*Sha256Hex(""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(*Sha256Hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
}

TEST(Sha256, MatchesSha256sumOfTheLoadedFile) {
  const std::string bytes = EncodeSafetensors(ToEntries(SmallExact16(), "F16"));
  const std::string path = TempPath("hashed.safetensors");
  WriteFile(path, bytes);
  absl::StatusOr<Checkpoint> c = LoadCheckpoint(path);
  ASSERT_TRUE(c.ok()) << c.status();

  FILE* pipe = popen(("sha256sum '" + path + "'").c_str(), "r");
  ASSERT_NE(pipe, nullptr);
  char digest[65] = {};
  const size_t n = std::fread(digest, 1, 64, pipe);
  pclose(pipe);
  std::filesystem::remove(path);
  if (n != 64) GTEST_SKIP() << "sha256sum is not available";
  EXPECT_EQ(c->sha256, std::string(digest, 64));
  EXPECT_EQ(c->ModelId(), "arcface-r10@" + std::string(digest, 12));
}

}  // namespace
}  // namespace arcface::model
