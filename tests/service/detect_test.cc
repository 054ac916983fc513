// Detect and DetectStream (server/service/detect_call.h, detect_stream.h, frame_detector.h)
// through a real in-process gRPC server on 127.0.0.1:0, with fakes behind both interfaces (no
// torch): the fake detector reads each frame's faces from its own pixels (pixel (0,0) says how
// many and where), so every caller's expected faces are computed here; the fake embedding model
// is service_test's (an embedding is a function of the crop's bytes).
#include <grpcpp/grpcpp.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstdio>
#include <limits>
#include <map>
#include <memory>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "arcface/v1/face_embedding.grpc.pb.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/gallery/galleries.h"
#include "server/gallery/gallery_store.h"
#include "server/service/cosine.h"
#include "server/service/detection_model.h"
#include "server/service/detector_metrics.h"
#include "server/service/embedder.h"
#include "server/service/face_embedding_service.h"
#include "server/service/frame_detector.h"
#include "server/service/gallery_metrics.h"
#include "server/service/gallery_search.h"
#include "server/service/service_metrics.h"
#include "server/service/work_queue.h"
#include "tests/service/fake_detector.h"
#include "tests/service/fake_model.h"
#include "tests/test_util/exposition.h"
#include "tests/test_util/fake_clock.h"

namespace arcface::service {
namespace {

using ::testing::HasSubstr;
namespace v1 = ::arcface::v1;

v1::DetectRequest DetectOf(const cv::Mat& rgb, const std::string& request_id = "") {
  v1::DetectRequest request;
  *request.mutable_image() = RawImage(rgb);
  request.set_request_id(request_id);
  return request;
}

constexpr char kDetectorId[] = "fake_boxes+fake_points@0123456789ab";

// Checks that `got` are `want`, as the service writes them.
void ExpectFaces(const v1::DetectResponse& got, const std::vector<DetectedBox>& want,
                 const std::string& context) {
  ASSERT_EQ(got.faces_size(), static_cast<int>(want.size())) << context;
  for (int i = 0; i < got.faces_size(); ++i) {
    const v1::DetectedFace& f = got.faces(i);
    EXPECT_EQ(f.box().x_min(), want[i].box.x_min) << context << " face " << i;
    EXPECT_EQ(f.box().y_min(), want[i].box.y_min) << context << " face " << i;
    EXPECT_EQ(f.box().x_max(), want[i].box.x_max) << context << " face " << i;
    EXPECT_EQ(f.box().y_max(), want[i].box.y_max) << context << " face " << i;
    EXPECT_EQ(f.score(), want[i].score) << context << " face " << i;
    ASSERT_EQ(f.landmarks_size(), 5) << context;
    for (int k = 0; k < 5; ++k) {
      EXPECT_EQ(f.landmarks(k).x(), want[i].landmarks[k].x) << context;
      EXPECT_EQ(f.landmarks(k).y(), want[i].landmarks[k].y) << context;
    }
  }
}

class DetectTest : public ::testing::Test {
 protected:
  // `detector` false: --detector none. `galleries` false: --gallery-store none.
  void Start(bool detector = true, bool galleries = true, int max_batch_size = 8,
             absl::Duration delay = absl::Milliseconds(1), int max_queue_size = 64) {
    metrics_ = std::make_unique<ServiceMetrics>(8);
    detector_metrics_ = std::make_unique<DetectorMetrics>(&metrics_->registry(), max_batch_size);
    gallery_metrics_ = std::make_unique<GalleryMetrics>(&metrics_->registry());
    pool_ = *WorkQueue::Create(2, 256);
    gallery_queue_ = *WorkQueue::Create(1, 256);
    ServiceOptions options;
    service_ = std::make_unique<FaceEmbeddingService>(options, metrics_.get(), pool_.get());
    search_ = std::make_unique<GallerySearch>(gallery_queue_.get(), gallery_metrics_.get(),
                                              metrics_.get(), /*max_top_k=*/5);
    if (galleries) {
      store_path_ = absl::StrCat(::testing::TempDir(), "/detect_test_", ::getpid(), "_",
                                 reinterpret_cast<uintptr_t>(this), ".db");
      std::remove(store_path_.c_str());
      auto store = gallery::OpenGalleryStore("sqlite:" + store_path_);
      ASSERT_TRUE(store.ok()) << store.status();
      auto opened = gallery::Galleries::Open(*std::move(store), gallery::GalleriesOptions());
      ASSERT_TRUE(opened.ok()) << opened.status();
      galleries_ = *std::move(opened);
      search_->SetGalleries(galleries_.get());
    }
    EmbedderOptions eo;
    eo.batching.max_batch_size = 8;
    eo.batching.max_queue_size = 1024;
    eo.batching.max_queue_delay = absl::Milliseconds(1);
    eo.batching.observer = metrics_.get();
    embedder_ = *Embedder::Create(eo, &model_);
    if (detector) {
      batching::DynamicBatcher::Options bo;
      bo.max_batch_size = max_batch_size;
      bo.max_queue_delay = delay;
      bo.max_queue_size = max_queue_size;
      DetectorDescription description;
      description.detector_id = kDetectorId;
      description.detector = "fake_boxes";
      description.landmarks = "fake_points";
      description.weights_sha256 = std::string(64, 'b');
      description.device = "cpu";
      description.input_size = 416;
      description.default_min_score = 0.5f;
      description.max_faces_per_frame = 6;
      frame_detector_ =
          *FrameDetector::Create(bo, &fake_detector_, description, detector_metrics_.get(), nullptr,
                                 max_held_frame_bytes_);
    }
    service_->SetDetection(frame_detector_.get(), search_.get());
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    builder.RegisterService(service_.get());
    builder.SetMaxReceiveMessageSize(64 << 20);
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    ModelDescription model;
    model.arch = "r50";
    model.model_id = "arcface-r50@0123456789ab";
    model.device = "cpu";
    model.precision = "fp32";
    service_->SetReady(embedder_.get(), model);
    stub_ = v1::FaceEmbedding::NewStub(
        grpc::CreateChannel(absl::StrCat("127.0.0.1:", port_), grpc::InsecureChannelCredentials()));
  }

  void TearDown() override {
    fake_detector_.Release();
    if (server_) server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
    if (frame_detector_) frame_detector_->Shutdown();
    if (embedder_) embedder_->Shutdown();
    if (pool_) pool_->Shutdown();
    if (gallery_queue_) gallery_queue_->Shutdown();
    galleries_.reset();
    if (!store_path_.empty()) std::remove(store_path_.c_str());
  }

  grpc::Status Detect(const v1::DetectRequest& request, v1::DetectResponse* response,
                      absl::Duration timeout = absl::Seconds(30)) {
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
    return stub_->Detect(&context, request, response);
  }

  double Metric(const std::string& name, const std::map<std::string, std::string>& labels = {}) {
    std::map<std::string, std::string> types;
    for (const test_util::Sample& s : test_util::ParseExposition(metrics_->Render(), &types)) {
      if (s.name == name && s.labels == labels) return s.value;
    }
    return 0;
  }

  int64_t max_held_frame_bytes_ = int64_t{1} << 30;  // set before Start()
  FakeModel model_;
  FakeDetector fake_detector_;
  std::unique_ptr<ServiceMetrics> metrics_;
  std::unique_ptr<DetectorMetrics> detector_metrics_;
  std::unique_ptr<GalleryMetrics> gallery_metrics_;
  std::unique_ptr<WorkQueue> pool_;
  std::unique_ptr<WorkQueue> gallery_queue_;
  std::string store_path_;
  std::unique_ptr<gallery::Galleries> galleries_;
  std::unique_ptr<GallerySearch> search_;
  std::unique_ptr<Embedder> embedder_;
  std::unique_ptr<FrameDetector> frame_detector_;
  std::unique_ptr<FaceEmbeddingService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<v1::FaceEmbedding::Stub> stub_;
  int port_ = 0;
};

TEST_F(DetectTest, FindsTheFramesOwnFacesByScoreInItsPixels) {
  Start();
  for (int n : {0, 1, 3, 5}) {
    const cv::Mat frame = MakeFrame(n, 10 + n);
    v1::DetectResponse response;
    grpc::Status s = Detect(DetectOf(frame, absl::StrCat("frame-", n)), &response);
    ASSERT_TRUE(s.ok()) << s.error_message();
    // The default threshold (0.5) keeps faces 0..4 (scores 0.95 .. 0.55).
    ExpectFaces(response, Filtered(FacesIn(frame), {0.5f, 0, 6}), absl::StrCat(n, " faces"));
    EXPECT_EQ(response.image_width(), static_cast<uint32_t>(kFrameWidth));
    EXPECT_EQ(response.image_height(), static_cast<uint32_t>(kFrameHeight));
    EXPECT_EQ(response.detector_id(), kDetectorId);
    EXPECT_EQ(response.request_id(), absl::StrCat("frame-", n));
    EXPECT_EQ(response.model_id(), "");  // nothing embedded
    EXPECT_FALSE(response.has_error());
    for (int i = 1; i < response.faces_size(); ++i) {
      EXPECT_GT(response.faces(i - 1).score(), response.faces(i).score());
    }
  }
  // The request's filter reaches the detector.
  const cv::Mat frame = MakeFrame(8, 3);
  v1::DetectRequest request = DetectOf(frame);
  request.set_min_score(0.2f);
  request.set_max_faces(3);
  v1::DetectResponse response;
  ASSERT_TRUE(Detect(request, &response).ok());
  ExpectFaces(response, Filtered(FacesIn(frame), {0.2f, 0, 3}), "max_faces 3");
  request.set_max_faces(0);
  request.set_min_face_size(19);
  ASSERT_TRUE(Detect(request, &response).ok());
  ExpectFaces(response, Filtered(FacesIn(frame), {0.2f, 19, 6}), "min_face_size 19");
  EXPECT_EQ(response.faces_size(), 5);  // faces 3..7: sides 19..23, scores 0.65..0.25
  // The frame of an encoded image: its decoded pixels.
  std::vector<uint8_t> png;
  cv::Mat bgr;
  cv::cvtColor(MakeFrame(2, 5), bgr, cv::COLOR_RGB2BGR);
  ASSERT_TRUE(cv::imencode(".png", bgr, png));
  v1::DetectRequest encoded;
  encoded.mutable_image()->set_encoded(std::string(png.begin(), png.end()));
  ASSERT_TRUE(Detect(encoded, &response).ok());
  ExpectFaces(response, FacesIn(MakeFrame(2, 5)), "png");
  EXPECT_EQ(Metric("arcface_requests_total", {{"rpc", "Detect"}, {"code", "OK"}}), 7);
  EXPECT_EQ(Metric("arcface_detector_frames_total"), 7);
  EXPECT_EQ(Metric("arcface_detector_faces_per_frame_count"), 7);
  EXPECT_EQ(Metric("arcface_detector_faces_per_frame_bucket", {{"le", "0"}}), 1);
}

TEST_F(DetectTest, MalformedRequestsNameTheFieldAndTheReason) {
  Start();
  const cv::Mat frame = MakeFrame(2, 1);
  struct Row {
    std::string name;
    v1::DetectRequest request;
    grpc::StatusCode code;
    std::string message;
  };
  std::vector<Row> rows;
  auto add = [&](std::string name, auto edit, grpc::StatusCode code, std::string message) {
    v1::DetectRequest r = DetectOf(frame);
    edit(r);
    rows.push_back({std::move(name), std::move(r), code, std::move(message)});
  };
  using C = grpc::StatusCode;
  add(
      "no image", [](v1::DetectRequest& r) { r.clear_image(); }, C::INVALID_ARGUMENT,
      "image: no image (set image.encoded or image.raw)");
  add(
      "undecodable", [](v1::DetectRequest& r) { r.mutable_image()->set_encoded("not an image"); },
      C::INVALID_ARGUMENT, "image: unsupported or undecodable image: unrecognized format");
  add(
      "empty", [](v1::DetectRequest& r) { r.mutable_image()->set_encoded(""); },
      C::INVALID_ARGUMENT, "image: empty image");
  add(
      "too large",
      [](v1::DetectRequest& r) {
        v1::RawImage* raw = r.mutable_image()->mutable_raw();
        raw->set_width(100000);
        raw->set_height(100000);
      },
      C::INVALID_ARGUMENT,
      "image: raw image is 100000x100000 = 10000000000 pixels, over the limit");
  add(
      "raw of the wrong size",
      [](v1::DetectRequest& r) { r.mutable_image()->mutable_raw()->set_width(kFrameWidth + 1); },
      C::INVALID_ARGUMENT, "image: raw image data is");
  add(
      "min_score above 1", [](v1::DetectRequest& r) { r.set_min_score(1.5f); }, C::INVALID_ARGUMENT,
      "min_score is 1.5, it must be in [0, 1]");
  add(
      "min_score below 0", [](v1::DetectRequest& r) { r.set_min_score(-0.1f); },
      C::INVALID_ARGUMENT, "min_score is -0.1");
  add(
      "min_score NaN",
      [](v1::DetectRequest& r) { r.set_min_score(std::numeric_limits<float>::quiet_NaN()); },
      C::INVALID_ARGUMENT, "min_score is nan");
  add(
      "min_face_size negative", [](v1::DetectRequest& r) { r.set_min_face_size(-1); },
      C::INVALID_ARGUMENT, "min_face_size is -1");
  add(
      "min_face_size NaN",
      [](v1::DetectRequest& r) { r.set_min_face_size(std::numeric_limits<float>::quiet_NaN()); },
      C::INVALID_ARGUMENT, "min_face_size is nan");
  add(
      "min_face_size infinite",
      [](v1::DetectRequest& r) { r.set_min_face_size(std::numeric_limits<float>::infinity()); },
      C::INVALID_ARGUMENT, "min_face_size is inf");
  add(
      "max_faces over the limit", [](v1::DetectRequest& r) { r.set_max_faces(7); },
      C::INVALID_ARGUMENT, "max_faces is 7, the limit is 6 (--detector-max-faces)");
  add(
      "top_k over the limit",
      [](v1::DetectRequest& r) {
        r.set_gallery("staff");
        r.set_top_k(6);
      },
      C::INVALID_ARGUMENT, "top_k is 6, the limit is 5 (--gallery-max-top-k)");
  add(
      "threshold not finite",
      [](v1::DetectRequest& r) {
        r.set_gallery("staff");
        r.set_threshold(std::numeric_limits<float>::infinity());
      },
      C::INVALID_ARGUMENT, "threshold is not finite");
  add(
      "gallery not a valid id", [](v1::DetectRequest& r) { r.set_gallery("tab\there"); },
      C::INVALID_ARGUMENT, "gallery");
  add(
      "unknown gallery", [](v1::DetectRequest& r) { r.set_gallery("nobody-here"); }, C::NOT_FOUND,
      "gallery 'nobody-here' does not exist");
  add(
      "request_id too long",
      [](v1::DetectRequest& r) { r.set_request_id(std::string(kMaxRequestIdBytes + 1, 'x')); },
      C::INVALID_ARGUMENT, "request_id is 1025 bytes, over the limit of 1024 bytes");
  for (const Row& row : rows) {
    v1::DetectResponse response;
    grpc::Status s = Detect(row.request, &response);
    EXPECT_EQ(s.error_code(), row.code) << row.name << ": " << s.error_message();
    EXPECT_THAT(s.error_message(), HasSubstr(row.message)) << row.name;
  }
  // None of them reached the detector (the bad frames failed on the pool, before it).
  EXPECT_TRUE(fake_detector_.batch_sizes().empty());
  EXPECT_EQ(Metric("arcface_requests_total", {{"rpc", "Detect"}, {"code", "INVALID_ARGUMENT"}}),
            static_cast<double>(rows.size() - 1));
}

TEST_F(DetectTest, WithoutADetectorOrGalleriesAnswersUnimplementedSayingHowToEnableThem) {
  Start(/*detector=*/false, /*galleries=*/false);
  v1::DetectResponse response;
  grpc::Status s = Detect(DetectOf(MakeFrame(1, 1)), &response);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNIMPLEMENTED);
  EXPECT_THAT(s.error_message(), HasSubstr("--detector"));
  v1::ModelInfo info;
  grpc::ClientContext context;
  ASSERT_TRUE(stub_->GetModelInfo(&context, v1::GetModelInfoRequest(), &info).ok());
  EXPECT_FALSE(info.detector().enabled());
}

TEST_F(DetectTest, AGalleryWithoutGalleriesIsUnimplemented) {
  Start(/*detector=*/true, /*galleries=*/false);
  v1::DetectRequest request = DetectOf(MakeFrame(1, 1));
  request.set_gallery("staff");
  v1::DetectResponse response;
  grpc::Status s = Detect(request, &response);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNIMPLEMENTED);
  EXPECT_THAT(s.error_message(), HasSubstr("--gallery-store"));
}

TEST_F(DetectTest, GetModelInfoReportsTheDetector) {
  Start(true, true, /*max_batch_size=*/4, absl::Microseconds(1500), /*max_queue_size=*/32);
  v1::ModelInfo info;
  grpc::ClientContext context;
  ASSERT_TRUE(stub_->GetModelInfo(&context, v1::GetModelInfoRequest(), &info).ok());
  const v1::DetectorInfo& d = info.detector();
  EXPECT_TRUE(d.enabled());
  EXPECT_EQ(d.detector_id(), kDetectorId);
  EXPECT_EQ(d.detector(), "fake_boxes");
  EXPECT_EQ(d.landmarks(), "fake_points");
  EXPECT_EQ(d.weights_sha256(), std::string(64, 'b'));
  EXPECT_EQ(d.input_size(), 416u);
  EXPECT_FLOAT_EQ(d.default_min_score(), 0.5f);
  EXPECT_EQ(d.max_faces_per_frame(), 6u);
  EXPECT_EQ(d.device(), "cpu");
  EXPECT_EQ(d.batching().max_batch_size(), 4u);
  EXPECT_EQ(d.batching().max_queue_delay_us(), 1500u);
  EXPECT_EQ(d.batching().max_queue_size(), 32u);
  EXPECT_EQ(d.batching().max_batches_in_flight(), 1u);
}

TEST_F(DetectTest, ConcurrentCallersAreCoalescedIntoDetectorBatchesAndGetTheirOwnFaces) {
  // A long delay, so that the callers' frames meet in the queue.
  Start(true, true, /*max_batch_size=*/8, absl::Milliseconds(200));
  constexpr int kCallers = 32;
  std::vector<std::thread> callers;
  std::atomic<int> ok{0};
  for (int c = 0; c < kCallers; ++c) {
    callers.emplace_back([&, c] {
      auto stub = v1::FaceEmbedding::NewStub(grpc::CreateChannel(
          absl::StrCat("127.0.0.1:", port_), grpc::InsecureChannelCredentials()));
      const cv::Mat frame = MakeFrame(c % 6, c);
      v1::DetectResponse response;
      grpc::ClientContext context;
      context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(60)));
      grpc::Status s =
          stub->Detect(&context, DetectOf(frame, absl::StrCat("caller-", c)), &response);
      ASSERT_TRUE(s.ok()) << s.error_message();
      EXPECT_EQ(response.request_id(), absl::StrCat("caller-", c));
      ExpectFaces(response, Filtered(FacesIn(frame), {0.5f, 0, 6}), absl::StrCat("caller ", c));
      ++ok;
    });
  }
  for (std::thread& t : callers) t.join();
  EXPECT_EQ(ok.load(), kCallers);
  const batching::BatcherCounters counters = frame_detector_->batcher().counters();
  EXPECT_EQ(counters.items_batched, kCallers);
  EXPECT_LT(counters.batches, kCallers);
  int largest = 0;
  for (int size : fake_detector_.batch_sizes()) largest = std::max(largest, size);
  EXPECT_GT(largest, 1);
  EXPECT_LE(largest, 8);
  // The histogram says the same: batches of more than one frame.
  EXPECT_EQ(Metric("arcface_detector_batch_size_count"), counters.batches);
  EXPECT_LT(Metric("arcface_detector_batch_size_bucket", {{"le", "1"}}), counters.batches);
  EXPECT_EQ(Metric("arcface_detector_batch_size_sum"), kCallers);
}

TEST_F(DetectTest, EmbedEqualsEmbedWithTheReturnedLandmarks) {
  Start();
  const cv::Mat frame = MakeFrame(4, 9);
  v1::DetectRequest request = DetectOf(frame);
  request.set_embed(true);
  request.set_normalize(true);
  v1::DetectResponse detected;
  ASSERT_TRUE(Detect(request, &detected).ok());
  ASSERT_EQ(detected.faces_size(), 4);
  EXPECT_EQ(detected.model_id(), "arcface-r50@0123456789ab");
  v1::EmbedRequest embed;
  embed.set_normalize(true);
  for (const v1::DetectedFace& f : detected.faces()) {
    v1::Face* face = embed.add_faces();
    *face->mutable_image() = RawImage(frame);
    *face->mutable_landmarks() = f.landmarks();
  }
  v1::EmbedResponse embedded;
  grpc::ClientContext context;
  ASSERT_TRUE(stub_->Embed(&context, embed, &embedded).ok());
  for (int i = 0; i < 4; ++i) {
    const v1::Embedding& a = detected.faces(i).embedding();
    const v1::Embedding& b = embedded.embeddings(i);
    ASSERT_EQ(a.values_size(), kEmbeddingDim);
    EXPECT_EQ(a.norm(), b.norm()) << "face " << i;
    EXPECT_TRUE(std::equal(a.values().begin(), a.values().end(), b.values().begin()))
        << "face " << i;
  }
  // Different faces, different crops: the embeddings differ.
  EXPECT_NE(detected.faces(0).embedding().values(0), detected.faces(1).embedding().values(0));
  // A frame without faces embeds nothing and is still OK.
  request = DetectOf(MakeFrame(0, 2));
  request.set_embed(true);
  ASSERT_TRUE(Detect(request, &detected).ok());
  EXPECT_EQ(detected.faces_size(), 0);
}

TEST_F(DetectTest, WithAGalleryEachFaceIsIdentified) {
  Start();
  const cv::Mat frame = MakeFrame(3, 4);
  v1::DetectRequest request = DetectOf(frame);
  request.set_embed(true);
  v1::DetectResponse detected;
  ASSERT_TRUE(Detect(request, &detected).ok());
  ASSERT_EQ(detected.faces_size(), 3);
  // Each face enrolled as its own subject.
  for (int i = 0; i < 3; ++i) {
    gallery::EnrollWrite write;
    write.gallery = "staff";
    write.model_id = "arcface-r50@0123456789ab";
    write.subject_id = absl::StrCat("person-", i);
    write.face_ids = {absl::StrCat("face-", i)};
    write.embeddings.resize(kEmbeddingDim);
    ASSERT_TRUE(ToUnit(detected.faces(i).embedding().values().data(), kEmbeddingDim,
                       write.embeddings.data()));
    ASSERT_TRUE(galleries_->Enroll(write).ok());
  }
  request.set_embed(false);  // a gallery implies it
  request.set_gallery("staff");
  request.set_top_k(2);
  request.set_threshold(-1);  // every candidate
  v1::DetectResponse identified;
  ASSERT_TRUE(Detect(request, &identified).ok());
  ASSERT_EQ(identified.faces_size(), 3);
  EXPECT_EQ(identified.threshold(), -1);
  for (int i = 0; i < 3; ++i) {
    const v1::Identification& id = identified.faces(i).identification();
    ASSERT_EQ(id.candidates_size(), 2) << "face " << i;
    EXPECT_EQ(id.candidates(0).subject_id(), absl::StrCat("person-", i));
    EXPECT_EQ(id.candidates(0).face_id(), absl::StrCat("face-", i));
    EXPECT_NEAR(id.candidates(0).similarity(), 1.0, 1e-5);
    EXPECT_LT(id.candidates(1).similarity(), id.candidates(0).similarity());
    EXPECT_EQ(identified.faces(i).embedding().values_size(), kEmbeddingDim);
  }
  // Without a threshold: the model's (ArcFace's 0.4), which only some others reach.
  request.clear_threshold();
  v1::DetectResponse by_default;
  ASSERT_TRUE(Detect(request, &by_default).ok());
  ASSERT_TRUE(by_default.has_threshold());
  EXPECT_FLOAT_EQ(by_default.threshold(), 0.4f);
  int cut = 0;
  for (int i = 0; i < 3; ++i) {
    const v1::Identification& all = identified.faces(i).identification();
    std::vector<std::string> want;
    for (const v1::Candidate& c : all.candidates()) {
      if (c.similarity() >= 0.4f) want.push_back(c.subject_id());
    }
    cut += all.candidates_size() - static_cast<int>(want.size());
    std::vector<std::string> got;
    for (const v1::Candidate& c : by_default.faces(i).identification().candidates()) {
      got.push_back(c.subject_id());
    }
    EXPECT_EQ(got, want) << "face " << i;
  }
  EXPECT_GT(cut, 0) << "the default threshold must cut a candidate here";
  // A threshold above every other subject's similarity leaves each face only itself.
  request.set_threshold(0.999f);
  ASSERT_TRUE(Detect(request, &identified).ok());
  EXPECT_FLOAT_EQ(identified.threshold(), 0.999f);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(identified.faces(i).identification().candidates_size(), 1);
  }
}

TEST_F(DetectTest, AHeldDetectorLetsDeadlinesPassAndTheFrameNeverReachesIt) {
  Start(true, true, /*max_batch_size=*/1, absl::ZeroDuration());
  fake_detector_.Hold();
  // The first frame enters the (held) detector; the second waits in its queue and expires.
  std::thread first([&] {
    v1::DetectResponse response;
    EXPECT_TRUE(Detect(DetectOf(MakeFrame(1, 1)), &response).ok());
  });
  ASSERT_TRUE(fake_detector_.WaitForBatches(1));
  v1::DetectResponse response;
  grpc::Status s = Detect(DetectOf(MakeFrame(2, 2)), &response, absl::Milliseconds(500));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  // The server's deadline is the client's plus the transit: wait until the server has ended
  // the call too (at its deadline the call is both expired, on the batcher's clock, and
  // cancelled, by gRPC; either ends it) before the detector is free again.
  auto ended = [&] {
    return Metric("arcface_requests_total", {{"rpc", "Detect"}, {"code", "DEADLINE_EXCEEDED"}}) +
           Metric("arcface_requests_total", {{"rpc", "Detect"}, {"code", "CANCELLED"}});
  };
  for (const absl::Time end = absl::Now() + absl::Seconds(30); ended() < 1 && absl::Now() < end;) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  ASSERT_EQ(ended(), 1);
  fake_detector_.Release();
  first.join();
  ASSERT_TRUE(frame_detector_->batcher().WaitUntilIdle());
  EXPECT_EQ(fake_detector_.batch_sizes(), std::vector<int>({1}));
  // It left the detector's queue (or, on a slow machine, never got past the pool).
  const batching::BatcherCounters counters = frame_detector_->batcher().counters();
  EXPECT_EQ(counters.items_dropped +
                Metric("arcface_preprocess_aborted_total", {{"reason", "deadline"}}) +
                Metric("arcface_preprocess_aborted_total", {{"reason", "cancelled"}}),
            1);
}

// Decoded frames wait in the detector's queue; their bytes are bounded over all calls, so many
// callers of large frames cannot hold unbounded memory.
TEST_F(DetectTest, DecodedFramesHeldAtOnceAreBoundedAndALoneLargeFrameStillRuns) {
  const int64_t frame_bytes = int64_t{kFrameWidth} * kFrameHeight * 3;
  max_held_frame_bytes_ = frame_bytes + frame_bytes / 2;  // one frame fits, two do not
  Start(true, true, /*max_batch_size=*/1, absl::ZeroDuration());
  fake_detector_.Hold();
  std::thread first([&] {
    v1::DetectResponse response;
    EXPECT_TRUE(Detect(DetectOf(MakeFrame(1, 1)), &response).ok());
  });
  ASSERT_TRUE(fake_detector_.WaitForBatches(1));
  EXPECT_EQ(frame_detector_->held_frame_bytes(), frame_bytes);
  v1::DetectResponse response;
  grpc::Status refused = Detect(DetectOf(MakeFrame(2, 2)), &response);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(refused.error_message(), HasSubstr("--detector-max-held-mib"));
  fake_detector_.Release();
  first.join();
  // Given back with the call: the next frame runs; so does one larger than the whole bound,
  // alone.
  for (const absl::Time end = absl::Now() + absl::Seconds(10);
       frame_detector_->held_frame_bytes() != 0 && absl::Now() < end;) {
    absl::SleepFor(absl::Milliseconds(2));
  }
  EXPECT_EQ(frame_detector_->held_frame_bytes(), 0);
  EXPECT_TRUE(Detect(DetectOf(MakeFrame(2, 2)), &response).ok());
  cv::Mat large;
  cv::resize(MakeFrame(1, 3), large, cv::Size(kFrameWidth * 2, kFrameHeight * 2));
  large.at<cv::Vec3b>(0, 0) = cv::Vec3b(1, 3, 0);
  EXPECT_TRUE(Detect(DetectOf(large), &response).ok());
}

TEST(FrameDetector, ExpiredAndCancelledFramesNeverReachTheModelAndFailuresFailTheirBatch) {
  FakeDetector model;
  batching::FakeClock clock;
  batching::DynamicBatcher::Options options;
  options.max_batch_size = 4;
  options.max_queue_size = 8;
  options.start_batch_thread = false;
  auto detector = FrameDetector::Create(options, &model, DetectorDescription(), nullptr, &clock);
  ASSERT_TRUE(detector.ok());
  auto prepared = [&](int faces) {
    return *model.Prepare(MakeFrame(faces, faces), DetectFilter{0.5f, 0, 6});
  };
  absl::StatusOr<std::vector<DetectedBox>> expired, cancelled, kept;
  ASSERT_TRUE((*detector)
                  ->Submit(prepared(1), clock.Now() + absl::Milliseconds(1), nullptr,
                           [&](auto r) { expired = std::move(r); })
                  .ok());
  ASSERT_TRUE((*detector)
                  ->Submit(
                      prepared(2), absl::InfiniteFuture(), [] { return true; },
                      [&](auto r) { cancelled = std::move(r); })
                  .ok());
  ASSERT_TRUE((*detector)
                  ->Submit(prepared(3), absl::InfiniteFuture(), nullptr,
                           [&](auto r) { kept = std::move(r); })
                  .ok());
  clock.Advance(absl::Milliseconds(5));
  EXPECT_EQ(*(*detector)->batcher().RunOnce(), 1);
  EXPECT_EQ(expired.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(cancelled.status().code(), absl::StatusCode::kCancelled);
  ASSERT_TRUE(kept.ok()) << kept.status();
  EXPECT_EQ(kept->size(), 3u);
  EXPECT_EQ(model.batch_sizes(), std::vector<int>({1}));
  // The model's failure fails the frames of its batch, with its status.
  model.FailNext(absl::InternalError("detector broke"));
  absl::StatusOr<std::vector<DetectedBox>> failed;
  ASSERT_TRUE((*detector)
                  ->Submit(prepared(1), absl::InfiniteFuture(), nullptr,
                           [&](auto r) { failed = std::move(r); })
                  .ok());
  clock.Advance(absl::Milliseconds(5));
  EXPECT_EQ(*(*detector)->batcher().RunOnce(), 1);
  EXPECT_EQ(failed.status().code(), absl::StatusCode::kInternal);
  EXPECT_THAT(failed.status().message(), HasSubstr("detector broke"));
}

TEST_F(DetectTest, StreamAnswersEveryFrameInOrderWithPerFrameErrors) {
  Start(true, true, /*max_batch_size=*/8, absl::Milliseconds(2));
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(60)));
  auto stream = stub_->DetectStream(&context);
  constexpr int kFrames = 60;
  std::thread writer([&] {
    for (int i = 0; i < kFrames; ++i) {
      v1::DetectRequest request = DetectOf(MakeFrame(i % 5, i), absl::StrCat("f", i));
      if (i % 7 == 3) request.mutable_image()->set_encoded("garbage");
      if (i % 11 == 5) request.set_min_score(2);
      if (!stream->Write(request)) break;
    }
    stream->WritesDone();
  });
  int answered = 0;
  v1::DetectResponse response;
  while (stream->Read(&response)) {
    const int i = answered++;
    EXPECT_EQ(response.request_id(), absl::StrCat("f", i));
    EXPECT_EQ(response.detector_id(), kDetectorId);
    if (i % 11 == 5) {  // checked first, on the gRPC thread
      EXPECT_EQ(response.error().code(), grpc::StatusCode::INVALID_ARGUMENT) << i;
      EXPECT_THAT(response.error().message(), HasSubstr("min_score is 2")) << i;
    } else if (i % 7 == 3) {
      EXPECT_EQ(response.error().code(), grpc::StatusCode::INVALID_ARGUMENT) << i;
      EXPECT_THAT(response.error().message(), HasSubstr("image: ")) << i;
      EXPECT_EQ(response.faces_size(), 0);
    } else {
      EXPECT_FALSE(response.has_error()) << i << ": " << response.error().message();
      ExpectFaces(response, Filtered(FacesIn(MakeFrame(i % 5, i)), {0.5f, 0, 6}),
                  absl::StrCat("frame ", i));
    }
  }
  writer.join();
  grpc::Status s = stream->Finish();
  EXPECT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(answered, kFrames);
  // 60 frames, 9 undecodable, 5 with a bad min_score, one of them both.
  EXPECT_EQ(Metric("arcface_requests_total", {{"rpc", "DetectStream"}, {"code", "OK"}}), 47);
}

TEST_F(DetectTest, StreamWithoutADetectorAnswersEachFrameUnimplemented) {
  Start(/*detector=*/false);
  grpc::ClientContext context;
  auto stream = stub_->DetectStream(&context);
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(stream->Write(DetectOf(MakeFrame(1, i), "x")));
  stream->WritesDone();
  v1::DetectResponse response;
  int answered = 0;
  while (stream->Read(&response)) {
    ++answered;
    EXPECT_EQ(response.error().code(), grpc::StatusCode::UNIMPLEMENTED);
    EXPECT_THAT(response.error().message(), HasSubstr("--detector"));
    EXPECT_EQ(response.request_id(), "x");
  }
  EXPECT_EQ(answered, 3);
  EXPECT_TRUE(stream->Finish().ok());
}

}  // namespace
}  // namespace arcface::service
