// EngineModel between the engine and the service: what the engine computed reaches the
// response as it is. The norms are the engine's own (computed beside the embeddings, on the
// device for CUDA), not computed again by the service; so each Embedding.norm must equal the
// engine's norm for that crop bit for bit, and a normalized embedding must be the raw one
// divided by exactly that norm. (With the norms computed again in double from the values, 5 of
// these 16 rows came out one float step away from the engine's.)
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include <gmock/gmock.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "arcface/v1/face_embedding.grpc.pb.h"
#include "server/app/engine_model.h"
#include "server/engine/engine.h"
#include "server/model/demo_weights.h"
#include "server/service/embedder.h"
#include "server/service/face_embedding_service.h"
#include "server/service/service_metrics.h"
#include "server/service/work_queue.h"
#include "tests/test_util/seeded_bytes.h"

namespace arcface::app {
namespace {

namespace v1 = ::arcface::v1;
using engine::kCropBytes;
using engine::kCropSize;
using engine::kEmbeddingDim;

constexpr int kCrops = 16;

std::vector<uint8_t> SeededCrops(int n) {
  return test_util::SeededBytes(size_t(n) * kCropBytes, 2463534242u);
}

uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

class EngineModelTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    // A small IResNet (one block per stage) keeps the test quick; the path is the same.
    engine::EngineOptions options;
    options.device = "cpu";
    options.warmup_batch_size = 0;
    auto created = engine::Engine::Create(model::MakeDemoCheckpoint(7, {1, 1, 1, 1}), options);
    ASSERT_TRUE(created.ok()) << created.status();
    engine_ = created->release();
  }
  static void TearDownTestSuite() {
    delete engine_;
    engine_ = nullptr;
  }

  void SetUp() override {
    ASSERT_NE(engine_, nullptr);
    metrics_ = std::make_unique<service::ServiceMetrics>(kCrops);
    pool_ = *service::WorkQueue::Create(2, 1024);
    service_ = std::make_unique<service::FaceEmbeddingService>(service::ServiceOptions(),
                                                               metrics_.get(), pool_.get());
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(service_.get());
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    stub_ = v1::FaceEmbedding::NewStub(grpc::CreateChannel(
        absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials()));

    model_ = std::make_unique<EngineModel>(engine_, /*faults=*/nullptr);
    service::EmbedderOptions options;
    // A request's crops form one batch, as in the engine's own run below.
    options.batching.max_batch_size = kCrops;
    options.batching.max_queue_size = 4 * kCrops;
    auto embedder = service::Embedder::Create(options, model_.get());
    ASSERT_TRUE(embedder.ok()) << embedder.status();
    embedder_ = *std::move(embedder);
    service::ModelDescription description;
    description.arch = "r10";
    description.model_id = "arcface-r10@test";
    description.device = "cpu";
    description.precision = "fp32";
    service_->SetReady(embedder_.get(), description);
  }

  void TearDown() override {
    if (server_) server_->Shutdown(std::chrono::system_clock::now());
    if (embedder_) embedder_->Shutdown();
    if (pool_) pool_->Shutdown();
  }

  v1::EmbedResponse Embed(const std::vector<uint8_t>& crops, bool normalize) {
    v1::EmbedRequest request;
    request.set_normalize(normalize);
    for (size_t i = 0; i < crops.size() / kCropBytes; ++i) {
      v1::RawImage* raw = request.add_faces()->mutable_image()->mutable_raw();
      raw->set_width(kCropSize);
      raw->set_height(kCropSize);
      raw->set_format(v1::RGB8);
      raw->set_data(crops.data() + i * kCropBytes, kCropBytes);
    }
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
    v1::EmbedResponse response;
    grpc::Status status = stub_->Embed(&context, request, &response);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return response;
  }

  static engine::Engine* engine_;
  std::unique_ptr<service::ServiceMetrics> metrics_;
  std::unique_ptr<service::WorkQueue> pool_;
  std::unique_ptr<EngineModel> model_;
  std::unique_ptr<service::Embedder> embedder_;
  std::unique_ptr<service::FaceEmbeddingService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<v1::FaceEmbedding::Stub> stub_;
};

engine::Engine* EngineModelTest::engine_ = nullptr;

TEST_F(EngineModelTest, RunReturnsTheEnginesBatchAsItIs) {
  const std::vector<uint8_t> crops = SeededCrops(kCrops);
  absl::StatusOr<engine::EmbeddingBatch> want = engine_->Run(crops);
  ASSERT_TRUE(want.ok()) << want.status();
  absl::StatusOr<engine::EmbeddingBatch> got = model_->Run(crops);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->size, kCrops);
  EXPECT_EQ(got->values, want->values);
  EXPECT_EQ(got->norms, want->norms);
}

TEST_F(EngineModelTest, ResponseNormsAreTheEnginesBitForBit) {
  const std::vector<uint8_t> crops = SeededCrops(kCrops);
  absl::StatusOr<engine::EmbeddingBatch> want = engine_->Run(crops);
  ASSERT_TRUE(want.ok()) << want.status();
  ASSERT_EQ(want->norms.size(), size_t(kCrops));

  const v1::EmbedResponse raw = Embed(crops, /*normalize=*/false);
  const v1::EmbedResponse unit = Embed(crops, /*normalize=*/true);
  ASSERT_EQ(raw.embeddings_size(), kCrops);
  ASSERT_EQ(unit.embeddings_size(), kCrops);
  for (int i = 0; i < kCrops; ++i) {
    const float norm = want->norms[i];
    EXPECT_EQ(Bits(raw.embeddings(i).norm()), Bits(norm))
        << "crop " << i << ": " << raw.embeddings(i).norm() << " vs the engine's " << norm;
    EXPECT_EQ(Bits(unit.embeddings(i).norm()), Bits(norm)) << "crop " << i << " (normalized)";
  }
  for (int i = 0; i < kCrops; ++i) {
    const double norm = want->norms[i];
    const float* row = want->values.data() + size_t(i) * kEmbeddingDim;
    ASSERT_EQ(raw.embeddings(i).values_size(), kEmbeddingDim);
    ASSERT_EQ(unit.embeddings(i).values_size(), kEmbeddingDim);
    for (int j = 0; j < kEmbeddingDim; ++j) {
      ASSERT_EQ(Bits(raw.embeddings(i).values(j)), Bits(row[j])) << "crop " << i << " value " << j;
      ASSERT_EQ(Bits(unit.embeddings(i).values(j)), Bits(static_cast<float>(row[j] / norm)))
          << "crop " << i << " value " << j << ": not the raw value over the engine's norm";
    }
  }
}

}  // namespace
}  // namespace arcface::app
