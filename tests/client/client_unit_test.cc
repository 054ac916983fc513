// The client's pure pieces: retry backoff, request splitting, address lists, the .npy writer,
// percentiles, CSV quoting, the landmarks file, progress text, the plot's layout, the detections
// picture, cv::Mat input, a Detect frame's own check, the gallery commands' tables and labels,
// the embedding's one-line summary.
#include <cstring>
#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>
#include <opencv2/imgproc.hpp>

#include "client/cli/output.h"
#include "client/cli/plot.h"
#include "client/cli/progress.h"
#include "client/cli/stats.h"
#include "client/cpp/client.h"
#include "client/cpp/policies.h"
#include "common/address.h"

namespace arcface {
namespace {

using client::BackoffDelay;
using client::RetryPolicy;

double Ms(absl::Duration d) { return absl::ToDoubleMilliseconds(d); }

TEST(Backoff, GrowsByTheMultiplierUpToTheCap) {
  RetryPolicy p;
  p.initial_backoff = absl::Milliseconds(100);
  p.max_backoff = absl::Milliseconds(1000);
  p.multiplier = 2;
  p.jitter = 0;
  EXPECT_DOUBLE_EQ(Ms(BackoffDelay(p, 1, 0.3)), 100);
  EXPECT_DOUBLE_EQ(Ms(BackoffDelay(p, 2, 0.3)), 200);
  EXPECT_DOUBLE_EQ(Ms(BackoffDelay(p, 3, 0.3)), 400);
  EXPECT_DOUBLE_EQ(Ms(BackoffDelay(p, 4, 0.3)), 800);
  EXPECT_DOUBLE_EQ(Ms(BackoffDelay(p, 5, 0.3)), 1000);
  EXPECT_DOUBLE_EQ(Ms(BackoffDelay(p, 1000, 0.3)), 1000);  // no overflow far out
}

TEST(Backoff, JitterSpreadsSymmetricallyAroundTheBase) {
  RetryPolicy p;
  p.initial_backoff = absl::Milliseconds(100);
  p.max_backoff = absl::Seconds(10);
  p.multiplier = 3;
  p.jitter = 0.2;
  EXPECT_NEAR(Ms(BackoffDelay(p, 2, 0.0)), 240, 1e-9);   // 300 * 0.8
  EXPECT_NEAR(Ms(BackoffDelay(p, 2, 0.5)), 300, 1e-9);
  EXPECT_NEAR(Ms(BackoffDelay(p, 2, 0.999999)), 360, 1e-3);  // 300 * 1.2
}

TEST(Backoff, PolicyIsValidated) {
  RetryPolicy p;
  EXPECT_TRUE(client::ValidateRetryPolicy(p).ok());
  p.max_attempts = 0;
  EXPECT_EQ(client::ValidateRetryPolicy(p).code(), absl::StatusCode::kInvalidArgument);
  p = RetryPolicy();
  p.max_backoff = p.initial_backoff / 2;
  EXPECT_FALSE(client::ValidateRetryPolicy(p).ok());
  p = RetryPolicy();
  p.multiplier = 0.5;
  EXPECT_FALSE(client::ValidateRetryPolicy(p).ok());
  p = RetryPolicy();
  p.jitter = 1.0;
  EXPECT_FALSE(client::ValidateRetryPolicy(p).ok());
}

using Ranges = std::vector<std::pair<size_t, size_t>>;

TEST(SplitIntoRequests, ByCount) {
  auto r = client::SplitIntoRequests(std::vector<size_t>(10, 100), 4, 0);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, (Ranges{{0, 4}, {4, 8}, {8, 10}}));
  r = client::SplitIntoRequests(std::vector<size_t>(8, 100), 4, 0);
  EXPECT_EQ(*r, (Ranges{{0, 4}, {4, 8}}));
  r = client::SplitIntoRequests({}, 4, 0);
  EXPECT_TRUE(r->empty());
}

TEST(SplitIntoRequests, ByBytes) {
  const size_t per_face = 1000 + client::kPerFaceOverheadBytes;
  const uint64_t limit = client::kRequestOverheadBytes + 3 * per_face;  // three fit exactly
  auto r = client::SplitIntoRequests(std::vector<size_t>(7, 1000), 100, limit);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, (Ranges{{0, 3}, {3, 6}, {6, 7}}));
  // Uneven sizes: a large face starts a new request.
  r = client::SplitIntoRequests({1000, 1000, 2500, 10}, 100, limit);
  EXPECT_EQ(*r, (Ranges{{0, 2}, {2, 4}}));
}

TEST(SplitIntoRequests, AFaceOverTheLimitIsNamed) {
  auto r = client::SplitIntoRequests({10, 10, 5000}, 100, 2000);
  ASSERT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(r.status().message().substr(0, 7), "face 2 ");
  EXPECT_FALSE(client::SplitIntoRequests({10}, 0, 0).ok());
}

TEST(Addresses, ListsAndHostPorts) {
  auto list = client::ParseAddressList("localhost:50051, 10.0.0.2:7000,[::1]:9");
  ASSERT_TRUE(list.ok()) << list.status();
  EXPECT_EQ(*list, (std::vector<std::string>{"localhost:50051", "10.0.0.2:7000", "[::1]:9"}));
  absl::StatusOr<common::HostPort> parsed =
      common::ParseHostPort("[::1]:9", common::PortZero::kRefused);
  ASSERT_TRUE(parsed.ok());
  EXPECT_EQ(parsed->host, "::1");
  EXPECT_EQ(parsed->port, 9);
  for (const char* bad : {"", "localhost", "host:", ":80", "h:0", "h:70000", "h:x", "::1:80",
                          "a:1,,b:2", "[::1:80"}) {
    EXPECT_EQ(client::ParseAddressList(bad).status().code(), absl::StatusCode::kInvalidArgument)
        << bad;
  }
}

TEST(Addresses, StaticTargets) {
  EXPECT_EQ(*client::StaticTarget({"127.0.0.1:1", "127.0.0.1:2"}), "ipv4:127.0.0.1:1,127.0.0.1:2");
  EXPECT_EQ(*client::StaticTarget({"[::1]:1", "[::1]:2"}), "ipv6:[::1]:1,[::1]:2");
  EXPECT_FALSE(client::StaticTarget({"127.0.0.1:1", "[::1]:2"}).ok());
  EXPECT_FALSE(client::StaticTarget({}).ok());
}

TEST(Client, CreateValidatesOptions) {
  client::ClientOptions o;
  o.addresses = {"127.0.0.1:1", "127.0.0.1:2"};
  auto c = client::Client::Create(o);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ((*c)->target(), "ipv4:127.0.0.1:1,127.0.0.1:2");
  o.addresses = {"nohostport"};
  EXPECT_EQ(client::Client::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
  o.addresses = {"127.0.0.1:1"};
  o.timeout = absl::ZeroDuration();
  EXPECT_EQ(client::Client::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(FaceInput, MatsTravelTightlyPackedInOpenCvOrder) {
  cv::Mat big(6, 8, CV_8UC3);
  cv::randu(big, 0, 255);
  const cv::Mat roi = big(cv::Rect(2, 1, 5, 4));  // not continuous: a stride of 8 pixels
  ASSERT_FALSE(roi.isContinuous());
  auto face = client::FaceInput::FromMat(roi, "roi");
  ASSERT_TRUE(face.ok()) << face.status();
  const auto& raw = face->proto().image().raw();
  EXPECT_EQ(raw.width(), 5u);
  EXPECT_EQ(raw.height(), 4u);
  EXPECT_EQ(raw.format(), arcface::v1::BGR8);
  ASSERT_EQ(raw.data().size(), 5u * 4 * 3);
  for (int y = 0; y < 4; ++y) {
    EXPECT_EQ(std::memcmp(raw.data().data() + y * 15, roi.ptr(y), 15), 0) << "row " << y;
  }
  cv::Mat bgra(3, 3, CV_8UC4, cv::Scalar(1, 2, 3, 4));
  auto f4 = client::FaceInput::FromMat(bgra);
  ASSERT_TRUE(f4.ok());
  std::string expected;
  for (int i = 0; i < 9; ++i) expected += std::string("\x01\x02\x03", 3);  // alpha dropped
  EXPECT_EQ(f4->proto().image().raw().data(), expected);
  EXPECT_EQ(f4->proto().image().raw().format(), arcface::v1::BGR8);
  auto gray = client::FaceInput::FromMat(cv::Mat(2, 2, CV_8UC1, cv::Scalar(7)));
  EXPECT_EQ(gray->proto().image().raw().format(), arcface::v1::GRAY8);
  EXPECT_EQ(client::FaceInput::FromMat(cv::Mat(), "x").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(client::FaceInput::FromMat(cv::Mat(2, 2, CV_32FC3), "f").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(client::FaceInput::FromFile("/nonexistent/x.jpg").status().code(),
            absl::StatusCode::kNotFound);
}

TEST(Client, DetectRefusesAFrameWithLandmarksOrABoxBeforeAnyCall) {
  client::ClientOptions o;
  o.addresses = {"127.0.0.1:1"};  // nothing listens: a call would be UNAVAILABLE
  o.retry.max_attempts = 1;
  auto c = client::Client::Create(o);
  ASSERT_TRUE(c.ok()) << c.status();
  client::FaceInput frame = client::FaceInput::FromEncoded("jpeg bytes", "cam0.jpg");
  frame.WithBox({1, 2, 3, 4});
  absl::StatusOr<client::Detection> d = (*c)->Detect(frame);
  EXPECT_EQ(d.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(d.status().message(),
            "Detect: cam0.jpg: a frame is a whole image: it must carry neither landmarks nor a "
            "box");
  // A plain frame gets as far as the network.
  EXPECT_EQ((*c)->Detect(client::FaceInput::FromEncoded("x")).status().code(),
            absl::StatusCode::kUnavailable);
}

// ---- CLI pieces

TEST(Summary, NormAndTheFirstFourValues) {
  EXPECT_EQ(cli::EmbeddingSummary(12.34567f, {0.5f, -0.25f, 1, 2, 3}),
            "norm=12.3457\t[0.50000, -0.25000, 1.00000, 2.00000, ... 5 values]");
}

TEST(Npy, HeaderAndLittleEndianRows) {
  const std::vector<float> values = {1.0f, -2.5f, 3.25f, 0.0f, 1e-3f, 7.0f};
  const std::string npy = cli::NpyBytes(values, 2, 3);
  ASSERT_EQ(npy.substr(0, 8), std::string("\x93NUMPY\x01\x00", 8));
  const size_t header_len = uint8_t(npy[8]) | (uint8_t(npy[9]) << 8);
  EXPECT_EQ((10 + header_len) % 64, 0u);  // data aligned as NumPy writes it
  const std::string header = npy.substr(10, header_len);
  EXPECT_EQ(header.rfind("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", 0), 0u);
  EXPECT_EQ(header.back(), '\n');
  ASSERT_EQ(npy.size(), 10 + header_len + values.size() * 4);
  // -2.5f is 0xC0200000: little-endian bytes 00 00 20 C0.
  EXPECT_EQ(npy.substr(10 + header_len + 4, 4), std::string("\x00\x00\x20\xC0", 4));
  EXPECT_NE(cli::NpyBytes({}, 0, 512).find("'shape': (0, 512)"), std::string::npos);
}

TEST(Npy, WriteEmbeddingsWritesTheSidecarAndRefusesUnknownExtensions) {
  const std::string dir = ::testing::TempDir();
  const std::string path = dir + "/client_unit_emb.npy";
  std::vector<cli::EmbeddingRow> rows = {{"a.jpg", 2.0f, {1, 2}}, {"dir/b c.png", 3.0f, {3, 4}}};
  ASSERT_TRUE(cli::WriteEmbeddings(path, rows, {}, "m", false).ok());
  EXPECT_EQ(cli::SidecarPath(path), dir + "/client_unit_emb.files.txt");
  std::ifstream side(cli::SidecarPath(path));
  std::string text((std::istreambuf_iterator<char>(side)), std::istreambuf_iterator<char>());
  EXPECT_EQ(text, "a.jpg\ndir/b c.png\n");
  EXPECT_EQ(std::filesystem::file_size(path), 128u + 4 * 4);
  EXPECT_EQ(cli::WriteEmbeddings(dir + "/x.txt", rows, {}, "m", false).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(cli::IsKnownOutputExtension("a/B.CSV"));
  EXPECT_FALSE(cli::IsKnownOutputExtension("a/b.npz"));
}

TEST(Percentile, NearestRank) {
  const std::vector<double> v = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
  EXPECT_EQ(cli::Percentile(v, 0), 1);
  EXPECT_EQ(cli::Percentile(v, 50), 5);
  EXPECT_EQ(cli::Percentile(v, 90), 9);
  EXPECT_EQ(cli::Percentile(v, 91), 10);
  EXPECT_EQ(cli::Percentile(v, 99), 10);
  EXPECT_EQ(cli::Percentile(v, 100), 10);
  EXPECT_EQ(cli::Percentile({42}, 99), 42);
  std::vector<double> hundred;
  for (int i = 1; i <= 100; ++i) hundred.push_back(i);
  EXPECT_EQ(cli::Percentile(hundred, 99), 99);
  EXPECT_EQ(cli::Percentile(hundred, 50), 50);
}

TEST(Csv, QuotesOnlyWhenNeeded) {
  EXPECT_EQ(cli::CsvField("a/b.jpg"), "a/b.jpg");
  EXPECT_EQ(cli::CsvField("a,b.jpg"), "\"a,b.jpg\"");
  EXPECT_EQ(cli::CsvField("say \"hi\".jpg"), "\"say \"\"hi\"\".jpg\"");
}

TEST(Landmarks, ForAllOrByFile) {
  auto all = cli::ParseLandmarksJson("[[1,2],[3,4],[5,6],[7,8],[9,10]]");
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_EQ(all->Find("any.jpg")->at(4), cv::Point2f(9, 10));
  auto by = cli::ParseLandmarksJson(
      R"({"dir/a.jpg": [[1,1],[2,2],[3,3],[4,4],[5,5]], "b.jpg": [[0,0],[0,0],[0,0],[0,0],[6,6]]})");
  ASSERT_TRUE(by.ok()) << by.status();
  EXPECT_EQ(by->Find("dir/a.jpg")->at(0), cv::Point2f(1, 1));
  EXPECT_EQ(by->Find("other/b.jpg")->at(4), cv::Point2f(6, 6));  // by base name
  EXPECT_FALSE(by->Find("c.jpg").has_value());
  for (const char* bad : {"", "{", "[[1,2]]", R"({"a": [[1,2],[3,4],[5,6],[7,8],[9]]})", "7"}) {
    EXPECT_EQ(cli::ParseLandmarksJson(bad).status().code(), absl::StatusCode::kInvalidArgument)
        << bad;
  }
}

TEST(Table, ColumnsAlignedByCodePointsWithoutTrailingSpaces) {
  EXPECT_EQ(cli::FormatTable({{"SUBJECT", "FACES", "LABELS"},
                              {"zoë", "12", "team=red"},
                              {"bob", "1", ""}}),
            "SUBJECT  FACES  LABELS\n"
            "zoë      12     team=red\n"
            "bob      1\n");
  EXPECT_EQ(cli::FormatTable({}), "");
  EXPECT_EQ(cli::FormatTable({{"a", "b"}, {"long-one"}}), "a         b\nlong-one\n");
}

TEST(Label, KeyEqualsValue) {
  auto l = cli::ParseLabel("team=red=blue");
  ASSERT_TRUE(l.ok()) << l.status();
  EXPECT_EQ(l->first, "team");
  EXPECT_EQ(l->second, "red=blue");  // the first '=' splits
  EXPECT_EQ(cli::ParseLabel("empty=")->second, "");
  for (const char* bad : {"team", "=red", ""}) {
    EXPECT_EQ(cli::ParseLabel(bad).status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
}

TEST(Box, Parse) {
  auto b = cli::ParseBox("10,20.5, 30,40");
  ASSERT_TRUE(b.ok());
  EXPECT_EQ((*b)[1], 20.5f);
  for (const char* bad : {"1,2,3", "1,2,3,x", "5,0,1,10", "0,5,10,1", "1,2,3,4,5"}) {
    EXPECT_FALSE(cli::ParseBox(bad).ok()) << bad;
  }
}

TEST(Progress, Text) {
  EXPECT_EQ(cli::FormatProgress(5, 20, absl::Seconds(2), 10),
            "[##........]  5/20 files  2.5/s  ETA 0:06");
  EXPECT_EQ(cli::FormatProgress(0, 3, absl::ZeroDuration(), 4), "[....] 0/3 files  0.0/s  ETA --:--");
  EXPECT_EQ(cli::FormatProgress(1, 7201, absl::Seconds(1), 2), "[..]    1/7201 files  1.0/s  ETA 2:00:00");
}

TEST(Plot, MatrixLayoutAndColours) {
  EXPECT_EQ(cli::MatrixCellSize(5), 96);
  EXPECT_EQ(cli::MatrixCellSize(32), 48);
  EXPECT_EQ(cli::MatrixCellSize(200), 32);
  std::vector<cv::Mat> thumbs(3, cv::Mat(50, 80, CV_8UC3, cv::Scalar(0, 255, 0)));
  thumbs[1] = cv::Mat();  // placeholder
  const std::vector<float> sims = {1, -1, 0, -1, 1, 0.5f, 0, 0.5f, 1};
  cv::Mat m = cli::DrawSimilarityMatrix(thumbs, sims, 0.4f, "t", "");
  EXPECT_EQ(m.cols, 96 + 3 * 96 + cli::kColorBarWidth);
  EXPECT_EQ(m.rows, cli::kTitleHeight + 96 + 3 * 96 + cli::kBottomMargin);
  // Cell (0, 1) is -1: blue, sampled away from its printed value.
  const cv::Vec3b blue = m.at<cv::Vec3b>(cli::kTitleHeight + 96 + 5, 96 + 96 + 5);
  const cv::Scalar want = cli::CosineColor(-1);
  EXPECT_EQ(blue, cv::Vec3b(want[0], want[1], want[2]));
  EXPECT_EQ(cli::CosineColor(0), cv::Scalar(242, 242, 242));
  // At or above the threshold 0.4 a cell is framed ("same"): cell (1, 2) is 0.5, cell (0, 2)
  // is 0 and keeps its colour to the edge. Sampled on the frame, halfway down the left side.
  auto pixel = [&](int r, int c) {
    return m.at<cv::Vec3b>(cli::kTitleHeight + 96 + r * 96 + 48, 96 + c * 96 + 2);
  };
  const cv::Vec3b green(cli::kSameFrame[0], cli::kSameFrame[1], cli::kSameFrame[2]);
  EXPECT_EQ(pixel(1, 2), green);
  EXPECT_EQ(pixel(2, 2), green);  // the diagonal
  const cv::Scalar white = cli::CosineColor(0);
  EXPECT_EQ(pixel(0, 2), cv::Vec3b(white[0], white[1], white[2]));
}

TEST(Plot, DetectionsDrawBoxesLandmarksAndLabels) {
  const cv::Mat image(300, 400, CV_8UC3, cv::Scalar(90, 90, 90));
  cli::DrawnFace a{cv::Rect2f(50, 100, 100, 120), {}, "1 alice 0.87"};
  a.landmarks = {cv::Point2f(80, 140), cv::Point2f(120, 140), cv::Point2f(100, 165),
                 cv::Point2f(85, 190), cv::Point2f(115, 190)};
  cli::DrawnFace b{cv::Rect2f(250, 60, 80, 90), {}, "2 0.95"};
  b.landmarks = {cv::Point2f(270, 90), cv::Point2f(310, 90), cv::Point2f(290, 110),
                 cv::Point2f(275, 130), cv::Point2f(305, 130)};
  cv::Mat m = cli::DrawDetections(image, {a, b});
  ASSERT_EQ(m.size(), image.size());
  auto bgr = [](const cv::Scalar& c) { return cv::Vec3b(c[0], c[1], c[2]); };
  // Each box in its palette colour (its left edge, half-way down), each dot in its point's.
  EXPECT_EQ(m.at<cv::Vec3b>(160, 50), bgr(cli::kDetectionPalette[0]));
  EXPECT_EQ(m.at<cv::Vec3b>(105, 250), bgr(cli::kDetectionPalette[1]));
  for (const cli::DrawnFace* f : {&a, &b}) {
    for (int k = 0; k < 5; ++k) {
      const cv::Point2f& p = f->landmarks[k];
      EXPECT_EQ(m.at<cv::Vec3b>(int(p.y), int(p.x)), bgr(cli::kLandmarkColors[k])) << f->label << k;
    }
  }
  // The label sits on a box of the face's colour above it; the inside of a box is untouched.
  EXPECT_EQ(m.at<cv::Vec3b>(100 - 3, 50 + 1), bgr(cli::kDetectionPalette[0]));
  EXPECT_EQ(m.at<cv::Vec3b>(120, 70), cv::Vec3b(90, 90, 90));
  EXPECT_EQ(cli::LandmarkRadius(image.size()), 2);
  EXPECT_EQ(cli::LandmarkRadius(cv::Size(1920, 1080)), 7);
}

}  // namespace
}  // namespace arcface
