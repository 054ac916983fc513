// Several models in one service (served_models.h): two fakes of different families side by side,
// ArcFace's shapes (112×112 crops, 512-d rows, the default) and a dlib-like one (150×150, 128-d),
// each with its own Embedder, through a real in-process gRPC server on 127.0.0.1:0 with a SQLite
// gallery and the fake detector. Every expected value is computed here from the fakes' rules.
#include <grpcpp/grpcpp.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "arcface/v1/face_embedding.grpc.pb.h"
#include "arcface/v1/face_gallery.grpc.pb.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/gallery/galleries.h"
#include "server/gallery/gallery_store.h"
#include "server/image/image.h"
#include "server/service/detector_metrics.h"
#include "server/service/embedder.h"
#include "server/service/face_embedding_service.h"
#include "server/service/face_gallery_service.h"
#include "server/service/frame_detector.h"
#include "server/service/gallery_metrics.h"
#include "server/service/served_models.h"
#include "server/service/service_metrics.h"
#include "server/service/work_queue.h"
#include "tests/service/fake_detector.h"
#include "tests/service/fake_model.h"
#include "tests/test_util/exposition.h"

namespace arcface::service {
namespace {

using ::testing::HasSubstr;
namespace v1 = ::arcface::v1;

constexpr char kArcFaceId[] = "arcface-r50@0123456789ab";
constexpr char kDlibId[] = "dlib-resnet@fedcba987654";
constexpr int kDlibDim = 128;

// An image of `size`² whose pixels depend on `seed`: sent raw, it is resized whole.
cv::Mat Picture(int size, int seed) {
  cv::Mat rgb(size, size, CV_8UC3);
  for (int y = 0; y < size; ++y) {
    for (int x = 0; x < size; ++x) {
      rgb.at<cv::Vec3b>(y, x) = cv::Vec3b(uint8_t((x * 3 + seed * 7) & 255),
                                          uint8_t((y * 5 + seed) & 255), uint8_t((x ^ y) & 255));
    }
  }
  return rgb;
}

v1::Face FaceOf(const cv::Mat& rgb) {
  v1::Face face;
  *face.mutable_image() = RawImage(rgb);
  return face;
}

// The unit vector the fake of `geometry`/`dim` computes for a picture resized whole.
std::vector<float> ExpectedUnit(const cv::Mat& rgb, const model::CropGeometry& geometry, int dim) {
  absl::StatusOr<image::Crop> crop = image::ResizeWhole(rgb, geometry);
  EXPECT_TRUE(crop.ok()) << crop.status();
  std::vector<float> e = FakeEmbedding(crop->data(), geometry.bytes(), dim);
  const double n = Norm(e);
  for (float& v : e) v = static_cast<float>(v / n);
  return e;
}

double Dot(const std::vector<float>& a, const std::vector<float>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += double(a[i]) * b[i];
  return s;
}

class ModelsTest : public ::testing::Test {
 protected:
  // `dlib_queue`: the dlib model's batcher queue, in crops.
  void Start(int dlib_queue = 64) {
    metrics_ = std::make_unique<ServiceMetrics>(8, std::vector<std::string>{"arcface", "dlib"});
    detector_metrics_ = std::make_unique<DetectorMetrics>(&metrics_->registry(), 8);
    gallery_metrics_ = std::make_unique<GalleryMetrics>(&metrics_->registry());
    pool_ = *WorkQueue::Create(2, 256);
    gallery_queue_ = *WorkQueue::Create(1, 256);
    service_ =
        std::make_unique<FaceEmbeddingService>(ServiceOptions(), metrics_.get(), pool_.get());
    gallery_service_ = std::make_unique<FaceGalleryService>(
        service_->env(), GalleryServiceOptions(), gallery_queue_.get(), gallery_metrics_.get());
    store_path_ = absl::StrCat(::testing::TempDir(), "/models_test_", ::getpid(), ".db");
    std::remove(store_path_.c_str());
    auto store = gallery::OpenGalleryStore("sqlite:" + store_path_);
    ASSERT_TRUE(store.ok()) << store.status();
    galleries_ = *gallery::Galleries::Open(*std::move(store), gallery::GalleriesOptions());
    gallery_service_->SetGalleries(galleries_.get());

    for (int i = 0; i < 2; ++i) {
      EmbedderOptions eo;
      eo.batching.max_batch_size = 4;
      eo.batching.max_queue_size = i == 0 ? 64 : dlib_queue;
      eo.batching.max_queue_delay = absl::Milliseconds(1);
      eo.batching.observer = metrics_->ForModel(i == 0 ? "arcface" : "dlib");
      embedders_[i] = *Embedder::Create(eo, i == 0 ? &arcface_ : &dlib_);
      Embedder* e = embedders_[i].get();
      metrics_->ForModel(i == 0 ? "arcface" : "dlib")->SetQueueDepthSource([e] {
        return double(e->batcher().queue_depth());
      });
    }
    batching::DynamicBatcher::Options bo;
    bo.max_batch_size = 4;
    bo.max_queue_delay = absl::Milliseconds(1);
    bo.max_queue_size = 64;
    DetectorDescription description;
    description.detector_id = "fake@0";
    description.default_min_score = 0.5f;
    description.max_faces_per_frame = 6;
    frame_detector_ = *FrameDetector::Create(bo, &detector_, description, detector_metrics_.get(),
                                             nullptr, int64_t{1} << 30);
    service_->SetDetection(frame_detector_.get(), gallery_service_->search());

    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    builder.RegisterService(service_.get());
    builder.RegisterService(gallery_service_.get());
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);

    ModelDescription arcface;
    arcface.name = "arcface";
    arcface.arch = "r50";
    arcface.model_id = kArcFaceId;
    ModelDescription dlib;
    dlib.name = "dlib";
    dlib.family = "dlib";
    dlib.metric = "euclidean";
    dlib.default_threshold = kDlibCosineThreshold;
    dlib.arch = "resnet34";
    dlib.model_id = kDlibId;
    // As the server publishes each model's version (the requests' model label follows it).
    metrics_->ForModel("arcface")->SetModelInfo(arcface.arch, arcface.model_id, "cpu", "fp32");
    metrics_->ForModel("dlib")->SetModelInfo(dlib.arch, dlib.model_id, "cpu", "fp32");
    service_->SetReady(
        {{arcface, embedders_[0].get(), nullptr}, {dlib, embedders_[1].get(), nullptr}});
    auto channel =
        grpc::CreateChannel(absl::StrCat("127.0.0.1:", port_), grpc::InsecureChannelCredentials());
    stub_ = v1::FaceEmbedding::NewStub(channel);
    gallery_stub_ = v1::FaceGallery::NewStub(channel);
  }

  void TearDown() override {
    arcface_.Release();
    dlib_.Release();
    if (server_) server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
    if (frame_detector_) frame_detector_->Shutdown();
    for (auto& e : embedders_) {
      if (e) e->Shutdown();
    }
    if (pool_) pool_->Shutdown();
    if (gallery_queue_) gallery_queue_->Shutdown();
    galleries_.reset();
    if (!store_path_.empty()) std::remove(store_path_.c_str());
  }

  template <typename Call>
  grpc::Status Timed(Call call, absl::Duration timeout = absl::Seconds(30)) {
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
    return call(&context);
  }
  grpc::Status Embed(const v1::EmbedRequest& r, v1::EmbedResponse* out) {
    return Timed([&](grpc::ClientContext* c) { return stub_->Embed(c, r, out); });
  }

  double Metric(const std::string& name, const std::map<std::string, std::string>& labels) {
    std::map<std::string, std::string> types;
    for (const test_util::Sample& s : test_util::ParseExposition(metrics_->Render(), &types)) {
      if (s.name == name && s.labels == labels) return s.value;
    }
    return 0;
  }

  // The batcher reports a batch just after its calls got their answers: waits for `want`.
  double WaitForMetric(const std::string& name, const std::map<std::string, std::string>& labels,
                       double want) {
    const absl::Time end = absl::Now() + absl::Seconds(30);
    while (Metric(name, labels) != want && absl::Now() < end) {
      absl::SleepFor(absl::Milliseconds(1));
    }
    return Metric(name, labels);
  }

  FakeModel arcface_;
  FakeModel dlib_{kFakeDlibCrop, kDlibDim};
  FakeDetector detector_;
  std::unique_ptr<ServiceMetrics> metrics_;
  std::unique_ptr<DetectorMetrics> detector_metrics_;
  std::unique_ptr<GalleryMetrics> gallery_metrics_;
  std::unique_ptr<WorkQueue> pool_;
  std::unique_ptr<WorkQueue> gallery_queue_;
  std::string store_path_;
  std::unique_ptr<gallery::Galleries> galleries_;
  std::unique_ptr<Embedder> embedders_[2];
  std::unique_ptr<FrameDetector> frame_detector_;
  std::unique_ptr<FaceEmbeddingService> service_;
  std::unique_ptr<FaceGalleryService> gallery_service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<v1::FaceEmbedding::Stub> stub_;
  std::unique_ptr<v1::FaceGallery::Stub> gallery_stub_;
  int port_ = 0;
};

TEST_F(ModelsTest, ListModelsAndModelInfoDescribeEachModel) {
  Start();
  v1::ListModelsResponse list;
  ASSERT_TRUE(Timed([&](grpc::ClientContext* c) {
                return stub_->ListModels(c, v1::ListModelsRequest(), &list);
              }).ok());
  ASSERT_EQ(list.models_size(), 2);
  const v1::ModelInfo& a = list.models(0);
  const v1::ModelInfo& d = list.models(1);
  EXPECT_EQ(a.name(), "arcface");
  EXPECT_TRUE(a.is_default());
  EXPECT_EQ(a.model_id(), kArcFaceId);
  EXPECT_EQ(a.family(), "arcface");
  EXPECT_EQ(a.metric(), "cosine");
  EXPECT_FLOAT_EQ(a.default_threshold(), 0.4f);
  EXPECT_EQ(a.embedding_dim(), 512u);
  EXPECT_EQ(a.input_size(), 112u);
  EXPECT_EQ(d.name(), "dlib");
  EXPECT_FALSE(d.is_default());
  EXPECT_EQ(d.model_id(), kDlibId);
  EXPECT_EQ(d.family(), "dlib");
  EXPECT_EQ(d.metric(), "euclidean");
  EXPECT_FLOAT_EQ(d.default_threshold(), kDlibCosineThreshold);
  EXPECT_EQ(d.embedding_dim(), 128u);
  EXPECT_EQ(d.input_size(), 150u);
  EXPECT_EQ(d.batching().max_queue_size(), 64u);

  for (const std::string& name : {std::string(""), std::string("dlib")}) {
    v1::GetModelInfoRequest request;
    request.set_model(name);
    v1::ModelInfo info;
    ASSERT_TRUE(
        Timed([&](grpc::ClientContext* c) { return stub_->GetModelInfo(c, request, &info); }).ok());
    EXPECT_EQ(info.model_id(), name.empty() ? kArcFaceId : kDlibId);
  }
  v1::GetModelInfoRequest unknown;
  unknown.set_model("r100");
  v1::ModelInfo info;
  grpc::Status s =
      Timed([&](grpc::ClientContext* c) { return stub_->GetModelInfo(c, unknown, &info); });
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(s.error_message(),
            "model 'r100' is not served here; this server serves: arcface (default), dlib");
}

TEST_F(ModelsTest, EmbedIsRoutedByNameWithEachModelsGeometryAndSize) {
  Start();
  const cv::Mat picture = Picture(90, 1);
  for (const std::string& name : {std::string(""), std::string("arcface"), std::string("dlib")}) {
    v1::EmbedRequest request;
    *request.add_faces() = FaceOf(picture);
    request.set_normalize(true);
    request.set_model(name);
    v1::EmbedResponse response;
    grpc::Status s = Embed(request, &response);
    ASSERT_TRUE(s.ok()) << name << ": " << s.error_message();
    const bool dlib = name == "dlib";
    EXPECT_EQ(response.model_id(), dlib ? kDlibId : kArcFaceId) << name;
    const std::vector<float> want = dlib ? ExpectedUnit(picture, kFakeDlibCrop, kDlibDim)
                                         : ExpectedUnit(picture, model::kArcFaceCrop, 512);
    ASSERT_EQ(response.embeddings(0).values_size(), static_cast<int>(want.size())) << name;
    for (size_t j = 0; j < want.size(); ++j) {
      EXPECT_NEAR(response.embeddings(0).values(j), want[j], 1e-6) << name << " value " << j;
    }
  }
  // Each model's batches went to its own fake, with its own crop size.
  EXPECT_EQ(arcface_.batch_sizes().size(), 2u);
  EXPECT_EQ(dlib_.batch_sizes().size(), 1u);
  v1::EmbedRequest unknown;
  *unknown.add_faces() = FaceOf(picture);
  unknown.set_model("Dlib");
  v1::EmbedResponse response;
  grpc::Status s = Embed(unknown, &response);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_THAT(s.error_message(), HasSubstr("model 'Dlib' is not served here; this server serves: "
                                           "arcface (default), dlib"));
}

TEST_F(ModelsTest, CompareUsesOneModelAndRefusesAnothersEmbeddings) {
  Start();
  const cv::Mat p1 = Picture(80, 2), p2 = Picture(80, 3);
  const std::vector<float> e2 = ExpectedUnit(p2, kFakeDlibCrop, kDlibDim);
  v1::CompareRequest request;
  request.set_model("dlib");
  *request.add_queries()->mutable_face() = FaceOf(p1);
  v1::Probe* given = request.add_references();
  given->mutable_embedding()->mutable_values()->Assign(e2.begin(), e2.end());
  given->set_model_id(kDlibId);
  v1::CompareResponse response;
  grpc::Status s =
      Timed([&](grpc::ClientContext* c) { return stub_->Compare(c, request, &response); });
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(response.model_id(), kDlibId);
  ASSERT_EQ(response.similarities_size(), 1);
  EXPECT_NEAR(response.similarities(0), Dot(ExpectedUnit(p1, kFakeDlibCrop, kDlibDim), e2), 1e-5);

  // An embedding of the other model: refused, naming both.
  given->set_model_id(kArcFaceId);
  s = Timed([&](grpc::ClientContext* c) { return stub_->Compare(c, request, &response); });
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(s.error_message(), absl::StrCat("reference 0: an embedding of model ", kArcFaceId,
                                            ", but this call uses model ", kDlibId,
                                            "; embeddings of two models are never compared"));
  // The default model wants 512 values.
  request.clear_model();
  given->clear_model_id();
  s = Timed([&](grpc::ClientContext* c) { return stub_->Compare(c, request, &response); });
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(s.error_message(), "reference 0: embedding has 128 values, expected 512");
}

TEST_F(ModelsTest, DetectAlignsAndEmbedsWithTheRequestedModel) {
  Start();
  const cv::Mat frame = MakeFrame(3, 4);
  for (const std::string& name : {std::string(""), std::string("dlib")}) {
    v1::DetectRequest request;
    *request.mutable_image() = RawImage(frame);
    request.set_embed(true);
    request.set_model(name);
    v1::DetectResponse response;
    grpc::Status s =
        Timed([&](grpc::ClientContext* c) { return stub_->Detect(c, request, &response); });
    ASSERT_TRUE(s.ok()) << s.error_message();
    const bool dlib = name == "dlib";
    EXPECT_EQ(response.model_id(), dlib ? kDlibId : kArcFaceId);
    const model::CropGeometry& geometry = dlib ? kFakeDlibCrop : model::kArcFaceCrop;
    const std::vector<DetectedBox> faces = Filtered(FacesIn(frame), {0.5f, 0, 6});
    ASSERT_EQ(response.faces_size(), static_cast<int>(faces.size()));
    for (int i = 0; i < response.faces_size(); ++i) {
      absl::StatusOr<image::Crop> crop = image::AlignFace(frame, faces[i].landmarks, geometry);
      ASSERT_TRUE(crop.ok());
      const std::vector<float> want =
          FakeEmbedding(crop->data(), geometry.bytes(), dlib ? kDlibDim : 512);
      ASSERT_EQ(response.faces(i).embedding().values_size(), static_cast<int>(want.size()));
      for (size_t j = 0; j < want.size(); ++j) {
        ASSERT_EQ(response.faces(i).embedding().values(j), want[j]) << name << " face " << i;
      }
    }
  }
  v1::DetectRequest request;
  *request.mutable_image() = RawImage(frame);
  request.set_model("nope");
  v1::DetectResponse response;
  grpc::Status s =
      Timed([&](grpc::ClientContext* c) { return stub_->Detect(c, request, &response); });
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND);
}

// A gallery belongs to the model of its first enrollment: its face probes are embedded by that
// model, whatever the default, and another model's faces or embeddings are refused.
TEST_F(ModelsTest, AGalleryIsEmbeddedByItsOwnModel) {
  Start();
  const cv::Mat ann = Picture(70, 5), bob = Picture(70, 6);
  v1::EnrollRequest enroll;
  enroll.set_gallery("g");
  enroll.set_subject_id("ann");
  enroll.set_model("dlib");
  *enroll.add_faces()->mutable_face() = FaceOf(ann);
  v1::EnrollResponse enrolled;
  grpc::Status s =
      Timed([&](grpc::ClientContext* c) { return gallery_stub_->Enroll(c, enroll, &enrolled); });
  ASSERT_TRUE(s.ok()) << s.error_message();
  enroll.set_subject_id("bob");
  enroll.clear_model();  // the gallery's own model from now on
  *enroll.mutable_faces(0)->mutable_face() = FaceOf(bob);
  s = Timed([&](grpc::ClientContext* c) { return gallery_stub_->Enroll(c, enroll, &enrolled); });
  ASSERT_TRUE(s.ok()) << s.error_message();
  v1::GalleryInfo info;
  v1::GetGalleryInfoRequest which;
  which.set_gallery("g");
  ASSERT_TRUE(Timed([&](grpc::ClientContext* c) {
                return gallery_stub_->GetGalleryInfo(c, which, &info);
              }).ok());
  EXPECT_EQ(info.model_id(), kDlibId);
  EXPECT_EQ(info.num_faces(), 2u);

  v1::IdentifyRequest identify;
  identify.set_gallery("g");
  identify.set_top_k(2);
  identify.set_threshold(-1);  // every candidate
  *identify.add_probes()->mutable_face() = FaceOf(bob);
  v1::IdentifyResponse found;
  s = Timed([&](grpc::ClientContext* c) { return gallery_stub_->Identify(c, identify, &found); });
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(found.model_id(), kDlibId);
  EXPECT_EQ(found.threshold(), -1);
  ASSERT_EQ(found.results(0).candidates_size(), 2);
  EXPECT_EQ(found.results(0).candidates(0).subject_id(), "bob");
  EXPECT_NEAR(found.results(0).candidates(0).similarity(), 1.0, 1e-5);
  EXPECT_NEAR(
      found.results(0).candidates(1).similarity(),
      Dot(ExpectedUnit(ann, kFakeDlibCrop, kDlibDim), ExpectedUnit(bob, kFakeDlibCrop, kDlibDim)),
      1e-5);

  // Another model's faces: refused, naming both.
  enroll.set_model("arcface");
  s = Timed([&](grpc::ClientContext* c) { return gallery_stub_->Enroll(c, enroll, &enrolled); });
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(s.error_message(), absl::StrCat("the gallery is bound to model ", kDlibId,
                                            " but model 'arcface' computes ", kArcFaceId));
  // A gallery of a model this server does not serve takes its embeddings, never faces.
  v1::EnrollRequest foreign;
  foreign.set_gallery("u");
  foreign.set_subject_id("x");
  foreign.set_model_id("facenet@000000000000");
  foreign.add_faces()->mutable_embedding()->mutable_values()->Resize(64, 0.5f);
  s = Timed([&](grpc::ClientContext* c) { return gallery_stub_->Enroll(c, foreign, &enrolled); });
  ASSERT_TRUE(s.ok()) << s.error_message();
  v1::IdentifyRequest by_face;
  by_face.set_gallery("u");
  *by_face.add_probes()->mutable_face() = FaceOf(ann);
  s = Timed([&](grpc::ClientContext* c) { return gallery_stub_->Identify(c, by_face, &found); });
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(s.error_message(),
            absl::StrCat("the gallery is bound to model facenet@000000000000, which this server "
                         "does not serve (it embeds faces with ",
                         kArcFaceId, " ('arcface'), ", kDlibId,
                         " ('dlib')); send embeddings of that model instead of faces"));
  // Its own embeddings (64 values, the size it was enrolled with) are identified.
  v1::IdentifyRequest by_embedding;
  by_embedding.set_gallery("u");
  by_embedding.set_model_id("facenet@000000000000");
  by_embedding.add_probes()->mutable_embedding()->mutable_values()->Resize(64, 0.5f);
  s = Timed(
      [&](grpc::ClientContext* c) { return gallery_stub_->Identify(c, by_embedding, &found); });
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_NEAR(found.results(0).candidates(0).similarity(), 1.0, 1e-5);
  EXPECT_FALSE(found.has_threshold());  // no served model of its family: no cut

  // Detect against the gallery embeds with the gallery's model too.
  v1::DetectRequest detect;
  *detect.mutable_image() = RawImage(MakeFrame(2, 7));
  detect.set_gallery("g");
  detect.set_threshold(-1);
  v1::DetectResponse detected;
  s = Timed([&](grpc::ClientContext* c) { return stub_->Detect(c, detect, &detected); });
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(detected.model_id(), kDlibId);
  ASSERT_EQ(detected.faces_size(), 2);
  EXPECT_EQ(detected.faces(0).embedding().values_size(), kDlibDim);
  EXPECT_EQ(detected.faces(0).identification().candidates_size(), 1);
}

// Identify and Detect without a threshold cut at the model's own: a candidate just above it is a
// match, one just below is not, for an ArcFace gallery (0.4), a dlib one (0.9144) and one of an
// ArcFace and a dlib model this server does not serve (their family's); none for a model of
// another family.
TEST_F(ModelsTest, AnUnsetThresholdIsTheModelsOwn) {
  Start();
  struct Case {
    std::string model_id;
    int dim;
    std::optional<float> threshold;  // the one expected
  };
  const Case cases[] = {{kArcFaceId, model::kEmbeddingDim, 0.4f},
                        {kDlibId, kDlibDim, kDlibCosineThreshold},
                        {"arcface-r100@000000000000", model::kEmbeddingDim, 0.4f},
                        {"dlib-resnet@000000000000", kDlibDim, kDlibCosineThreshold},
                        {"other@000000000000", 64, std::nullopt}};
  // A unit vector at cosine `c` from the first axis.
  auto at = [](int dim, double c, v1::Probe* probe) {
    auto* values = probe->mutable_embedding()->mutable_values();
    values->Resize(dim, 0.0f);
    values->Set(0, static_cast<float>(c));
    values->Set(1, static_cast<float>(std::sqrt(1 - c * c)));
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.model_id);
    const std::string gallery = absl::StrCat("t", &c - cases);
    v1::EnrollRequest enroll;
    enroll.set_gallery(gallery);
    enroll.set_subject_id("axis");
    enroll.set_model_id(c.model_id);
    at(c.dim, 1.0, enroll.add_faces());
    v1::EnrollResponse enrolled;
    grpc::Status s = Timed(
        [&](grpc::ClientContext* cx) { return gallery_stub_->Enroll(cx, enroll, &enrolled); });
    ASSERT_TRUE(s.ok()) << s.error_message();
    EXPECT_EQ(enrolled.model_id(), c.model_id);

    const double t = c.threshold.value_or(0.5);
    v1::IdentifyRequest identify;
    identify.set_gallery(gallery);
    identify.set_model_id(c.model_id);
    at(c.dim, t + 2e-3, identify.add_probes());
    at(c.dim, t - 2e-3, identify.add_probes());
    v1::IdentifyResponse found;
    s = Timed(
        [&](grpc::ClientContext* cx) { return gallery_stub_->Identify(cx, identify, &found); });
    ASSERT_TRUE(s.ok()) << s.error_message();
    ASSERT_EQ(found.results_size(), 2);
    EXPECT_EQ(found.has_threshold(), c.threshold.has_value());
    EXPECT_FLOAT_EQ(found.threshold(), c.threshold.value_or(0));  // 0: unset's value
    ASSERT_EQ(found.results(0).candidates_size(), 1);
    EXPECT_NEAR(found.results(0).candidates(0).similarity(), t + 2e-3, 1e-5);
    EXPECT_EQ(found.results(1).candidates_size(), c.threshold ? 0 : 1);
    // An explicit threshold is the request's, however low.
    identify.set_threshold(-1);
    s = Timed(
        [&](grpc::ClientContext* cx) { return gallery_stub_->Identify(cx, identify, &found); });
    ASSERT_TRUE(s.ok()) << s.error_message();
    EXPECT_EQ(found.threshold(), -1);
    EXPECT_EQ(found.results(1).candidates_size(), 1);
  }

  // Detect: the faces' own embeddings enrolled in a dlib gallery, then cut at dlib's threshold.
  v1::DetectRequest detect;
  *detect.mutable_image() = RawImage(MakeFrame(3, 9));
  detect.set_model("dlib");
  detect.set_embed(true);
  detect.set_normalize(true);
  v1::DetectResponse detected;
  grpc::Status s =
      Timed([&](grpc::ClientContext* cx) { return stub_->Detect(cx, detect, &detected); });
  ASSERT_TRUE(s.ok()) << s.error_message();
  ASSERT_EQ(detected.faces_size(), 3);
  EXPECT_FALSE(detected.has_threshold());  // no gallery
  v1::EnrollRequest enroll;
  enroll.set_gallery("seen");
  enroll.set_subject_id("first");
  enroll.set_model_id(kDlibId);
  *enroll.add_faces()->mutable_embedding() = detected.faces(0).embedding();
  v1::EnrollResponse enrolled;
  s = Timed([&](grpc::ClientContext* cx) { return gallery_stub_->Enroll(cx, enroll, &enrolled); });
  ASSERT_TRUE(s.ok()) << s.error_message();
  detect.clear_model();
  detect.set_gallery("seen");
  v1::DetectResponse identified;
  s = Timed([&](grpc::ClientContext* cx) { return stub_->Detect(cx, detect, &identified); });
  ASSERT_TRUE(s.ok()) << s.error_message();
  ASSERT_EQ(identified.faces_size(), 3);
  ASSERT_TRUE(identified.has_threshold());
  EXPECT_FLOAT_EQ(identified.threshold(), kDlibCosineThreshold);
  int cut = 0;
  for (int i = 0; i < 3; ++i) {
    const double similarity = Dot({detected.faces(0).embedding().values().begin(),
                                   detected.faces(0).embedding().values().end()},
                                  {detected.faces(i).embedding().values().begin(),
                                   detected.faces(i).embedding().values().end()});
    EXPECT_EQ(identified.faces(i).identification().candidates_size(),
              similarity >= kDlibCosineThreshold ? 1 : 0)
        << "face " << i << ": " << similarity;
    cut += similarity < kDlibCosineThreshold;
  }
  EXPECT_EQ(identified.faces(0).identification().candidates_size(), 1);
  EXPECT_GT(cut, 0) << "the other faces must be below dlib's threshold";
}

// arcface_requests_total and arcface_rejected_total count each call under the served model that
// answered it, "" when none did (an unknown name is never a label value), exactly.
TEST_F(ModelsTest, RequestsAndRejectionsCountUnderTheirModel) {
  Start();
  const cv::Mat picture = Picture(40, 3);
  v1::EmbedRequest embed;
  *embed.add_faces() = FaceOf(picture);
  v1::EmbedResponse embedded;
  ASSERT_TRUE(Embed(embed, &embedded).ok());  // the default: arcface
  embed.set_model("dlib");
  ASSERT_TRUE(Embed(embed, &embedded).ok());
  ASSERT_TRUE(Embed(embed, &embedded).ok());
  embed.set_model("nope");
  EXPECT_EQ(Embed(embed, &embedded).error_code(), grpc::StatusCode::NOT_FOUND);
  // Over the faces limit: the server's own limit, refused once the model is known.
  v1::EmbedRequest many;
  many.set_model("dlib");
  for (int i = 0; i <= ServiceOptions().max_faces_per_request; ++i) many.add_faces();
  EXPECT_EQ(Embed(many, &embedded).error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);

  v1::GetModelInfoRequest info_request;
  info_request.set_model("dlib");
  v1::ModelInfo info;
  ASSERT_TRUE(Timed([&](grpc::ClientContext* c) {
                return stub_->GetModelInfo(c, info_request, &info);
              }).ok());
  v1::ListModelsResponse listed;
  ASSERT_TRUE(Timed([&](grpc::ClientContext* c) {
                return stub_->ListModels(c, v1::ListModelsRequest(), &listed);
              }).ok());
  v1::EnrollRequest enroll;
  enroll.set_gallery("m");
  enroll.set_subject_id("s");
  enroll.set_model("dlib");
  *enroll.add_faces()->mutable_face() = FaceOf(picture);
  v1::EnrollResponse enrolled;
  ASSERT_TRUE(Timed([&](grpc::ClientContext* c) {
                return gallery_stub_->Enroll(c, enroll, &enrolled);
              }).ok());
  EXPECT_EQ(enrolled.model_id(), kDlibId);
  v1::IdentifyRequest identify;
  identify.set_gallery("m");
  *identify.add_probes()->mutable_face() = FaceOf(picture);
  v1::IdentifyResponse found;
  ASSERT_TRUE(Timed([&](grpc::ClientContext* c) {
                return gallery_stub_->Identify(c, identify, &found);
              }).ok());
  // EmbedStream: each message under its own model.
  {
    grpc::ClientContext context;
    auto stream = stub_->EmbedStream(&context);
    for (const char* model : {"dlib", "nope", ""}) {
      v1::EmbedRequest r;
      *r.add_faces() = FaceOf(picture);
      r.set_model(model);
      ASSERT_TRUE(stream->Write(r));
      v1::EmbedResponse answer;
      ASSERT_TRUE(stream->Read(&answer));
    }
    stream->WritesDone();
    ASSERT_TRUE(stream->Finish().ok());
  }

  std::map<std::vector<std::string>, double> requests, rejected;
  std::map<std::string, std::string> types;
  for (const test_util::Sample& m : test_util::ParseExposition(metrics_->Render(), &types)) {
    for (const auto& [key, value] : m.labels) EXPECT_NE(value, "nope") << m.name;
    if (m.name == "arcface_requests_total") {
      requests[{m.labels.at("model"), m.labels.at("rpc"), m.labels.at("code")}] = m.value;
    } else if (m.name == "arcface_rejected_total") {
      rejected[{m.labels.at("model"), m.labels.at("reason")}] = m.value;
    }
  }
  const std::map<std::vector<std::string>, double> want_requests = {
      {{"arcface", "Embed", "OK"}, 1},      {{"dlib", "Embed", "OK"}, 2},
      {{"", "Embed", "NOT_FOUND"}, 1},      {{"dlib", "Embed", "RESOURCE_EXHAUSTED"}, 1},
      {{"dlib", "GetModelInfo", "OK"}, 1},  {{"", "ListModels", "OK"}, 1},
      {{"dlib", "Enroll", "OK"}, 1},        {{"dlib", "Identify", "OK"}, 1},
      {{"dlib", "EmbedStream", "OK"}, 1},   {{"", "EmbedStream", "NOT_FOUND"}, 1},
      {{"arcface", "EmbedStream", "OK"}, 1}};
  EXPECT_EQ(requests, want_requests);
  const std::map<std::vector<std::string>, double> want_rejected = {{{"", "too_many_faces"}, 1}};
  EXPECT_EQ(rejected, want_rejected);
}

// One model's batch held in its fake and its queue full: the other model's calls are answered at
// once, and each model's counters are exact.
TEST_F(ModelsTest, OneModelsOverloadNeverHoldsTheOthersCalls) {
  Start(/*dlib_queue=*/4);
  dlib_.Hold();
  const cv::Mat picture = Picture(40, 8);
  std::vector<std::thread> held;
  std::vector<grpc::Status> held_status(5);
  // The first call's batch enters the fake and waits there; 4 more fill the queue (4 crops).
  v1::EmbedRequest dlib_request;
  *dlib_request.add_faces() = FaceOf(picture);
  dlib_request.set_model("dlib");
  held.emplace_back([&] {
    v1::EmbedResponse r;
    held_status[0] = Embed(dlib_request, &r);
  });
  ASSERT_TRUE(dlib_.WaitForBatches(1));
  for (int i = 1; i < 5; ++i) {
    held.emplace_back([&, i] {
      v1::EmbedResponse r;
      held_status[i] = Embed(dlib_request, &r);
    });
  }
  const absl::Time end = absl::Now() + absl::Seconds(30);
  while (embedders_[1]->batcher().queue_depth() < 4 && absl::Now() < end) {
    absl::SleepFor(absl::Milliseconds(1));
  }
  ASSERT_EQ(embedders_[1]->batcher().queue_depth(), 4);
  // The dlib queue is full: its next call is refused at once.
  v1::EmbedResponse refused;
  grpc::Status s = Embed(dlib_request, &refused);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
  // Counted under its model, before its answer.
  EXPECT_EQ(Metric("arcface_rejected_total", {{"model", "dlib"}, {"reason", "queue_full"}}), 1);
  EXPECT_EQ(Metric("arcface_rejected_total", {{"model", "arcface"}, {"reason", "queue_full"}}), 0);
  EXPECT_EQ(Metric("arcface_requests_total",
                   {{"model", "dlib"}, {"rpc", "Embed"}, {"code", "RESOURCE_EXHAUSTED"}}),
            1);

  // ArcFace's calls go through meanwhile.
  v1::EmbedRequest arcface_request;
  *arcface_request.add_faces() = FaceOf(picture);
  for (int i = 0; i < 10; ++i) {
    v1::EmbedResponse response;
    const absl::Time start = absl::Now();
    s = Embed(arcface_request, &response);
    ASSERT_TRUE(s.ok()) << s.error_message();
    EXPECT_LT(absl::Now() - start, absl::Seconds(5));
    EXPECT_EQ(response.model_id(), kArcFaceId);
  }
  EXPECT_EQ(embedders_[0]->batcher().counters().tasks_succeeded, 10);
  EXPECT_EQ(
      Metric("arcface_requests_total", {{"model", "arcface"}, {"rpc", "Embed"}, {"code", "OK"}}),
      10);
  EXPECT_EQ(embedders_[1]->batcher().counters().tasks_succeeded, 0);
  EXPECT_EQ(embedders_[1]->batcher().counters().rejected_queue_full, 1);
  EXPECT_EQ(Metric("arcface_batches_total", {{"model", "dlib"}, {"status", "ok"}}), 0);
  EXPECT_EQ(Metric("arcface_queue_depth", {{"model", "dlib"}}), 4);
  EXPECT_EQ(Metric("arcface_queue_depth", {{"model", "arcface"}}), 0);
  EXPECT_EQ(WaitForMetric("arcface_batches_total", {{"model", "arcface"}, {"status", "ok"}},
                          static_cast<double>(arcface_.batch_sizes().size())),
            static_cast<double>(arcface_.batch_sizes().size()));

  dlib_.Release();
  for (std::thread& t : held) t.join();
  for (const grpc::Status& st : held_status) EXPECT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(embedders_[1]->batcher().counters().tasks_succeeded, 5);
  EXPECT_EQ(Metric("arcface_requests_total", {{"model", "dlib"}, {"rpc", "Embed"}, {"code", "OK"}}),
            5);
  int dlib_crops = 0;
  for (int n : dlib_.batch_sizes()) dlib_crops += n;
  EXPECT_EQ(dlib_crops, 5);
  EXPECT_EQ(WaitForMetric("arcface_batches_total", {{"model", "dlib"}, {"status", "ok"}},
                          static_cast<double>(dlib_.batch_sizes().size())),
            static_cast<double>(dlib_.batch_sizes().size()));
}

TEST_F(ModelsTest, OneModelsFailingBatchFailsOnlyItsOwnCalls) {
  Start();
  const cv::Mat picture = Picture(40, 9);
  v1::EmbedRequest dlib_request;
  *dlib_request.add_faces() = FaceOf(picture);
  dlib_request.set_model("dlib");
  v1::EmbedRequest arcface_request;
  *arcface_request.add_faces() = FaceOf(picture);
  dlib_.FailNext(absl::InternalError("the dlib engine failed"));
  v1::EmbedResponse response;
  grpc::Status s = Embed(dlib_request, &response);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INTERNAL);
  EXPECT_THAT(s.error_message(), HasSubstr("the dlib engine failed"));
  for (int i = 0; i < 3; ++i) {
    v1::EmbedResponse ok;
    s = Embed(arcface_request, &ok);
    ASSERT_TRUE(s.ok()) << s.error_message();
    EXPECT_EQ(ok.model_id(), kArcFaceId);
  }
  // The failure was one batch's: the dlib model's next call is answered.
  s = Embed(dlib_request, &response);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(response.model_id(), kDlibId);
  EXPECT_EQ(WaitForMetric("arcface_batches_total", {{"model", "dlib"}, {"status", "error"}}, 1), 1);
  EXPECT_EQ(Metric("arcface_batches_total", {{"model", "arcface"}, {"status", "error"}}), 0);
}

}  // namespace
}  // namespace arcface::service
