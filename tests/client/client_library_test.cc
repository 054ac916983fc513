// arcface::client::Client against a real arcface-server with the golden r50 weights,
// --max-faces-per-request 4, the face detector (--detector) and a SQLite gallery store limited to
// 3 faces per Enroll and 2 probes per Identify (tests/client/test_cli.py starts it and runs this
// binary with ARCFACE_TEST_SERVER=host:port, ARCFACE_GOLDEN_DIR and ARCFACE_TEST_DATA).
// ClientReload: a second server with --admin-rpc serving ARCFACE_ADMIN_MODEL_FILE (r50) as model
// "live" and the demo weights (ARCFACE_ADMIN_SERVER).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "client/cpp/client.h"

namespace arcface::client {
namespace {

std::string Env(const char* name) {
  const char* v = std::getenv(name);
  return v ? v : "";
}

double Cosine(const std::vector<float>& a, const std::vector<double>& b) {
  double ab = 0, aa = 0, bb = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    ab += a[i] * b[i];
    aa += double(a[i]) * a[i];
    bb += b[i] * b[i];
  }
  return ab / std::sqrt(aa * bb);
}

class ClientTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    std::ifstream in(Env("ARCFACE_GOLDEN_DIR") + "/goldens.json");
    ASSERT_TRUE(in) << "set ARCFACE_GOLDEN_DIR (ctest -R client_pytest runs this test)";
    nlohmann::json doc = nlohmann::json::parse(in);
    for (const auto& c : doc["cases"]) cases_[c["name"].get<std::string>()] = c;
  }

  void SetUp() override {
    ASSERT_FALSE(Env("ARCFACE_TEST_SERVER").empty()) << "set ARCFACE_TEST_SERVER";
    ClientOptions o;
    o.addresses = {Env("ARCFACE_TEST_SERVER")};
    o.timeout = absl::Seconds(120);
    auto c = Client::Create(o);
    ASSERT_TRUE(c.ok()) << c.status();
    client_ = std::move(*c);
  }

  static const nlohmann::json& Case(const std::string& name) { return cases_.at(name); }
  static std::vector<double> Golden(const std::string& name) {
    return Case(name)["embedding"].get<std::vector<double>>();
  }
  static std::string ImagePath(const std::string& name) {
    return Env("ARCFACE_TEST_DATA") + "/" +
           std::filesystem::path(Case(name)["input"]["path"].get<std::string>()).filename().string();
  }
  // A crop case's 112x112 RGB bytes, as the BGR cv::Mat an OpenCV user would hold.
  static cv::Mat CropBgr(const std::string& name) {
    std::ifstream in(Env("ARCFACE_GOLDEN_DIR") + "/" + Case(name)["input"]["file"].get<std::string>(),
                     std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    EXPECT_EQ(bytes.size(), 112u * 112 * 3);
    cv::Mat rgb(112, 112, CV_8UC3, bytes.data()), bgr;
    cv::cvtColor(rgb, bgr, cv::COLOR_RGB2BGR);
    return bgr;
  }

  static inline std::map<std::string, nlohmann::json> cases_;
  std::unique_ptr<Client> client_;
};

const std::vector<std::string> kCrops = {"crop_uniform_0",   "crop_gaussian_1", "crop_smooth_2",
                                         "crop_gradient_3",  "crop_stripes_4",  "crop_face_like_5",
                                         "crop_saltpepper_6"};

TEST_F(ClientTest, HealthAndModelInfo) {
  EXPECT_TRUE(client_->WaitForHealthy(absl::Seconds(10)).ok());
  auto health = client_->CheckHealth();
  ASSERT_TRUE(health.ok()) << health.status();
  EXPECT_EQ(*health, ServingStatus::kServing);
  auto info = client_->GetModelInfo();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->arch(), "r50");
  EXPECT_EQ(info->max_faces_per_request(), 4u);

  // --weights serves one model, named "arcface"; ClientOptions::model routes every call to a
  // model by name, and an unknown one is NOT_FOUND naming the served ones.
  auto models = client_->ListModels();
  ASSERT_TRUE(models.ok()) << models.status();
  ASSERT_EQ(models->models_size(), 1);
  EXPECT_EQ(models->models(0).name(), "arcface");
  EXPECT_TRUE(models->models(0).is_default());
  EXPECT_EQ(models->models(0).metric(), "cosine");
  EXPECT_EQ(models->models(0).model_id(), info->model_id());
  for (const std::string& model : {std::string("arcface"), std::string("nope")}) {
    ClientOptions o;
    o.addresses = {Env("ARCFACE_TEST_SERVER")};
    o.model = model;
    auto named = Client::Create(o);
    ASSERT_TRUE(named.ok()) << named.status();
    auto faces = (*named)->Embed({*FaceInput::FromMat(CropBgr(kCrops[0]))});
    if (model == "arcface") {
      ASSERT_TRUE(faces.ok()) << faces.status();
      EXPECT_EQ((*faces)[0].values.size(), 512u);
    } else {
      EXPECT_EQ(faces.status().code(), absl::StatusCode::kNotFound);
      EXPECT_NE(faces.status().message().find(
                    "model 'nope' is not served here; this server serves: arcface (default)"),
                absl::string_view::npos)
          << faces.status();
    }
  }
}

TEST_F(ClientTest, EmbedMatsAcrossSeveralRequestsMatchesTheReference) {
  // 7 crops, 4 per request: two requests, results in input order.
  std::vector<FaceInput> faces;
  for (const std::string& name : kCrops) {
    auto f = FaceInput::FromMat(CropBgr(name), name);
    ASSERT_TRUE(f.ok()) << f.status();
    faces.push_back(*f);
  }
  auto e = client_->Embed(faces);
  ASSERT_TRUE(e.ok()) << e.status();
  ASSERT_EQ(e->size(), kCrops.size());
  for (size_t i = 0; i < kCrops.size(); ++i) {
    EXPECT_GE(Cosine((*e)[i].values, Golden(kCrops[i])), 0.99999) << kCrops[i];
    EXPECT_NEAR((*e)[i].norm, Case(kCrops[i])["norm"].get<double>(), 1e-3 * (*e)[i].norm);
  }
  auto unit = client_->Embed({faces[0]}, /*normalize=*/true);
  ASSERT_TRUE(unit.ok());
  double ss = 0;
  for (float v : (*unit)[0].values) ss += double(v) * v;
  EXPECT_NEAR(ss, 1.0, 1e-5);
}

TEST_F(ClientTest, FilesBytesBoxesAndLandmarks) {
  auto whole = FaceInput::FromFile(ImagePath("whole_single_face"));
  ASSERT_TRUE(whole.ok()) << whole.status();
  const cv::Mat decoded =
      cv::imread(ImagePath("whole_single_face"), cv::IMREAD_COLOR | cv::IMREAD_IGNORE_ORIENTATION);
  auto mat = FaceInput::FromMat(decoded, "mat");
  auto boxed = FaceInput::FromFile(ImagePath("box_multi_p2"));
  const auto b = Case("box_multi_p2")["input"]["box"].get<std::vector<float>>();
  boxed->WithBox({b[0], b[1], b[2], b[3]});
  std::ifstream in(ImagePath("align_single_face"), std::ios::binary);
  auto aligned = FaceInput::FromEncoded(
      std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>()), "bytes");
  const auto lm = Case("align_single_face")["input"]["landmarks"].get<std::vector<std::vector<float>>>();
  std::array<cv::Point2f, 5> points;
  for (int i = 0; i < 5; ++i) points[i] = {lm[i][0], lm[i][1]};
  aligned.WithLandmarks(points);
  auto e = client_->Embed({*whole, *mat, *boxed, aligned});
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_GE(Cosine((*e)[0].values, Golden("whole_single_face")), 0.9999);
  EXPECT_GE(Cosine((*e)[1].values, Golden("whole_single_face")), 0.9999);
  EXPECT_GE(Cosine((*e)[2].values, Golden("box_multi_p2")), 0.9999);
  EXPECT_GE(Cosine((*e)[3].values, Golden("align_single_face")), 0.9999);
}

TEST_F(ClientTest, ABadFaceIsNamedByItsIndexAndLabelAcrossRequests) {
  std::vector<FaceInput> faces;
  for (int i = 0; i < 5; ++i) faces.push_back(*FaceInput::FromMat(CropBgr(kCrops[i])));
  faces.push_back(FaceInput::FromEncoded("not an image", "bad.jpg"));  // face 5: request 2, face 1
  auto e = client_->Embed(faces);
  ASSERT_EQ(e.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(e.status().message().find("face 5 (bad.jpg)"), std::string::npos) << e.status();
}

TEST_F(ClientTest, StreamAnswersInOrderAndCarriesPerMessageErrors) {
  std::vector<StreamItem> items;
  items.push_back({{*FaceInput::FromMat(CropBgr(kCrops[0]))}, 10});
  items.push_back({{FaceInput::FromEncoded("garbage", "junk.png")}, 11});
  items.push_back({{*FaceInput::FromMat(CropBgr(kCrops[1])), *FaceInput::FromMat(CropBgr(kCrops[2]))}, 12});
  size_t next = 0;
  std::vector<int64_t> tags;
  std::vector<absl::StatusOr<std::vector<Embedding>>> results;
  absl::Status s = client_->EmbedStream(
      [&]() -> std::optional<StreamItem> {
        if (next == items.size()) return std::nullopt;
        return items[next++];
      },
      false,
      [&](int64_t tag, absl::StatusOr<std::vector<Embedding>> r) {
        tags.push_back(tag);
        results.push_back(std::move(r));
      });
  ASSERT_TRUE(s.ok()) << s;
  EXPECT_EQ(tags, (std::vector<int64_t>{10, 11, 12}));
  ASSERT_TRUE(results[0].ok());
  EXPECT_GE(Cosine((*results[0])[0].values, Golden(kCrops[0])), 0.99999);
  EXPECT_EQ(results[1].status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(results[1].status().message().find("junk.png"), std::string::npos) << results[1].status();
  ASSERT_TRUE(results[2].ok());
  ASSERT_EQ(results[2]->size(), 2u);
  EXPECT_GE(Cosine((*results[2])[1].values, Golden(kCrops[2])), 0.99999);
}

TEST_F(ClientTest, CompareFacesAndEmbeddings) {
  // 3 + 3 face probes exceed 4 per request: the client embeds first, then compares.
  std::vector<Probe> q, r;
  for (int i = 0; i < 3; ++i) q.emplace_back(*FaceInput::FromMat(CropBgr(kCrops[i])));
  for (int i = 3; i < 6; ++i) r.emplace_back(*FaceInput::FromMat(CropBgr(kCrops[i])));
  auto result = client_->Compare(q, r, 0.1f);
  ASSERT_TRUE(result.ok()) << result.status();
  ASSERT_EQ(result->rows, 3);
  ASSERT_EQ(result->cols, 3);
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 3; ++j) {
      const auto a = Golden(kCrops[i]), b = Golden(kCrops[3 + j]);
      std::vector<float> af(a.begin(), a.end());
      const double want = Cosine(af, b);
      EXPECT_NEAR(result->at(i, j), want, 1e-4);
      EXPECT_EQ(result->matches[i * 3 + j], result->at(i, j) >= 0.1f);
    }
  }
  // One face, one embedding: a single Compare call; a bad reference is named.
  const auto g = Golden(kCrops[0]);
  auto one = client_->Compare({q[0]}, {std::vector<float>(g.begin(), g.end())});
  ASSERT_TRUE(one.ok()) << one.status();
  EXPECT_NEAR(one->at(0, 0), 1.0, 1e-4);
  EXPECT_TRUE(one->matches.empty());
  auto bad = client_->Compare({q[0]}, {FaceInput::FromEncoded("xx", "nope.jpg")});
  ASSERT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("reference 0 (nope.jpg)"), std::string::npos) << bad.status();
}

// The gallery: the server has a SQLite store and at most 3 faces per Enroll and 2 probes per
// Identify, so that the client's splitting is exercised.
TEST_F(ClientTest, GalleryEnrollIdentifyListForget) {
  auto info = client_->GetModelInfo();
  ASSERT_TRUE(info.ok()) << info.status();
  ASSERT_TRUE(info->gallery().enabled());
  EXPECT_EQ(info->gallery().max_faces_per_enroll(), 3u);
  EXPECT_EQ(info->gallery().max_probes_per_identify(), 2u);

  std::vector<Probe> alice;
  for (int i = 0; i < 5; ++i) alice.emplace_back(*FaceInput::FromMat(CropBgr(kCrops[i])));
  EnrollOptions options;
  options.labels = {{"team", "red"}};
  auto a = client_->Enroll("cpp", "c-alice", alice, options);  // 3 + 2 faces
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_EQ(a->face_ids_size(), 5);
  EXPECT_EQ(a->subject_id(), "c-alice");
  const auto g6 = Golden(kCrops[6]);
  auto b = client_->Enroll("cpp", "c-bob", {std::vector<float>(g6.begin(), g6.end())});
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_GT(b->gallery_version(), a->gallery_version());

  // 3 probes: two Identify requests; each finds its own face (-1: every candidate).
  auto found = client_->Identify(
      "cpp", {std::vector<float>(g6.begin(), g6.end()), alice[0], alice[1]}, /*top_k=*/2,
      /*threshold=*/-1.0f);
  ASSERT_TRUE(found.ok()) << found.status();
  ASSERT_EQ(found->results_size(), 3);
  EXPECT_EQ(found->model_id(), info->model_id());
  EXPECT_EQ(found->threshold(), -1.0f);
  EXPECT_EQ(found->gallery_version(), b->gallery_version());
  const std::vector<std::pair<std::string, std::string>> want = {
      {"c-bob", b->face_ids(0)}, {"c-alice", a->face_ids(0)}, {"c-alice", a->face_ids(1)}};
  for (int i = 0; i < 3; ++i) {
    const auto& candidates = found->results(i).candidates();
    ASSERT_EQ(candidates.size(), 2) << i;
    EXPECT_EQ(candidates[0].subject_id(), want[i].first) << i;
    EXPECT_EQ(candidates[0].face_id(), want[i].second) << i;
    EXPECT_NEAR(candidates[0].similarity(), 1.0, 1e-4) << i;
    EXPECT_GT(candidates[0].similarity(), candidates[1].similarity()) << i;
    EXPECT_NE(candidates[1].subject_id(), candidates[0].subject_id()) << i;
  }

  auto page = client_->ListSubjects("cpp", /*page_size=*/1);
  ASSERT_TRUE(page.ok()) << page.status();
  ASSERT_EQ(page->subjects_size(), 1);
  EXPECT_EQ(page->subjects(0).subject_id(), "c-alice");
  EXPECT_EQ(page->subjects(0).num_faces(), 5u);
  EXPECT_EQ(page->subjects(0).labels().at("team"), "red");
  ASSERT_FALSE(page->next_page_token().empty());
  page = client_->ListSubjects("cpp", 1, page->next_page_token());
  ASSERT_TRUE(page.ok()) << page.status();
  ASSERT_EQ(page->subjects_size(), 1);
  EXPECT_EQ(page->subjects(0).subject_id(), "c-bob");
  EXPECT_TRUE(page->next_page_token().empty());

  auto gallery = client_->GetGalleryInfo("cpp");
  ASSERT_TRUE(gallery.ok()) << gallery.status();
  EXPECT_EQ(gallery->num_subjects(), 2u);
  EXPECT_EQ(gallery->num_faces(), 6u);
  EXPECT_EQ(gallery->model_id(), info->model_id());
  EXPECT_EQ(gallery->store().rfind("sqlite:", 0), 0u) << gallery->store();

  auto forgot = client_->Forget("cpp", "c-alice", {a->face_ids(0)});
  ASSERT_TRUE(forgot.ok()) << forgot.status();
  EXPECT_EQ(forgot->faces_removed(), 1u);
  auto again = client_->Identify("cpp", {alice[0]}, 5);
  ASSERT_TRUE(again.ok()) << again.status();
  ASSERT_TRUE(again->has_threshold());  // none asked: the model's
  EXPECT_FLOAT_EQ(again->threshold(), info->default_threshold());
  for (const auto& c : again->results(0).candidates()) EXPECT_NE(c.face_id(), a->face_ids(0));
  forgot = client_->Forget("cpp", "c-bob");
  ASSERT_TRUE(forgot.ok()) << forgot.status();
  EXPECT_EQ(forgot->faces_removed(), 1u);
  gallery = client_->GetGalleryInfo("cpp");
  ASSERT_TRUE(gallery.ok()) << gallery.status();
  EXPECT_EQ(gallery->num_subjects(), 1u);
  EXPECT_EQ(gallery->num_faces(), 4u);
}

TEST_F(ClientTest, GalleryErrorsNameTheCallersFaceAcrossRequests) {
  std::vector<Probe> faces;
  for (int i = 0; i < 3; ++i) faces.emplace_back(*FaceInput::FromMat(CropBgr(kCrops[i])));
  faces.emplace_back(FaceInput::FromEncoded("xx", "bad.jpg"));  // the second request's first
  auto r = client_->Enroll("cpp-bad", "x", faces);
  ASSERT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
  EXPECT_NE(r.status().message().find("faces 3 (bad.jpg)"), std::string::npos) << r.status();

  const auto g = Golden(kCrops[0]);
  std::vector<float> v(g.begin(), g.end()), nan = v;
  nan[5] = std::nanf("");
  auto found = client_->Identify("cpp-bad", {v, v, nan});
  ASSERT_EQ(found.status().code(), absl::StatusCode::kInvalidArgument) << found.status();
  EXPECT_NE(found.status().message().find("probes 2"), std::string::npos) << found.status();
  found = client_->Identify("cpp-never-enrolled", {v});
  EXPECT_EQ(found.status().code(), absl::StatusCode::kNotFound) << found.status();
  auto forgot = client_->Forget("cpp-bad", "");
  EXPECT_EQ(forgot.status().code(), absl::StatusCode::kInvalidArgument) << forgot.status();
}

std::string Photo(const std::string& name) { return Env("ARCFACE_TEST_DATA") + "/" + name; }

std::vector<std::array<float, 4>> Boxes(const Detection& d) {
  std::vector<std::array<float, 4>> out;
  for (const DetectedFace& f : d.faces) out.push_back({f.box.x_min, f.box.y_min, f.box.x_max, f.box.y_max});
  return out;
}

void ExpectSameBoxes(const Detection& a, const Detection& b, float tolerance) {
  ASSERT_EQ(a.faces.size(), b.faces.size());
  const auto ba = Boxes(a), bb = Boxes(b);
  for (size_t i = 0; i < ba.size(); ++i) {
    for (int k = 0; k < 4; ++k) EXPECT_NEAR(ba[i][k], bb[i][k], tolerance) << "face " << i;
  }
}

TEST_F(ClientTest, DetectEmbedsAsEmbedDoesAndIdentifies) {
  // multi_face.jpg: five people (1000x667).
  auto frame = FaceInput::FromFile(Photo("multi_face.jpg"));
  ASSERT_TRUE(frame.ok()) << frame.status();
  DetectOptions options;
  options.embed = true;
  auto found = client_->Detect(*frame, options);
  ASSERT_TRUE(found.ok()) << found.status();
  EXPECT_EQ(found->image_width, 1000);
  EXPECT_EQ(found->image_height, 667);
  EXPECT_FALSE(found->detector_id.empty());
  EXPECT_FALSE(found->model_id.empty());
  ASSERT_GE(found->faces.size(), 4u);
  for (size_t i = 0; i < found->faces.size(); ++i) {
    const DetectedFace& f = found->faces[i];
    if (i > 0) {
      EXPECT_LE(f.score, found->faces[i - 1].score);
    }
    ASSERT_TRUE(f.embedding.has_value()) << i;
    EXPECT_TRUE(f.candidates.empty());
    // Embed with the landmarks Detect returned: the same aligned crop, the same embedding.
    FaceInput face = *frame;
    face.WithLandmarks(f.landmarks);
    auto direct = client_->Embed({face});
    ASSERT_TRUE(direct.ok()) << direct.status();
    const std::vector<double> want((*direct)[0].values.begin(), (*direct)[0].values.end());
    EXPECT_GE(Cosine(f.embedding->values, want), 0.9999) << "face " << i;
    EXPECT_NEAR(f.embedding->norm, (*direct)[0].norm, 1e-3 * (*direct)[0].norm);
  }
  // Raw BGR pixels (FaceInput::FromMat) find the same faces.
  const cv::Mat bgr = cv::imread(Photo("multi_face.jpg"), cv::IMREAD_COLOR);
  auto raw = client_->Detect(*FaceInput::FromMat(bgr, "raw"));
  ASSERT_TRUE(raw.ok()) << raw.status();
  ExpectSameBoxes(*raw, *found, 1.0f);
  EXPECT_FALSE(raw->faces[0].embedding.has_value());

  // Each face enrolled as its own subject is identified as itself in the same frame.
  for (size_t i = 0; i < found->faces.size(); ++i) {
    auto e = client_->Enroll("cpp-detect", absl::StrCat("person-", i),
                             {found->faces[i].embedding->values});
    ASSERT_TRUE(e.ok()) << e.status();
  }
  DetectOptions identify;
  identify.gallery = "cpp-detect";
  identify.top_k = 2;
  identify.threshold = -1;  // every candidate
  auto named = client_->Detect(*frame, identify);
  ASSERT_TRUE(named.ok()) << named.status();
  ASSERT_EQ(named->faces.size(), found->faces.size());
  EXPECT_EQ(named->threshold, -1.0f);
  EXPECT_EQ(found->threshold, std::nullopt);  // no gallery
  for (size_t i = 0; i < named->faces.size(); ++i) {
    const DetectedFace& f = named->faces[i];
    ASSERT_EQ(f.candidates.size(), 2u) << i;
    EXPECT_EQ(f.candidates[0].subject_id, absl::StrCat("person-", i));
    EXPECT_GE(f.candidates[0].similarity, 0.999f);
    EXPECT_LT(f.candidates[1].similarity, f.candidates[0].similarity);
  }
  // None asked: the model's, with each face's candidates those of -1 that reach it.
  identify.threshold.reset();
  auto by_default = client_->Detect(*frame, identify);
  ASSERT_TRUE(by_default.ok()) << by_default.status();
  const float model_threshold = client_->GetModelInfo()->default_threshold();
  EXPECT_EQ(by_default->threshold, model_threshold);
  ASSERT_EQ(by_default->faces.size(), named->faces.size());
  for (size_t i = 0; i < named->faces.size(); ++i) {
    std::vector<std::string> want, got;
    for (const Candidate& c : named->faces[i].candidates) {
      if (c.similarity >= model_threshold) want.push_back(c.subject_id);
    }
    for (const Candidate& c : by_default->faces[i].candidates) got.push_back(c.subject_id);
    EXPECT_EQ(got, want) << i;
  }
  identify.gallery = "cpp-never-enrolled";
  EXPECT_EQ(client_->Detect(*frame, identify).status().code(), absl::StatusCode::kNotFound);
  auto bad = client_->Detect(FaceInput::FromEncoded("garbage", "cam.jpg"));
  ASSERT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(bad.status().message().rfind("Detect: cam.jpg: ", 0), 0u) << bad.status();
}

TEST_F(ClientTest, DetectStreamAnswersEachFrameInOrderWithItsOwnError) {
  std::vector<FrameItem> frames;
  frames.push_back({*FaceInput::FromFile(Photo("multi_face.jpg")), 20});
  frames.push_back({FaceInput::FromEncoded("garbage", "bad.jpg"), 21});
  frames.push_back({*FaceInput::FromFile(Photo("free-mountain-vector-01.jpg")), 22});  // no face
  frames.push_back({*FaceInput::FromFile(Photo("single_face.jpg")), 23});
  size_t next = 0;
  std::vector<int64_t> tags;
  std::vector<absl::StatusOr<Detection>> results;
  StreamOptions window;
  window.max_in_flight = 2;
  absl::Status s = client_->DetectStream(
      [&]() -> std::optional<FrameItem> {
        if (next == frames.size()) return std::nullopt;
        return frames[next++];
      },
      DetectOptions(),
      [&](int64_t tag, absl::StatusOr<Detection> r) {
        tags.push_back(tag);
        results.push_back(std::move(r));
      },
      window);
  ASSERT_TRUE(s.ok()) << s;
  EXPECT_EQ(tags, (std::vector<int64_t>{20, 21, 22, 23}));
  ASSERT_TRUE(results[0].ok()) << results[0].status();
  auto unary = client_->Detect(frames[0].frame);
  ASSERT_TRUE(unary.ok()) << unary.status();
  ExpectSameBoxes(*results[0], *unary, 1e-3f);
  EXPECT_EQ(results[1].status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(results[1].status().message().rfind("DetectStream: bad.jpg: ", 0), 0u)
      << results[1].status();
  ASSERT_TRUE(results[2].ok()) << results[2].status();
  EXPECT_TRUE(results[2]->faces.empty());  // no face: an empty answer, not an error
  ASSERT_TRUE(results[3].ok()) << results[3].status();
  EXPECT_EQ(results[3]->faces.size(), 1u);
}

TEST_F(ClientTest, ReloadModelsIsOffWithoutTheAdminFlag) {
  auto r = client_->ReloadModels();
  ASSERT_EQ(r.status().code(), absl::StatusCode::kUnimplemented) << r.status();
  EXPECT_TRUE(absl::StartsWith(r.status().message(), "ReloadModels: model administration is off"))
      << r.status();
  EXPECT_NE(r.status().message().find("--admin-rpc"), std::string::npos) << r.status();
  EXPECT_NE(r.status().message().find("SIGHUP"), std::string::npos) << r.status();
}

// Replaces `path` as an operator should: the new bytes written beside it, then renamed over it.
void Install(const std::string& path, const std::string& bytes) {
  {
    std::ofstream out(path + ".new", std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), std::streamsize(bytes.size()));
    ASSERT_TRUE(out.good()) << path;
  }
  std::filesystem::rename(path + ".new", path);
}

TEST(ClientReload, ReportsEachModelAndABrokenFileLeavesTheModelServing) {
  const std::string path = Env("ARCFACE_ADMIN_MODEL_FILE");
  ASSERT_FALSE(Env("ARCFACE_ADMIN_SERVER").empty() || path.empty())
      << "set ARCFACE_ADMIN_SERVER and ARCFACE_ADMIN_MODEL_FILE (ctest -R client_pytest)";
  ClientOptions o;
  o.addresses = {Env("ARCFACE_ADMIN_SERVER")};
  o.timeout = absl::Seconds(120);
  o.model = "live";
  auto c = Client::Create(o);
  ASSERT_TRUE(c.ok()) << c.status();
  Client& client = **c;
  auto served = client.ListModels();
  ASSERT_TRUE(served.ok()) << served.status();
  ASSERT_EQ(served->models_size(), 2);
  const std::string live_id = served->models(0).model_id(), demo_id = served->models(1).model_id();

  // Nothing changed: every served model, in the served order, UNCHANGED.
  auto r = client.ReloadModels();
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->models_size(), 2);
  EXPECT_EQ(r->models(0).model(), "live");
  EXPECT_EQ(r->models(1).model(), "arcface-demo");
  for (int i = 0; i < 2; ++i) {
    const arcface::v1::ModelReload& m = r->models(i);
    EXPECT_EQ(m.result(), arcface::v1::ModelReload::UNCHANGED) << m.DebugString();
    EXPECT_EQ(m.model_id(), i == 0 ? live_id : demo_id);
    EXPECT_EQ(m.previous_model_id(), m.model_id());
    EXPECT_EQ(m.error(), "");
  }

  // A copy cut short: FAILED with the file named, in an OK answer; the old weights serve on.
  std::string bytes;
  {
    std::ifstream in(path, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  ASSERT_GT(bytes.size(), 1000u);
  Install(path, bytes.substr(0, bytes.size() / 2));
  r = client.ReloadModels({"live"});
  Install(path, bytes);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->models_size(), 1);
  EXPECT_EQ(r->models(0).model(), "live");
  EXPECT_EQ(r->models(0).result(), arcface::v1::ModelReload::FAILED);
  EXPECT_EQ(r->models(0).model_id(), live_id);
  EXPECT_EQ(r->models(0).previous_model_id(), live_id);
  EXPECT_NE(r->models(0).error().find(path), std::string::npos) << r->models(0).error();
  auto info = client.GetModelInfo();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->model_id(), live_id);

  auto unknown = client.ReloadModels({"live", "nope"});
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kNotFound) << unknown.status();
  EXPECT_EQ(unknown.status().message(),
            "ReloadModels: model 'nope' is not served here; this server serves: live (default), "
            "arcface-demo");
}

TEST(ClientUnreachable, RetriesUnavailableThenGivesUp) {
  ClientOptions o;
  o.addresses = {Env("ARCFACE_FREE_ADDRESS").empty() ? "127.0.0.1:9" : Env("ARCFACE_FREE_ADDRESS")};
  o.timeout = absl::Seconds(5);
  o.retry.max_attempts = 3;
  o.retry.initial_backoff = absl::Milliseconds(10);
  o.retry.max_backoff = absl::Milliseconds(20);
  std::vector<int> attempts;
  o.on_retry = [&](const absl::Status& s, int attempt, absl::Duration) {
    EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable);
    attempts.push_back(attempt);
  };
  auto c = Client::Create(o);
  ASSERT_TRUE(c.ok());
  auto info = (*c)->GetModelInfo();
  EXPECT_EQ(info.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(attempts, (std::vector<int>{2, 3}));
  EXPECT_EQ((*c)->WaitForHealthy(absl::Milliseconds(300)).code(),
            absl::StatusCode::kUnavailable);
}

}  // namespace
}  // namespace arcface::client
