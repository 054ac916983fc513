// The engine against two independent references: Debian's PyTorch running tests/reference's
// functional network, and ONNX Runtime running the exported ONNX files, on seeded random
// checkpoints in the exact layout and on the real photos. Inputs go through the same image
// library the service uses (decode, box crop, alignment).
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "server/engine/engine.h"
#include "server/image/image.h"
#include "server/model/checkpoint.h"

namespace arcface::engine {
namespace {

using ::testing::HasSubstr;
using Json = nlohmann::json;

const std::string kGoldenDir = ARCFACE_GOLDEN_DIR;

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in.good()) << "cannot open " << path;
  return std::string(std::istreambuf_iterator<char>(in), {});
}

Json ReadJson(const std::string& path) { return Json::parse(ReadFile(path)); }

struct Comparison {
  double cosine = 0;
  double max_abs_diff = 0;
  double ref_norm = 0;
};

Comparison Compare(const float* got, const std::vector<float>& ref) {
  double dot = 0, gg = 0, rr = 0, max_diff = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    dot += double{got[i]} * ref[i];
    gg += double{got[i]} * got[i];
    rr += double{ref[i]} * ref[i];
    max_diff = std::max(max_diff, std::abs(double{got[i]} - ref[i]));
  }
  return {dot / std::sqrt(gg * rr), max_diff, std::sqrt(rr)};
}

// ARCFACE exactness bar: 112×112 inputs match to float rounding; resampled crops (uint8 in the
// service, float in py-feat's reference) to cosine 0.9999.
// Worst agreement seen per (check, tolerance class), printed at the end for the record.
std::map<std::string, Comparison>& Worst() {
  static auto* worst = new std::map<std::string, Comparison>();
  return *worst;
}

void ExpectMatches(const std::string& what, const float* got, const std::vector<float>& ref,
                   bool exact) {
  Comparison c = Compare(got, ref);
  Comparison& w = Worst()[what.substr(0, what.find('/')) + (exact ? " exact" : " resampled")];
  if (w.ref_norm == 0 || c.cosine < w.cosine) w.cosine = c.cosine;
  w.max_abs_diff = std::max(w.max_abs_diff, c.max_abs_diff / c.ref_norm);
  w.ref_norm = 1;
  if (exact) {
    EXPECT_GE(c.cosine, 0.99999) << what;
    EXPECT_LE(c.max_abs_diff, 1e-4 * c.ref_norm) << what << " ref norm " << c.ref_norm;
  } else {
    EXPECT_GE(c.cosine, 0.9999) << what;
  }
}

struct GoldenCase {
  std::string name;
  std::string model;
  bool exact = false;
  image::Crop crop;
  std::vector<float> embedding;
};

image::Crop MakeCrop(const Json& input) {
  if (input.at("kind") == "crop") {
    std::string bytes = ReadFile(kGoldenDir + "/" + input.at("file").get<std::string>());
    return image::Crop(bytes.begin(), bytes.end());
  }
  const std::string path = input.at("path");
  absl::StatusOr<cv::Mat> rgb = image::DecodeImage(ReadFile(path), image::Limits{});
  EXPECT_TRUE(rgb.ok()) << path << ": " << rgb.status();
  absl::StatusOr<image::Crop> crop;
  if (input.contains("box")) {
    const auto& b = input.at("box");
    crop = image::CropBox(*rgb, {b[0].get<float>(), b[1].get<float>(), b[2].get<float>(),
                                 b[3].get<float>()});
  } else if (input.contains("landmarks")) {
    std::vector<image::Point> points;
    for (const auto& p : input.at("landmarks")) points.push_back({p[0].get<float>(), p[1].get<float>()});
    crop = image::AlignFace(*rgb, points);
  } else {
    crop = image::ResizeWhole(*rgb);
  }
  EXPECT_TRUE(crop.ok()) << path << ": " << crop.status();
  return crop.ok() ? *crop : image::Crop(image::kCropBytes, 0);
}

class EngineGoldenTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    goldens_ = new Json(ReadJson(kGoldenDir + "/goldens.json"));
    cases_ = new std::vector<GoldenCase>();
    for (const auto& c : goldens_->at("cases")) {
      cases_->push_back({c.at("name"), c.at("model"), c.at("tolerance") == "exact",
                         MakeCrop(c.at("input")), c.at("embedding").get<std::vector<float>>()});
    }
    engines_ = new std::map<std::string, std::unique_ptr<Engine>>();
    checkpoints_ = new std::map<std::string, model::Checkpoint>();
    for (const auto& [key, model] : goldens_->at("models").items()) {
      absl::StatusOr<model::Checkpoint> ckpt =
          model::LoadCheckpoint(kGoldenDir + "/" + model.at("file").get<std::string>());
      ASSERT_TRUE(ckpt.ok()) << ckpt.status();
      EngineOptions options;
      options.threads = 2;
      options.warmup_batch_size = 1;
      absl::StatusOr<std::unique_ptr<Engine>> engine = Engine::Create(*ckpt, options);
      ASSERT_TRUE(engine.ok()) << engine.status();
      (*engines_)[key] = *std::move(engine);
      (*checkpoints_)[key] = *std::move(ckpt);
    }
  }
  static void TearDownTestSuite() {
    for (const auto& [what, c] : Worst()) {
      std::printf("worst %-32s cosine %.9f  max|diff|/|ref| %.2e\n", what.c_str(), c.cosine, c.max_abs_diff);
    }
    delete engines_;
    delete checkpoints_;
    delete cases_;
    delete goldens_;
  }

  static std::vector<const GoldenCase*> CasesOf(const std::string& model) {
    std::vector<const GoldenCase*> out;
    for (const auto& c : *cases_) {
      if (c.model == model) out.push_back(&c);
    }
    return out;
  }

  // Runs the cases of `model` as one batch (crops of different kinds side by side).
  static EmbeddingBatch RunBatch(const std::vector<const GoldenCase*>& cases, const std::string& model) {
    std::vector<uint8_t> buffer;
    for (const auto* c : cases) buffer.insert(buffer.end(), c->crop.begin(), c->crop.end());
    absl::StatusOr<EmbeddingBatch> out = engines_->at(model)->Run(buffer);
    EXPECT_TRUE(out.ok()) << out.status();
    return out.ok() ? *std::move(out) : EmbeddingBatch{};
  }

  static Json* goldens_;
  static std::vector<GoldenCase>* cases_;
  static std::map<std::string, std::unique_ptr<Engine>>* engines_;
  static std::map<std::string, model::Checkpoint>* checkpoints_;
};
Json* EngineGoldenTest::goldens_ = nullptr;
std::vector<GoldenCase>* EngineGoldenTest::cases_ = nullptr;
std::map<std::string, std::unique_ptr<Engine>>* EngineGoldenTest::engines_ = nullptr;
std::map<std::string, model::Checkpoint>* EngineGoldenTest::checkpoints_ = nullptr;

TEST_F(EngineGoldenTest, GoldensCoverEveryModelAndInputKind) {
  std::map<std::string, int> kinds;
  for (const auto& c : goldens_->at("cases")) {
    const Json& in = c.at("input");
    kinds[in.at("kind") == "crop" ? "crop" : in.contains("box") ? "box"
                                   : in.contains("landmarks") ? "aligned" : "whole"]++;
  }
  for (const char* kind : {"crop", "box", "aligned", "whole"}) EXPECT_GT(kinds[kind], 0) << kind;
  for (const char* model : {"r50", "r100", "insightface_r50"}) EXPECT_FALSE(CasesOf(model).empty()) << model;
  EXPECT_EQ(checkpoints_->at("r50").arch, "r50");
  EXPECT_EQ(checkpoints_->at("r100").arch, "r100");
  EXPECT_EQ(checkpoints_->at("insightface_r50").format, "onnx");
}

TEST_F(EngineGoldenTest, CheckpointHashIsTheFilesSha256) {
  for (const auto& [key, model] : goldens_->at("models").items()) {
    if (!model.contains("sha256")) continue;
    EXPECT_EQ(checkpoints_->at(key).sha256, model.at("sha256").get<std::string>()) << key;
    EXPECT_EQ(checkpoints_->at(key).ModelId(),
              "arcface-" + checkpoints_->at(key).arch + "@" + model.at("sha256").get<std::string>().substr(0, 12));
  }
}

// Each model's cases in one batch, compared with the PyTorch reference.
TEST_F(EngineGoldenTest, MatchesPyTorchReference) {
  for (const char* model : {"r50", "r100", "insightface_r50"}) {
    auto cases = CasesOf(model);
    EmbeddingBatch out = RunBatch(cases, model);
    ASSERT_EQ(out.size, static_cast<int>(cases.size()));
    for (size_t i = 0; i < cases.size(); ++i) {
      const float* row = out.values.data() + i * kEmbeddingDim;
      ExpectMatches(std::string(model) + "/" + cases[i]->name, row, cases[i]->embedding, cases[i]->exact);
      double norm = 0;
      for (int k = 0; k < kEmbeddingDim; ++k) norm += double{row[k]} * row[k];
      EXPECT_NEAR(out.norms[i], std::sqrt(norm), 1e-4 * std::sqrt(norm)) << cases[i]->name;
    }
  }
}

// ONNX Runtime on the reference's float inputs: a second, independent implementation.
TEST_F(EngineGoldenTest, MatchesOnnxRuntime) {
  for (const char* model : {"r50", "insightface_r50"}) {
    Json ort = ReadJson(kGoldenDir + "/ort_" + model + ".json").at("cases");
    auto cases = CasesOf(model);
    EmbeddingBatch out = RunBatch(cases, model);
    ASSERT_EQ(out.size, static_cast<int>(cases.size()));
    for (size_t i = 0; i < cases.size(); ++i) {
      ASSERT_TRUE(ort.contains(cases[i]->name)) << cases[i]->name;
      ExpectMatches(std::string("onnxruntime ") + model + "/" + cases[i]->name,
                    out.values.data() + i * kEmbeddingDim,
                    ort.at(cases[i]->name).get<std::vector<float>>(), cases[i]->exact);
    }
  }
}

// The server builds and warms up the engine on a thread that exits, then runs it on its model
// thread: the warm-up batch size's plan must not depend on the thread that made it (oneDNN's
// library-managed scratchpad is thread-local; with it this crashed).
TEST_F(EngineGoldenTest, RunsOnAnotherThreadThanTheOneThatBuiltIt) {
  auto cases = CasesOf("r50");
  cases.resize(8);
  for (const Precision precision : {Precision::kFp32, Precision::kInt8}) {
    EngineOptions options;
    options.precision = precision;
    options.warmup_batch_size = static_cast<int>(cases.size());
    absl::StatusOr<std::unique_ptr<Engine>> engine = absl::UnknownError("not built");
    std::thread([&] { engine = Engine::Create(checkpoints_->at("r50"), options); }).join();
    ASSERT_TRUE(engine.ok()) << engine.status();
    std::vector<uint8_t> buffer;
    for (const auto* c : cases) buffer.insert(buffer.end(), c->crop.begin(), c->crop.end());
    absl::StatusOr<EmbeddingBatch> out;
    std::thread([&] { out = (*engine)->Run(buffer); }).join();
    ASSERT_TRUE(out.ok()) << out.status();
    for (size_t i = 0; i < cases.size(); ++i) {
      EXPECT_GE(Compare(out->values.data() + i * kEmbeddingDim, cases[i]->embedding).cosine,
                precision == Precision::kFp32 ? 0.99999 : 0.995)
          << PrecisionName(precision) << " " << cases[i]->name;
    }
  }
}

// A crop's embedding does not depend on what else shares its batch.
TEST_F(EngineGoldenTest, BatchCompositionDoesNotChangeResults) {
  auto cases = CasesOf("r50");
  EmbeddingBatch batch = RunBatch(cases, "r50");
  for (size_t i = 0; i < cases.size(); i += 3) {
    EmbeddingBatch single = RunBatch({cases[i]}, "r50");
    ASSERT_EQ(single.size, 1);
    std::vector<float> row(batch.values.begin() + i * kEmbeddingDim,
                           batch.values.begin() + (i + 1) * kEmbeddingDim);
    ExpectMatches("single vs batch/" + cases[i]->name, single.values.data(), row, /*exact=*/true);
  }
}

TEST_F(EngineGoldenTest, DifferentFacesGiveDifferentEmbeddings) {
  auto cases = CasesOf("r50");
  EmbeddingBatch out = RunBatch(cases, "r50");
  for (size_t i = 0; i + 1 < cases.size(); ++i) {
    std::vector<float> next(out.values.begin() + (i + 1) * kEmbeddingDim,
                            out.values.begin() + (i + 2) * kEmbeddingDim);
    EXPECT_LT(Compare(out.values.data() + i * kEmbeddingDim, next).cosine, 0.99)
        << cases[i]->name << " vs " << cases[i + 1]->name;
  }
}

// The worst cosine between `options`' embeddings of every r50 golden case and the reference's
// fp32 embeddings (the reduced precisions' bar is fp32, which matches the reference exactly).
double WorstCosineToGoldens(const std::vector<const GoldenCase*>& cases,
                            const model::Checkpoint& checkpoint, const EngineOptions& options,
                            Precision expected) {
  absl::StatusOr<std::unique_ptr<Engine>> engine = Engine::Create(checkpoint, options);
  EXPECT_TRUE(engine.ok()) << engine.status();
  if (!engine.ok()) return -1;
  EXPECT_EQ((*engine)->precision(), expected);
  std::vector<uint8_t> buffer;
  for (const auto* c : cases) buffer.insert(buffer.end(), c->crop.begin(), c->crop.end());
  absl::StatusOr<EmbeddingBatch> out = (*engine)->Run(buffer);
  EXPECT_TRUE(out.ok()) << out.status();
  if (!out.ok()) return -1;
  double worst = 1;
  std::string worst_name;
  for (size_t i = 0; i < cases.size(); ++i) {
    const double cosine = Compare(out->values.data() + i * kEmbeddingDim, cases[i]->embedding).cosine;
    if (cosine < worst) {
      worst = cosine;
      worst_name = cases[i]->name;
    }
  }
  std::printf("worst %-6s %-7s over %zu r50 cases: cosine %.6f (%s)\n", PrecisionName(expected),
              options.cpu_backend.c_str(), cases.size(), worst, worst_name.c_str());
  return worst;
}

TEST_F(EngineGoldenTest, Bf16StaysCloseToFp32) {
  EngineOptions options;
  options.precision = Precision::kBf16;
  options.warmup_batch_size = 0;
  EXPECT_GE(WorstCosineToGoldens(CasesOf("r50"), checkpoints_->at("r50"), options, Precision::kBf16), 0.999);
}

// int8 is calibrated on 16 face crops of the real photos; the goldens add synthetic crops
// (noise, stripes, gradients) it never saw.
TEST_F(EngineGoldenTest, Int8StaysCloseToFp32) {
  EngineOptions options;
  options.precision = Precision::kInt8;
  options.warmup_batch_size = 0;
  EXPECT_GE(WorstCosineToGoldens(CasesOf("r50"), checkpoints_->at("r50"), options, Precision::kInt8), 0.995);
}

// The libtorch CPU backend, kept for comparison, still gives the reference's numbers.
TEST_F(EngineGoldenTest, TorchBackendMatchesReference) {
  EngineOptions options;
  options.cpu_backend = "torch";
  options.warmup_batch_size = 0;
  std::vector<const GoldenCase*> exact;
  for (const GoldenCase* c : CasesOf("r50")) {
    if (c->exact) exact.push_back(c);
  }
  ASSERT_FALSE(exact.empty());
  EXPECT_GE(WorstCosineToGoldens(exact, checkpoints_->at("r50"), options, Precision::kFp32), 0.99999);
}

TEST_F(EngineGoldenTest, RefusesMalformedBatches) {
  Engine& engine = *engines_->at("r50");
  std::vector<uint8_t> partial(kCropBytes + 7, 0);
  absl::StatusOr<EmbeddingBatch> out = engine.Run(partial);
  EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(out.status().message(), HasSubstr("112x112x3"));
  EXPECT_EQ(engine.Run({}).status().code(), absl::StatusCode::kInvalidArgument);
  // The CPU has no device memory to report.
  EXPECT_EQ(engine.device_memory().allocated_bytes, 0);
  EXPECT_EQ(engine.device_memory().reserved_bytes, 0);
}

TEST_F(EngineGoldenTest, RefusesBadOptions) {
  const model::Checkpoint& ckpt = checkpoints_->at("r50");
  auto create = [&](const std::string& device, Precision precision, int threads) {
    EngineOptions o;
    o.device = device;
    o.precision = precision;
    o.threads = threads;
    o.warmup_batch_size = 0;
    return Engine::Create(ckpt, o).status();
  };
  absl::Status cuda = create("cuda", Precision::kFp32, 0);
  if (!BuiltWithCuda()) {
    EXPECT_EQ(cuda.code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_THAT(cuda.message(), HasSubstr("built without CUDA"));
    EXPECT_THAT(cuda.message(), HasSubstr("CPU-only libtorch"));
  }
  EngineOptions no_batch;
  no_batch.max_batch_size = 0;
  no_batch.warmup_batch_size = 0;
  EXPECT_THAT(Engine::Create(ckpt, no_batch).status().message(), HasSubstr("max batch size"));
  EngineOptions no_lanes;
  no_lanes.cuda_lanes = 0;
  no_lanes.warmup_batch_size = 0;
  EXPECT_THAT(Engine::Create(ckpt, no_lanes).status().message(), HasSubstr("CUDA lanes"));
  absl::Status fp16 = create("cpu", Precision::kFp16, 0);
  EXPECT_EQ(fp16.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(fp16.message(), HasSubstr("fp16"));
  EXPECT_THAT(create("tpu", Precision::kFp32, 0).message(), HasSubstr("unknown device 'tpu'"));
  EXPECT_THAT(create("cuda:x", Precision::kFp32, 0).message(), HasSubstr("bad CUDA device index"));
  EXPECT_THAT(create("cpu", Precision::kFp32, -1).message(), HasSubstr("threads"));
  EXPECT_THAT(ParsePrecision("fp8").status().message(), HasSubstr("unknown precision 'fp8'"));
}

}  // namespace
}  // namespace arcface::engine
