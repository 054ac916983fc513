// Unit tests of the service library (server/service): metrics exposition, status mapping, flag
// parsing, the Embedder over a puppet batcher, and the FaceEmbedding service through a real
// in-process gRPC server on 127.0.0.1:0 with a fake model (no torch): the fake's embedding of a
// crop is a deterministic function of its bytes, so every expected value is computed here.
#include <grpcpp/grpcpp.h>
#include <malloc.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <initializer_list>
#include <iostream>
#include <map>
#include <memory>
#include <numeric>
#include <opencv2/imgcodecs.hpp>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "arcface/v1/face_embedding.grpc.pb.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/gallery/hnsw_index.h"
#include "server/service/compare_call.h"
#include "server/service/cosine.h"
#include "server/service/embedder.h"
#include "server/service/embedding_model.h"
#include "server/service/face_embedding_service.h"
#include "server/service/face_preprocess.h"
#include "server/service/server_config.h"
#include "server/service/service_metrics.h"
#include "server/service/status_mapping.h"
#include "server/service/work_queue.h"
#include "tests/service/fake_model.h"
#include "tests/test_util/exposition.h"
#include "tests/test_util/fake_clock.h"
#include "tests/test_util/seeded_bytes.h"

namespace arcface::service {
namespace {

using ::arcface::test_util::ParseExposition;
using ::arcface::test_util::Sample;
using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
namespace v1 = ::arcface::v1;

// A 112×112 RGB crop filled from a seed; a raw 112×112 face is copied into the crop unchanged.
std::vector<uint8_t> SeededCrop(int seed) {
  return test_util::SeededBytes(kCropBytes, 2463534242u + seed * 7919u);
}

v1::Face RawFace(const std::vector<uint8_t>& rgb, int width = kCropSize, int height = kCropSize) {
  v1::Face face;
  v1::RawImage* raw = face.mutable_image()->mutable_raw();
  raw->set_width(width);
  raw->set_height(height);
  raw->set_format(v1::RGB8);
  raw->set_data(std::string(rgb.begin(), rgb.end()));
  return face;
}

double Cosine(const std::vector<float>& a, const std::vector<float>& b) {
  double dot = 0;
  for (size_t i = 0; i < a.size(); ++i) dot += double(a[i]) * b[i];
  return dot / (Norm(a) * Norm(b));
}

// ---------------------------------------------------------------------------------------------
// Status mapping

TEST(StatusMapping, KeepsCodeAndMessage) {
  for (int code = 0; code <= 16; ++code) {
    absl::Status s(static_cast<absl::StatusCode>(code), code == 0 ? "" : "why");
    grpc::Status g = ToGrpcStatus(s);
    EXPECT_EQ(static_cast<int>(g.error_code()), code);
    if (code != 0) {
      EXPECT_EQ(g.error_message(), "why");
    }
    EXPECT_EQ(FromGrpcStatus(g), s);
  }
  EXPECT_EQ(ToGrpcStatus(absl::InvalidArgumentError("face 3: undecodable image")).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(ToGrpcStatus(absl::Status(static_cast<absl::StatusCode>(99), "odd")).error_code(),
            grpc::StatusCode::UNKNOWN);
  v1::Status proto;
  ToProtoStatus(absl::ResourceExhaustedError("queue full"), &proto);
  EXPECT_EQ(proto.code(), 8);
  EXPECT_EQ(proto.message(), "queue full");
}

// ---------------------------------------------------------------------------------------------
// Flags

struct FlagRun {
  int exit_code;
  std::string out;
  std::string err;
  ServerConfig config;
};

FlagRun RunFlags(std::vector<std::string> args) {
  args.insert(args.begin(), "arcface-server");
  std::vector<const char*> argv;
  for (const auto& a : args) argv.push_back(a.c_str());
  std::ostringstream out, err;
  ParsedFlags p = ParseServerFlags(static_cast<int>(argv.size()), argv.data(), out, err);
  return {p.exit_code, out.str(), err.str(), p.config};
}

TEST(ServerFlags, DefaultsWithDemoWeights) {
  FlagRun r = RunFlags({"--demo-weights"});
  ASSERT_EQ(r.exit_code, -1) << r.err;
  EXPECT_TRUE(r.config.demo_weights);
  EXPECT_EQ(r.config.listen, "0.0.0.0:50051");
  EXPECT_EQ(r.config.http_listen, "0.0.0.0:8080");
  EXPECT_EQ(r.config.device, "auto");
  EXPECT_EQ(r.config.precision, "fp32");
  EXPECT_EQ(r.config.max_batch_size, 32);
  EXPECT_EQ(r.config.max_queue_delay_us, 2000);
  EXPECT_EQ(r.config.max_queue_size, 4096);
  EXPECT_EQ(r.config.max_faces_per_request, 256);
  EXPECT_EQ(r.config.max_message_bytes, 64 << 20);
  EXPECT_EQ(r.config.max_image_pixels, 40000000);
  EXPECT_EQ(r.config.preprocess_queue, 0);  // automatic
  EXPECT_EQ(r.config.drain_timeout, absl::Seconds(30));
}

TEST(ServerFlags, BadValuesExitTwoNamingTheFlag) {
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{}, "--weights"},
      {{"--demo-weights", "--weights", "/nonexistent"}, "--weights"},
      {{"--weights", "/nonexistent/w.safetensors"}, "--weights"},
      {{"--demo-weights", "--bogus"}, "--bogus"},
      {{"--demo-weights", "--max-batch-size", "0"}, "--max-batch-size"},
      {{"--demo-weights", "--max-batch-size", "abc"}, "--max-batch-size"},
      {{"--demo-weights", "--max-queue-size", "8", "--max-batch-size", "16"}, "--max-queue-size"},
      {{"--demo-weights", "--max-queue-delay-us", "-1"}, "--max-queue-delay-us"},
      {{"--demo-weights", "--max-faces-per-request", "0"}, "--max-faces-per-request"},
      {{"--demo-weights", "--max-message-bytes", "10"}, "--max-message-bytes"},
      {{"--demo-weights", "--max-image-pixels", "0"}, "--max-image-pixels"},
      {{"--demo-weights", "--device", "gpu"}, "--device"},
      {{"--demo-weights", "--precision", "int4"}, "--precision"},
      {{"--demo-weights", "--threads", "-2"}, "--threads"},
      {{"--demo-weights", "--preprocess-queue", "-1"}, "--preprocess-queue"},
      {{"--demo-weights", "--drain-timeout", "soon"}, "--drain-timeout"},
      {{"--demo-weights", "--log-level", "loud"}, "--log-level"},
      {{"--demo-weights", "--log-format", "xml"}, "--log-format"},
      {{"--demo-weights", "--listen", "nonsense"}, "--listen"},
      {{"--demo-weights", "--http-listen", "1.2.3.4:99999"}, "--http-listen"},
      {{"--demo-weights", "--tls-cert", "/etc/hostname"}, "--tls-cert"},
      {{"--demo-weights", "--tls-cert", "/nonexistent", "--tls-key", "/nonexistent"}, "--tls-cert"},
  };
  for (const auto& [args, flag] : cases) {
    FlagRun r = RunFlags(args);
    EXPECT_EQ(r.exit_code, 2) << absl::StrJoin(args, " ");
    EXPECT_THAT(r.err, HasSubstr(flag)) << absl::StrJoin(args, " ");
  }
}

TEST(ServerFlags, SeveralModelsByName) {
  // --model ones first, in order, then --weights's and --demo-weights's; the first is the default.
  FlagRun r = RunFlags(
      {"--model", "dlib.v1=/etc/hostname", "--model", "r100=/etc/hostname", "--demo-weights"});
  ASSERT_EQ(r.exit_code, -1) << r.err;
  std::vector<ModelSpec> served = ServedModelSpecs(r.config);
  ASSERT_EQ(served.size(), 3u);
  EXPECT_EQ(served[0].name, "dlib.v1");
  EXPECT_EQ(served[0].path, "/etc/hostname");
  EXPECT_FALSE(served[0].demo);
  EXPECT_EQ(served[1].name, "r100");
  EXPECT_EQ(served[2].name, "arcface-demo");
  EXPECT_TRUE(served[2].demo);
  r = RunFlags({"--weights", "/etc/hostname"});
  ASSERT_EQ(r.exit_code, -1) << r.err;
  served = ServedModelSpecs(r.config);
  ASSERT_EQ(served.size(), 1u);
  EXPECT_EQ(served[0].name, "arcface");
  EXPECT_EQ(served[0].path, "/etc/hostname");
  setenv("ARCFACE_MODELS", "a=/etc/hostname,b_2=/etc/hostname", 1);
  r = RunFlags({});
  unsetenv("ARCFACE_MODELS");
  ASSERT_EQ(r.exit_code, -1) << r.err;
  ASSERT_EQ(r.config.models.size(), 2u);
  EXPECT_EQ(r.config.models[1].name, "b_2");

  const std::vector<std::pair<std::vector<std::string>, std::string>> bad = {
      {{"--model", "Arc=/etc/hostname"},
       "--model: model name 'Arc' must be 1 to 64 characters of a-z, 0-9, '_', '.' and '-'"},
      {{"--model", std::string(65, 'a') + "=/etc/hostname"}, "must be 1 to 64 characters"},
      {{"--model", "=/etc/hostname"}, "model name '' must be"},
      {{"--model", "arcface"}, "'arcface' is not NAME=PATH"},
      {{"--model", "a=/nonexistent/w"}, "/nonexistent/w: no such file (model 'a')"},
      {{"--model", "a=/etc/hostname", "--model", "a=/etc/hostname"},
       "--model: model name 'a' is given twice"},
      {{"--model", "arcface=/etc/hostname", "--weights", "/etc/hostname"},
       "--model: model name 'arcface' is given twice"},
  };
  for (const auto& [args, message] : bad) {
    FlagRun b = RunFlags(args);
    EXPECT_EQ(b.exit_code, 2) << absl::StrJoin(args, " ");
    EXPECT_THAT(b.err, HasSubstr(message)) << absl::StrJoin(args, " ");
  }
}

TEST(ServerFlags, EnvironmentVariablesAndHelp) {
  setenv("ARCFACE_DEMO_WEIGHTS", "true", 1);
  setenv("ARCFACE_MAX_BATCH_SIZE", "8", 1);
  setenv("ARCFACE_DRAIN_TIMEOUT", "1.5", 1);
  FlagRun r = RunFlags({"--max-queue-size", "64"});
  unsetenv("ARCFACE_DEMO_WEIGHTS");
  unsetenv("ARCFACE_MAX_BATCH_SIZE");
  unsetenv("ARCFACE_DRAIN_TIMEOUT");
  ASSERT_EQ(r.exit_code, -1) << r.err;
  EXPECT_TRUE(r.config.demo_weights);
  EXPECT_EQ(r.config.max_batch_size, 8);
  EXPECT_EQ(r.config.max_queue_size, 64);
  EXPECT_EQ(r.config.drain_timeout, absl::Milliseconds(1500));

  FlagRun help = RunFlags({"--help"});
  EXPECT_EQ(help.exit_code, 0);
  EXPECT_THAT(help.out, HasSubstr("ARCFACE_MAX_FACES_PER_REQUEST"));
  EXPECT_THAT(help.out, ::testing::Not(HasSubstr("test-hold-model-file")));
}

// A numeric flag: its default, a value given by the flag and one by its environment variable,
// each bad value refused (exit 2) naming the flag, and the variable listed in --help.
template <typename T>
void CheckNumericFlag(const std::string& flag, const char* env_var, T ServerConfig::*field,
                      T default_value, const std::string& flag_value, const char* env_value,
                      std::initializer_list<const char*> bad_values) {
  FlagRun defaults = RunFlags({"--demo-weights"});
  ASSERT_EQ(defaults.exit_code, -1) << defaults.err;
  EXPECT_EQ(defaults.config.*field, default_value);
  FlagRun flagged = RunFlags({"--demo-weights", flag, flag_value});
  ASSERT_EQ(flagged.exit_code, -1) << flagged.err;
  EXPECT_EQ(flagged.config.*field, static_cast<T>(std::stoll(flag_value)));
  setenv(env_var, env_value, 1);
  FlagRun env = RunFlags({"--demo-weights"});
  unsetenv(env_var);
  ASSERT_EQ(env.exit_code, -1) << env.err;
  EXPECT_EQ(env.config.*field, static_cast<T>(std::stoll(env_value)));
  for (const char* bad : bad_values) {
    FlagRun r = RunFlags({"--demo-weights", flag, bad});
    EXPECT_EQ(r.exit_code, 2) << bad;
    EXPECT_THAT(r.err, HasSubstr(flag)) << bad;
  }
  FlagRun help = RunFlags({"--help"});
  EXPECT_THAT(help.out, HasSubstr(env_var));
}

TEST(ServerFlags, MaxBatchesInFlight) {
  // Default 0: 1 on the CPU, the lanes on CUDA.
  CheckNumericFlag("--max-batches-in-flight", "ARCFACE_MAX_BATCHES_IN_FLIGHT",
                   &ServerConfig::max_batches_in_flight, 0, "3", "16", {"-1", "17", "two"});
}

TEST(ServerFlags, CancelPollInterval) {
  CheckNumericFlag<int64_t>("--cancel-poll-interval-us", "ARCFACE_CANCEL_POLL_INTERVAL_US",
                            &ServerConfig::cancel_poll_interval_us, 20000, "0", "5000",
                            {"-1", "10000001", "soon"});
  EXPECT_EQ(absl::Microseconds(ServerConfig().cancel_poll_interval_us),
            batching::DynamicBatcher::Options().cancel_poll_interval);
}

TEST(ServerFlags, GalleryStoreAndLimits) {
  FlagRun defaults = RunFlags({"--demo-weights"});
  ASSERT_EQ(defaults.exit_code, -1) << defaults.err;
  EXPECT_EQ(defaults.config.gallery_store, "none");
  for (const char* good :
       {"none", "sqlite:/data/g.db", "postgres://arc@db:5432/faces", "postgresql://db/faces"}) {
    FlagRun r = RunFlags({"--demo-weights", "--gallery-store", good});
    EXPECT_EQ(r.exit_code, -1) << good << ": " << r.err;
    EXPECT_EQ(r.config.gallery_store, good);
  }
  for (const char* bad : {"sqlite:", "mysql://db", "/data/g.db", ""}) {
    FlagRun r = RunFlags({"--demo-weights", "--gallery-store", bad});
    EXPECT_EQ(r.exit_code, 2) << bad;
    EXPECT_THAT(r.err, HasSubstr("--gallery-store")) << bad;
  }
  // The message never echoes the URI (it may hold a password).
  FlagRun secret = RunFlags({"--demo-weights", "--gallery-store", "mysql://u:hunter2@db"});
  EXPECT_THAT(secret.err, ::testing::Not(HasSubstr("hunter2")));
  setenv("ARCFACE_GALLERY_STORE", "sqlite:/tmp/x.db", 1);
  FlagRun env = RunFlags({"--demo-weights"});
  unsetenv("ARCFACE_GALLERY_STORE");
  EXPECT_EQ(env.config.gallery_store, "sqlite:/tmp/x.db");
  CheckNumericFlag("--gallery-max-faces-per-enroll", "ARCFACE_GALLERY_MAX_FACES_PER_ENROLL",
                   &ServerConfig::gallery_max_faces_per_enroll, 64, "8", "100000",
                   {"0", "100001", "many"});
  CheckNumericFlag("--gallery-max-probes", "ARCFACE_GALLERY_MAX_PROBES",
                   &ServerConfig::gallery_max_probes, 256, "1", "512", {"0", "-3"});
  CheckNumericFlag("--gallery-max-top-k", "ARCFACE_GALLERY_MAX_TOP_K",
                   &ServerConfig::gallery_max_top_k, 100, "10", "10000", {"0", "10001"});
  CheckNumericFlag("--gallery-threads", "ARCFACE_GALLERY_THREADS", &ServerConfig::gallery_threads,
                   2, "4", "1", {"0", "257"});
  CheckNumericFlag<int64_t>("--gallery-hnsw-min-faces", "ARCFACE_GALLERY_HNSW_MIN_FACES",
                            &ServerConfig::gallery_hnsw_min_faces, 0, "100000", "5", {"-1"});
  CheckNumericFlag("--gallery-hnsw-m", "ARCFACE_GALLERY_HNSW_M", &ServerConfig::gallery_hnsw_m, 48,
                   "16", "64", {"3", "257"});
  CheckNumericFlag("--gallery-hnsw-ef-search", "ARCFACE_GALLERY_HNSW_EF_SEARCH",
                   &ServerConfig::gallery_hnsw_ef_search, 256, "64", "128", {"0", "65537"});
  // The flags' defaults are the graph's own.
  EXPECT_EQ(ServerConfig().gallery_hnsw_m, gallery::HnswOptions().m);
  EXPECT_EQ(ServerConfig().gallery_hnsw_ef_search, gallery::HnswOptions().ef_search);
}

TEST(ServerFlags, DetectorAndItsBatcher) {
  FlagRun defaults = RunFlags({"--demo-weights"});
  ASSERT_EQ(defaults.exit_code, -1) << defaults.err;
  EXPECT_EQ(defaults.config.detector, "none");
  std::string network, dir;
  EXPECT_FALSE(ParseDetectorFlag("none", &network, &dir));
  const std::string folder = ::testing::TempDir();
  for (const auto& [value, want_network] : std::vector<std::pair<std::string, std::string>>{
           {folder, ""},
           {"tiny_face_detector:" + folder, "tiny_face_detector"},
           {"ssd_mobilenetv1:" + folder, "ssd_mobilenetv1"}}) {
    FlagRun r = RunFlags({"--demo-weights", "--detector", value});
    ASSERT_EQ(r.exit_code, -1) << value << ": " << r.err;
    EXPECT_EQ(r.config.detector, value);
    ASSERT_TRUE(ParseDetectorFlag(r.config.detector, &network, &dir));
    EXPECT_EQ(network, want_network);
    EXPECT_EQ(dir, folder);
  }
  for (const char* bad :
       {"/nonexistent/face-api", "tiny_face_detector:/nonexistent", "ssd_mobilenetv1:", ""}) {
    FlagRun r = RunFlags({"--demo-weights", "--detector", bad});
    EXPECT_EQ(r.exit_code, 2) << bad;
    EXPECT_THAT(r.err, HasSubstr("--detector")) << bad;
  }
  FlagRun missing = RunFlags({"--demo-weights", "--detector", "/nonexistent/face-api"});
  EXPECT_THAT(missing.err, HasSubstr("/nonexistent/face-api: no such folder"));
  setenv("ARCFACE_DETECTOR", folder.c_str(), 1);
  FlagRun env = RunFlags({"--demo-weights"});
  unsetenv("ARCFACE_DETECTOR");
  EXPECT_EQ(env.config.detector, folder);
  CheckNumericFlag("--detector-max-batch-size", "ARCFACE_DETECTOR_MAX_BATCH_SIZE",
                   &ServerConfig::detector_max_batch_size, 8, "16", "4", {"0", "1025", "x"});
  CheckNumericFlag<int64_t>("--detector-max-queue-delay-us", "ARCFACE_DETECTOR_MAX_QUEUE_DELAY_US",
                            &ServerConfig::detector_max_queue_delay_us, 2000, "0", "500",
                            {"-1", "10000001"});
  CheckNumericFlag("--detector-max-queue-size", "ARCFACE_DETECTOR_MAX_QUEUE_SIZE",
                   &ServerConfig::detector_max_queue_size, 64, "128", "32", {"0", "4"});
  CheckNumericFlag<int64_t>("--detector-max-held-mib", "ARCFACE_DETECTOR_MAX_HELD_MIB",
                            &ServerConfig::detector_max_held_mib, 1024, "16", "4096",
                            {"15", "1048577", "x"});
  CheckNumericFlag("--detector-max-faces", "ARCFACE_DETECTOR_MAX_FACES",
                   &ServerConfig::detector_max_faces, 256, "10", "5118", {"0", "5119"});
  EXPECT_FLOAT_EQ(defaults.config.detector_min_score, 0.5f);
  FlagRun score = RunFlags({"--demo-weights", "--detector-min-score", "0.7"});
  ASSERT_EQ(score.exit_code, -1) << score.err;
  EXPECT_FLOAT_EQ(score.config.detector_min_score, 0.7f);
  setenv("ARCFACE_DETECTOR_MIN_SCORE", "0.25", 1);
  FlagRun score_env = RunFlags({"--demo-weights"});
  unsetenv("ARCFACE_DETECTOR_MIN_SCORE");
  EXPECT_FLOAT_EQ(score_env.config.detector_min_score, 0.25f);
  for (const char* bad : {"-0.1", "1.5", "nan", "high"}) {
    FlagRun r = RunFlags({"--demo-weights", "--detector-min-score", bad});
    EXPECT_EQ(r.exit_code, 2) << bad;
    EXPECT_THAT(r.err, HasSubstr("--detector-min-score")) << bad;
  }
  FlagRun help = RunFlags({"--help"});
  EXPECT_THAT(help.out, HasSubstr("ARCFACE_DETECTOR_MIN_SCORE"));
  EXPECT_THAT(help.out, HasSubstr("(Env:ARCFACE_DETECTOR)"));
}

TEST(ServerFlags, DrainTimeoutForms) {
  absl::Duration d;
  ASSERT_TRUE(ParseDrainTimeout("30s", &d));
  EXPECT_EQ(d, absl::Seconds(30));
  ASSERT_TRUE(ParseDrainTimeout("500ms", &d));
  EXPECT_EQ(d, absl::Milliseconds(500));
  ASSERT_TRUE(ParseDrainTimeout("2", &d));
  EXPECT_EQ(d, absl::Seconds(2));
  EXPECT_FALSE(ParseDrainTimeout("forever", &d));
}

TEST(ServerFlags, AdminRpcOnlyOnLoopbackOrWithMutualTls) {
  for (const char* local : {"127.0.0.1:50051", "127.1.2.3:0", "[::1]:50051", "localhost:1",
                            "unix:/run/arcface.sock", "unix-abstract:arcface"}) {
    EXPECT_TRUE(IsLoopback(local)) << local;
  }
  for (const char* open : {"0.0.0.0:50051", "[::]:50051", "10.1.2.3:50051", "[fe80::1]:1",
                           "localhost.example.com:1", "128.0.0.1:1", "[::1:50051", "host:1"}) {
    EXPECT_FALSE(IsLoopback(open)) << open;
  }
  FlagRun r = RunFlags({"--demo-weights", "--admin-rpc", "--listen", "127.0.0.1:0"});
  EXPECT_EQ(r.exit_code, -1) << r.err;
  EXPECT_TRUE(r.config.admin_rpc);
  EXPECT_FALSE(RunFlags({"--demo-weights"}).config.admin_rpc);
  r = RunFlags({"--demo-weights", "--admin-rpc"});  // the default --listen, 0.0.0.0:50051
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr("--admin-rpc: --listen 0.0.0.0:50051 can be reached from other "
                               "machines; the admin RPC is served there only with mutual TLS"));
  // With mutual TLS (the files only need to exist for the flags) any address will do.
  const std::string pem = absl::StrCat(::testing::TempDir(), "/admin_flags.pem");
  std::ofstream(pem) << "x";
  r = RunFlags({"--demo-weights", "--admin-rpc", "--tls-cert", pem, "--tls-key", pem,
                "--tls-client-ca", pem});
  EXPECT_EQ(r.exit_code, -1) << r.err;
  r = RunFlags({"--demo-weights", "--admin-rpc", "--tls-cert", pem, "--tls-key", pem});
  EXPECT_EQ(r.exit_code, 2) << "TLS without client certificates is not enough";
  std::remove(pem.c_str());
}

// ---------------------------------------------------------------------------------------------
// Embedder over a puppet batcher

TEST(Embedder, SplitsAcrossBatchesAndKeepsOrder) {
  FakeModel model;
  batching::FakeClock clock;
  EmbedderOptions options;
  options.batching.max_batch_size = 4;
  options.batching.max_queue_size = 64;
  options.batching.max_queue_delay = absl::Milliseconds(1);
  options.batching.start_batch_thread = false;
  auto embedder = Embedder::Create(options, &model, &clock);
  ASSERT_TRUE(embedder.ok()) << embedder.status();

  // Request a: 3 crops; request b: 6 crops. Batches: [a0 a1 a2 b0] [b1 b2 b3 b4] [b5].
  std::vector<std::vector<uint8_t>> crops_a, crops_b;
  std::vector<uint8_t> buf_a, buf_b;
  for (int i = 0; i < 3; ++i) {
    crops_a.push_back(SeededCrop(i));
    buf_a.insert(buf_a.end(), crops_a.back().begin(), crops_a.back().end());
  }
  for (int i = 0; i < 6; ++i) {
    crops_b.push_back(SeededCrop(100 + i));
    buf_b.insert(buf_b.end(), crops_b.back().begin(), crops_b.back().end());
  }
  absl::StatusOr<EmbeddingBatch> out_a = absl::UnknownError("not done");
  absl::StatusOr<EmbeddingBatch> out_b = absl::UnknownError("not done");
  int done_a = 0, done_b = 0;
  ASSERT_TRUE((*embedder)
                  ->Submit(std::move(buf_a), absl::InfiniteFuture(), nullptr,
                           [&](absl::StatusOr<EmbeddingBatch> r) {
                             out_a = std::move(r);
                             ++done_a;
                           })
                  .ok());
  ASSERT_TRUE((*embedder)
                  ->Submit(std::move(buf_b), absl::InfiniteFuture(), nullptr,
                           [&](absl::StatusOr<EmbeddingBatch> r) {
                             out_b = std::move(r);
                             ++done_b;
                           })
                  .ok());
  auto& batcher = (*embedder)->batcher();
  EXPECT_EQ(*batcher.RunOnce(), 4);
  EXPECT_EQ(*batcher.RunOnce(), 4);
  EXPECT_EQ(*batcher.RunOnce(), 0);  // b5 waits for its delay
  clock.Advance(absl::Milliseconds(1));
  EXPECT_EQ(*batcher.RunOnce(), 1);
  EXPECT_THAT(model.batch_sizes(), ElementsAre(4, 4, 1));
  EXPECT_EQ(done_a, 1);
  EXPECT_EQ(done_b, 1);
  ASSERT_TRUE(out_a.ok());
  ASSERT_TRUE(out_b.ok());
  ASSERT_EQ(out_a->values.size(), 3u * kEmbeddingDim);
  ASSERT_EQ(out_b->values.size(), 6u * kEmbeddingDim);
  for (int i = 0; i < 3; ++i) {
    std::vector<float> want = FakeEmbedding(crops_a[i].data());
    EXPECT_TRUE(std::equal(want.begin(), want.end(), out_a->values.begin() + i * kEmbeddingDim))
        << "a" << i;
  }
  for (int i = 0; i < 6; ++i) {
    std::vector<float> want = FakeEmbedding(crops_b[i].data());
    EXPECT_TRUE(std::equal(want.begin(), want.end(), out_b->values.begin() + i * kEmbeddingDim))
        << "b" << i;
  }
}

// With the batcher's threads: the crops queued while the model runs are gathered for the next
// batch; a request cancelled meanwhile leaves it, and the crops behind it still reach the model
// in their right place (each answer is the fake embedding of the request's own crop).
TEST(Embedder, PipelinedBatchesGatherEachCropIntoItsPlace) {
  FakeModel model;
  batching::FakeClock clock;
  EmbedderOptions options;
  options.batching.max_batch_size = 4;
  options.batching.max_queue_size = 64;
  options.batching.max_queue_delay = absl::Milliseconds(1);
  auto embedder = Embedder::Create(options, &model, &clock);
  ASSERT_TRUE(embedder.ok()) << embedder.status();

  struct Request {
    std::vector<std::vector<uint8_t>> crops;
    absl::StatusOr<EmbeddingBatch> out = absl::UnknownError("not done");
    absl::Notification done;
  };
  std::atomic<bool> b_cancelled{false};
  auto submit = [&](Request& r, int seed, int n, std::function<bool()> is_cancelled) {
    std::vector<uint8_t> buf;
    for (int i = 0; i < n; ++i) {
      r.crops.push_back(SeededCrop(seed + i));
      buf.insert(buf.end(), r.crops.back().begin(), r.crops.back().end());
    }
    return (*embedder)->Submit(std::move(buf), absl::InfiniteFuture(), std::move(is_cancelled),
                               [&r](absl::StatusOr<EmbeddingBatch> out) {
                                 r.out = std::move(out);
                                 r.done.Notify();
                               });
  };
  Request a, b, c, d;
  model.Hold();
  ASSERT_TRUE(submit(a, 0, 4, nullptr).ok());  // a full batch: in the model at once
  ASSERT_TRUE(model.WaitForBatches(1));
  ASSERT_TRUE(submit(b, 10, 2, [&b_cancelled] { return b_cancelled.load(); }).ok());
  ASSERT_TRUE(submit(c, 20, 1, nullptr).ok());
  ASSERT_TRUE(submit(d, 30, 2, nullptr).ok());
  b_cancelled.store(true);
  model.Release();
  for (Request* r : {&a, &c})
    ASSERT_TRUE(r->done.WaitForNotificationWithTimeout(absl::Seconds(60)));
  ASSERT_TRUE(b.done.WaitForNotificationWithTimeout(absl::Seconds(60)));
  EXPECT_EQ(b.out.status().code(), absl::StatusCode::kCancelled);
  if (!d.done.HasBeenNotified()) {  // d's second crop did not fit in c's batch: its delay
    clock.Advance(absl::Milliseconds(1));
  }
  ASSERT_TRUE(d.done.WaitForNotificationWithTimeout(absl::Seconds(60)));
  EXPECT_THAT(model.batch_sizes(), ElementsAre(4, 3));  // [a a a a] [c d d]
  for (Request* r : {&a, &c, &d}) {
    ASSERT_TRUE(r->out.ok()) << r->out.status();
    ASSERT_EQ(r->out->values.size(), r->crops.size() * kEmbeddingDim);
    for (size_t i = 0; i < r->crops.size(); ++i) {
      std::vector<float> want = FakeEmbedding(r->crops[i].data());
      EXPECT_TRUE(std::equal(want.begin(), want.end(), r->out->values.begin() + i * kEmbeddingDim));
    }
  }
}

// Two model threads: two batches of one request are in the model at once (the third waits for a
// free thread), and every crop's row lands at its own place whichever batch brings it back.
TEST(Embedder, TwoBatchesInFlightFillOneRequestsRowsInPlace) {
  FakeModel model;
  batching::FakeClock clock;
  EmbedderOptions options;
  options.batching.max_batch_size = 2;
  options.batching.max_queue_size = 64;
  options.batching.max_queue_delay = absl::Milliseconds(1);
  options.batching.max_batches_in_flight = 2;
  auto embedder = Embedder::Create(options, &model, &clock);
  ASSERT_TRUE(embedder.ok()) << embedder.status();

  std::vector<std::vector<uint8_t>> crops;
  std::vector<uint8_t> buf;
  for (int i = 0; i < 6; ++i) {
    crops.push_back(SeededCrop(100 + i));
    buf.insert(buf.end(), crops.back().begin(), crops.back().end());
  }
  absl::StatusOr<EmbeddingBatch> out = absl::UnknownError("not done");
  absl::Notification done;
  model.Hold();
  ASSERT_TRUE((*embedder)
                  ->Submit(std::move(buf), absl::InfiniteFuture(), nullptr,
                           [&](absl::StatusOr<EmbeddingBatch> result) {
                             out = std::move(result);
                             done.Notify();
                           })
                  .ok());
  ASSERT_TRUE(model.WaitForBatches(2));       // both inside Run() at once
  EXPECT_EQ(model.batch_sizes().size(), 2u);  // the third has no free thread
  EXPECT_FALSE(done.HasBeenNotified());
  model.Release();
  ASSERT_TRUE(done.WaitForNotificationWithTimeout(absl::Seconds(60)));
  EXPECT_THAT(model.batch_sizes(), ElementsAre(2, 2, 2));
  ASSERT_TRUE(out.ok()) << out.status();
  ASSERT_EQ(out->values.size(), crops.size() * kEmbeddingDim);
  for (size_t i = 0; i < crops.size(); ++i) {
    std::vector<float> want = FakeEmbedding(crops[i].data());
    EXPECT_TRUE(std::equal(want.begin(), want.end(), out->values.begin() + i * kEmbeddingDim)) << i;
  }
  EXPECT_EQ((*embedder)->batcher().counters().batches, 3);
}

TEST(Embedder, AModelFailureFailsOnlyItsBatch) {
  FakeModel model;
  batching::FakeClock clock;
  EmbedderOptions options;
  options.batching.max_batch_size = 2;
  options.batching.max_queue_size = 16;
  options.batching.start_batch_thread = false;
  auto embedder = Embedder::Create(options, &model, &clock);
  ASSERT_TRUE(embedder.ok());
  std::vector<absl::Status> results(3, absl::UnknownError("not done"));
  for (int i = 0; i < 3; ++i) {
    std::vector<uint8_t> crop = SeededCrop(i);
    ASSERT_TRUE(
        (*embedder)
            ->Submit(std::move(crop), absl::InfiniteFuture(), nullptr,
                     [&results, i](absl::StatusOr<EmbeddingBatch> r) { results[i] = r.status(); })
            .ok());
  }
  model.FailNext(absl::InternalError("device lost"));
  EXPECT_EQ(*(*embedder)->batcher().RunOnce(), 2);  // tasks 0 and 1 fail
  clock.Advance(absl::Milliseconds(5));
  EXPECT_EQ(*(*embedder)->batcher().RunOnce(), 1);  // task 2 succeeds
  EXPECT_EQ(results[0].code(), absl::StatusCode::kInternal);
  EXPECT_EQ(results[1].code(), absl::StatusCode::kInternal);
  EXPECT_TRUE(results[2].ok());
}

TEST(Embedder, ExpiredAndCancelledNeverReachTheModel) {
  FakeModel model;
  batching::FakeClock clock;
  EmbedderOptions options;
  options.batching.max_batch_size = 4;
  options.batching.max_queue_size = 16;
  options.batching.start_batch_thread = false;
  auto embedder = Embedder::Create(options, &model, &clock);
  ASSERT_TRUE(embedder.ok());
  absl::Status expired = absl::UnknownError(""), cancelled = absl::UnknownError("");
  ASSERT_TRUE((*embedder)
                  ->Submit(SeededCrop(1), clock.Now() + absl::Milliseconds(1), nullptr,
                           [&](absl::StatusOr<EmbeddingBatch> r) { expired = r.status(); })
                  .ok());
  ASSERT_TRUE((*embedder)
                  ->Submit(
                      SeededCrop(2), absl::InfiniteFuture(), [] { return true; },
                      [&](absl::StatusOr<EmbeddingBatch> r) { cancelled = r.status(); })
                  .ok());
  clock.Advance(absl::Milliseconds(5));
  EXPECT_EQ(*(*embedder)->batcher().RunOnce(), 0);
  EXPECT_EQ(expired.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(cancelled.code(), absl::StatusCode::kCancelled);
  EXPECT_TRUE(model.batch_sizes().empty());
}

TEST(Embedder, RejectsBadBuffersAndAFullQueue) {
  FakeModel model;
  batching::FakeClock clock;
  EmbedderOptions options;
  options.batching.max_batch_size = 2;
  options.batching.max_queue_size = 2;
  options.batching.start_batch_thread = false;
  auto embedder = Embedder::Create(options, &model, &clock);
  ASSERT_TRUE(embedder.ok());
  auto noop = [](absl::StatusOr<EmbeddingBatch>) {};
  EXPECT_EQ((*embedder)->Submit({}, absl::InfiniteFuture(), nullptr, noop).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(
      (*embedder)->Submit(std::vector<uint8_t>(100), absl::InfiniteFuture(), nullptr, noop).code(),
      absl::StatusCode::kInvalidArgument);
  std::vector<uint8_t> two = SeededCrop(1);
  two.insert(two.end(), two.begin(), two.end());
  EXPECT_TRUE((*embedder)->Submit(std::move(two), absl::InfiniteFuture(), nullptr, noop).ok());
  EXPECT_EQ((*embedder)->Submit(SeededCrop(2), absl::InfiniteFuture(), nullptr, noop).code(),
            absl::StatusCode::kResourceExhausted);
  (*embedder)->Shutdown();
  EXPECT_EQ((*embedder)->Submit(SeededCrop(3), absl::InfiniteFuture(), nullptr, noop).code(),
            absl::StatusCode::kUnavailable);
}

TEST(Embedder, HoldFileHoldsTheBatchUntilRemoved) {
  FakeModel model;
  EmbedderOptions options;
  options.batching.max_batch_size = 1;
  options.batching.max_queue_size = 4;
  options.batching.max_queue_delay = absl::ZeroDuration();
  options.hold_file = absl::StrCat(::testing::TempDir(), "/hold.", getpid());
  { std::ofstream(options.hold_file) << "hold"; }
  auto embedder = Embedder::Create(options, &model);
  ASSERT_TRUE(embedder.ok());
  absl::Notification done;
  ASSERT_TRUE((*embedder)
                  ->Submit(SeededCrop(1), absl::InfiniteFuture(), nullptr,
                           [&](absl::StatusOr<EmbeddingBatch> r) { done.Notify(); })
                  .ok());
  for (int i = 0; i < 5000 && !(*embedder)->held(); ++i) absl::SleepFor(absl::Milliseconds(1));
  EXPECT_TRUE((*embedder)->held());
  EXPECT_FALSE(done.WaitForNotificationWithTimeout(absl::Milliseconds(50)));
  EXPECT_TRUE(model.batch_sizes().empty());
  std::remove(options.hold_file.c_str());
  EXPECT_TRUE(done.WaitForNotificationWithTimeout(absl::Seconds(10)));
  EXPECT_FALSE((*embedder)->held());
}

// A refused Submit keeps nothing: its Done (and the request state it holds, here a sentinel)
// and its crops, which live in the same task, are destroyed before Submit returns, for every
// refusal; the Done is never called.
TEST(Embedder, ARefusedSubmitReleasesItsCropsAndDone) {
  FakeModel model;
  batching::FakeClock clock;
  EmbedderOptions options;
  options.batching.max_batch_size = 2;
  options.batching.max_queue_size = 2;
  options.batching.start_batch_thread = false;
  auto embedder = Embedder::Create(options, &model, &clock);
  ASSERT_TRUE(embedder.ok());
  std::vector<uint8_t> two = SeededCrop(1);
  two.insert(two.end(), two.begin(), two.end());
  ASSERT_TRUE((*embedder)
                  ->Submit(std::move(two), absl::InfiniteFuture(), nullptr,
                           [](absl::StatusOr<EmbeddingBatch>) {})
                  .ok());
  int calls = 0;
  auto refused = [&](std::vector<uint8_t> crops) {
    auto sentinel = std::make_shared<int>(0);
    std::weak_ptr<int> weak = sentinel;
    const absl::StatusCode code =
        (*embedder)
            ->Submit(std::move(crops), absl::InfiniteFuture(), nullptr,
                     [sentinel, &calls](absl::StatusOr<EmbeddingBatch>) { ++calls; })
            .code();
    sentinel.reset();
    EXPECT_TRUE(weak.expired()) << absl::StatusCodeToString(code);
    return code;
  };
  EXPECT_EQ(refused(SeededCrop(2)), absl::StatusCode::kResourceExhausted);  // queue full
  std::vector<uint8_t> three;
  for (int i = 0; i < 3; ++i) {
    std::vector<uint8_t> c = SeededCrop(10 + i);
    three.insert(three.end(), c.begin(), c.end());
  }
  EXPECT_EQ(refused(std::move(three)), absl::StatusCode::kResourceExhausted);  // too large
  EXPECT_EQ(refused(std::vector<uint8_t>(100)), absl::StatusCode::kInvalidArgument);
  (*embedder)->Shutdown();
  EXPECT_EQ(refused(SeededCrop(3)), absl::StatusCode::kUnavailable);
  EXPECT_EQ(calls, 0);
  EXPECT_EQ((*embedder)->batcher().counters().tasks_accepted, 1);
}

// With the batcher's threads and the model busy: requests that expire while queued give back
// their room at their deadline, so a live request is accepted again before the model returns.
TEST(Embedder, ExpiredRequestsFreeTheirQueueRoomWhileTheModelIsBusy) {
  FakeModel model;
  batching::FakeClock clock;
  EmbedderOptions options;
  options.batching.max_batch_size = 2;
  options.batching.max_queue_size = 4;
  options.batching.max_queue_delay = absl::Milliseconds(1);
  auto embedder = Embedder::Create(options, &model, &clock);
  ASSERT_TRUE(embedder.ok()) << embedder.status();
  auto crops = [](int seed, int n) {
    std::vector<uint8_t> buf;
    for (int i = 0; i < n; ++i) {
      std::vector<uint8_t> c = SeededCrop(seed + i);
      buf.insert(buf.end(), c.begin(), c.end());
    }
    return buf;
  };
  struct Result {
    absl::StatusOr<EmbeddingBatch> out = absl::UnknownError("not done");
    absl::Notification done;
  };
  auto into = [](Result& r) {
    return [&r](absl::StatusOr<EmbeddingBatch> out) {
      r.out = std::move(out);
      r.done.Notify();
    };
  };
  model.Hold();
  Result first, short_a, short_b, live;
  ASSERT_TRUE((*embedder)->Submit(crops(0, 2), absl::InfiniteFuture(), nullptr, into(first)).ok());
  ASSERT_TRUE(model.WaitForBatches(1));  // in the model, held
  const absl::Time deadline = clock.Now() + absl::Milliseconds(5);
  ASSERT_TRUE((*embedder)->Submit(crops(10, 2), deadline, nullptr, into(short_a)).ok());
  ASSERT_TRUE((*embedder)->Submit(crops(20, 2), deadline, nullptr, into(short_b)).ok());
  EXPECT_EQ((*embedder)
                ->Submit(crops(30, 1), absl::InfiniteFuture(), nullptr,
                         [](absl::StatusOr<EmbeddingBatch>) {})
                .code(),
            absl::StatusCode::kResourceExhausted);

  clock.Advance(absl::Milliseconds(5));
  for (Result* r : {&short_a, &short_b}) {
    ASSERT_TRUE(r->done.WaitForNotificationWithTimeout(absl::Seconds(60)));
    EXPECT_EQ(r->out.status().code(), absl::StatusCode::kDeadlineExceeded) << r->out.status();
  }
  EXPECT_EQ((*embedder)->batcher().queue_depth(), 0);
  EXPECT_FALSE(first.done.HasBeenNotified());  // the model still has the first batch
  ASSERT_TRUE((*embedder)->Submit(crops(30, 1), absl::InfiniteFuture(), nullptr, into(live)).ok());

  model.Release();
  ASSERT_TRUE(first.done.WaitForNotificationWithTimeout(absl::Seconds(60)));
  clock.Advance(absl::Milliseconds(1));  // the live request's delay
  ASSERT_TRUE(live.done.WaitForNotificationWithTimeout(absl::Seconds(60)));
  ASSERT_TRUE(live.out.ok()) << live.out.status();
  std::vector<float> want = FakeEmbedding(SeededCrop(30).data());
  EXPECT_EQ(live.out->values, want);
  EXPECT_THAT(model.batch_sizes(), ElementsAre(2, 1));  // the expired crops never ran
}

// ---------------------------------------------------------------------------------------------
// Face preprocessing

TEST(FacePreprocess, RawWholeImageIsCopiedAndErrorsNameTheReason) {
  std::vector<uint8_t> crops;
  std::vector<uint8_t> rgb = SeededCrop(5);
  ASSERT_TRUE(AppendFaceCrop(RawFace(rgb), image::Limits(), &crops).ok());
  EXPECT_EQ(crops, rgb);

  v1::Face four = RawFace(rgb);
  for (int i = 0; i < 4; ++i) four.add_landmarks()->set_x(10 * i);
  absl::Status s = AppendFaceCrop(four, image::Limits(), &crops);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("expected 5 landmarks, got 4"));
  EXPECT_EQ(crops.size(), kCropBytes);  // unchanged on error
  EXPECT_EQ(WithContext(s, "face 3").message(), "face 3: expected 5 landmarks, got 4");
  EXPECT_TRUE(WithContext(absl::OkStatus(), "face 3").ok());
}

// ---------------------------------------------------------------------------------------------
// The service through gRPC

class ServiceTest : public ::testing::Test {
 protected:
  void Start(ServiceOptions options = ServiceOptions(), int max_batch_size = 4,
             int max_queue_size = 64, absl::Duration delay = absl::Milliseconds(1),
             int max_batches_in_flight = 1) {
    metrics_ = std::make_unique<ServiceMetrics>(max_batch_size);
    pool_ = *WorkQueue::Create(pool_threads_, pool_max_pending_);
    service_ = std::make_unique<FaceEmbeddingService>(options, metrics_.get(), pool_.get());
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    builder.RegisterService(service_.get());
    // Large requests (slow images, big Compares) pass; the reply caps are the service's own.
    builder.SetMaxReceiveMessageSize(kTestMaxReceiveBytes);
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    ASSERT_GT(port_, 0);
    stub_ = NewStub();

    EmbedderOptions eo;
    eo.batching.max_batch_size = max_batch_size;
    eo.batching.max_queue_size = max_queue_size;
    eo.batching.max_queue_delay = delay;
    eo.batching.max_batches_in_flight = max_batches_in_flight;
    eo.batching.observer = metrics_.get();
    embedder_ = *Embedder::Create(eo, &model_);
    model_desc_.arch = "r50";
    model_desc_.model_id = "arcface-r50@0123456789ab";
    model_desc_.weights_sha256 = std::string(64, 'a');
    model_desc_.device = "cpu";
    model_desc_.precision = "fp32";
    model_desc_.demo_weights = true;
  }
  void Ready() { service_->SetReady(embedder_.get(), model_desc_); }

  void TearDown() override {
    if (server_) server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
    if (embedder_) embedder_->Shutdown();
    if (pool_) pool_->Shutdown();
  }

  // A client of its own (its own channel and connection).
  std::unique_ptr<v1::FaceEmbedding::Stub> NewStub() {
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(-1);
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    return v1::FaceEmbedding::NewStub(grpc::CreateCustomChannel(
        absl::StrCat("127.0.0.1:", port_), grpc::InsecureChannelCredentials(), args));
  }

  // A metric's value from the exposition (0 when absent).
  double Metric(const std::string& name, const std::map<std::string, std::string>& labels = {}) {
    std::map<std::string, std::string> types;
    for (const Sample& s : ParseExposition(metrics_->Render(), &types)) {
      if (s.name == name && s.labels == labels) return s.value;
    }
    return 0;
  }

  // Waits until the preprocessing pool has no admitted job left.
  bool WaitForIdlePool(absl::Duration timeout = absl::Seconds(60)) {
    const absl::Time end = absl::Now() + timeout;
    while (pool_->pending() > 0) {
      if (absl::Now() > end) return false;
      absl::SleepFor(absl::Milliseconds(2));
    }
    return true;
  }

  grpc::Status Embed(const v1::EmbedRequest& req, v1::EmbedResponse* resp) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    return stub_->Embed(&ctx, req, resp);
  }
  grpc::Status Compare(const v1::CompareRequest& req, v1::CompareResponse* resp) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    return stub_->Compare(&ctx, req, resp);
  }

  FakeModel model_;
  ModelDescription model_desc_;
  std::unique_ptr<ServiceMetrics> metrics_;
  std::unique_ptr<WorkQueue> pool_;
  std::unique_ptr<FaceEmbeddingService> service_;
  std::unique_ptr<Embedder> embedder_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<v1::FaceEmbedding::Stub> stub_;
  int port_ = 0;
  int pool_threads_ = 2;
  int pool_max_pending_ = 64;
  static constexpr int kTestMaxReceiveBytes = 256 << 20;
};

TEST_F(ServiceTest, UnavailableUntilReady) {
  Start();
  v1::EmbedRequest req;
  *req.add_faces() = RawFace(SeededCrop(1));
  v1::EmbedResponse resp;
  grpc::Status s = Embed(req, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(s.error_message(), HasSubstr("loading"));
  Ready();
  EXPECT_TRUE(Embed(req, &resp).ok());
}

TEST_F(ServiceTest, EmbedReturnsEachFacesEmbeddingInOrderAcrossSplitBatches) {
  Start(ServiceOptions(), /*max_batch_size=*/4);
  Ready();
  v1::EmbedRequest req;
  req.set_request_id("frame-7");
  std::vector<std::vector<uint8_t>> crops;
  for (int i = 0; i < 11; ++i) {
    crops.push_back(SeededCrop(i));
    *req.add_faces() = RawFace(crops.back());
  }
  v1::EmbedResponse resp;
  ASSERT_TRUE(Embed(req, &resp).ok());
  EXPECT_EQ(resp.request_id(), "frame-7");
  EXPECT_EQ(resp.model_id(), "arcface-r50@0123456789ab");
  ASSERT_EQ(resp.embeddings_size(), 11);
  for (int i = 0; i < 11; ++i) {
    std::vector<float> want = FakeEmbedding(crops[i].data());
    std::vector<float> got(resp.embeddings(i).values().begin(), resp.embeddings(i).values().end());
    EXPECT_EQ(got, want) << "face " << i;
    EXPECT_NEAR(resp.embeddings(i).norm(), Norm(want), 1e-3);
  }
  for (int n : model_.batch_sizes()) EXPECT_LE(n, 4);
}

TEST_F(ServiceTest, NormalizeGivesUnitVectorsAndKeepsTheRawNorm) {
  Start();
  Ready();
  v1::EmbedRequest req;
  req.set_normalize(true);
  std::vector<uint8_t> crop = SeededCrop(3);
  *req.add_faces() = RawFace(crop);
  v1::EmbedResponse resp;
  ASSERT_TRUE(Embed(req, &resp).ok());
  std::vector<float> want = FakeEmbedding(crop.data());
  const double norm = Norm(want);
  std::vector<float> got(resp.embeddings(0).values().begin(), resp.embeddings(0).values().end());
  EXPECT_NEAR(Norm(got), 1.0, 1e-6);
  for (int j = 0; j < kEmbeddingDim; ++j) EXPECT_NEAR(got[j], want[j] / norm, 1e-6);
  EXPECT_NEAR(resp.embeddings(0).norm(), norm, norm * 1e-6);
}

TEST_F(ServiceTest, EmptyRequestIsAnEmptyAnswer) {
  Start();
  Ready();
  v1::EmbedRequest req;
  req.set_request_id("none");
  v1::EmbedResponse resp;
  ASSERT_TRUE(Embed(req, &resp).ok());
  EXPECT_EQ(resp.embeddings_size(), 0);
  EXPECT_EQ(resp.request_id(), "none");
}

TEST_F(ServiceTest, InvalidRequestsNameTheFaceAndTheReason) {
  ServiceOptions options;
  options.max_faces_per_request = 8;
  options.image_limits.max_pixels = 150 * 150;
  Start(options);
  Ready();
  const std::vector<uint8_t> good = SeededCrop(1);
  struct Case {
    std::string name;
    std::function<void(v1::EmbedRequest*)> build;
    grpc::StatusCode code;
    std::string message;
  };
  std::vector<Case> cases = {
      {"undecodable",
       [&](v1::EmbedRequest* r) {
         *r->add_faces() = RawFace(good);
         r->add_faces()->mutable_image()->set_encoded("definitely not an image");
       },
       grpc::StatusCode::INVALID_ARGUMENT, "face 1: "},
      {"empty encoded",
       [&](v1::EmbedRequest* r) { r->add_faces()->mutable_image()->set_encoded(""); },
       grpc::StatusCode::INVALID_ARGUMENT, "face 0: "},
      {"no image", [&](v1::EmbedRequest* r) { r->add_faces(); }, grpc::StatusCode::INVALID_ARGUMENT,
       "face 0: no image"},
      {"four landmarks",
       [&](v1::EmbedRequest* r) {
         v1::Face* f = r->add_faces();
         *f = RawFace(good);
         for (int i = 0; i < 4; ++i) f->add_landmarks();
       },
       grpc::StatusCode::INVALID_ARGUMENT, "face 0: expected 5 landmarks, got 4"},
      {"nan landmark",
       [&](v1::EmbedRequest* r) {
         *r->add_faces() = RawFace(good);
         v1::Face* f = r->add_faces();
         *f = RawFace(good);
         for (int i = 0; i < 5; ++i) {
           f->add_landmarks()->set_x(i == 2 ? NAN : 10 * i + 20);
           f->mutable_landmarks(i)->set_y(40 + (i % 2) * 10);
         }
       },
       grpc::StatusCode::INVALID_ARGUMENT, "face 1: landmark 2 is not finite"},
      {"raw size mismatch",
       [&](v1::EmbedRequest* r) {
         v1::Face* f = r->add_faces();
         f->mutable_image()->mutable_raw()->set_width(10);
         f->mutable_image()->mutable_raw()->set_height(10);
         f->mutable_image()->mutable_raw()->set_data("abc");
       },
       grpc::StatusCode::INVALID_ARGUMENT, "face 0: raw image data is 3 bytes"},
      {"unknown pixel format",
       [&](v1::EmbedRequest* r) {
         *r->add_faces() = RawFace(good);
         r->mutable_faces(0)->mutable_image()->mutable_raw()->set_format(
             static_cast<v1::PixelFormat>(7));
       },
       grpc::StatusCode::INVALID_ARGUMENT, "face 0: raw image has unknown pixel format 7"},
      {"over the pixel cap",
       [&](v1::EmbedRequest* r) {
         v1::Face* f = r->add_faces();
         f->mutable_image()->mutable_raw()->set_width(200);
         f->mutable_image()->mutable_raw()->set_height(200);
         f->mutable_image()->mutable_raw()->set_data(std::string(200 * 200 * 3, '\0'));
       },
       grpc::StatusCode::INVALID_ARGUMENT, "face 0: "},
      {"box not finite",
       [&](v1::EmbedRequest* r) {
         *r->add_faces() = RawFace(good);
         r->mutable_faces(0)->mutable_box()->set_x_max(INFINITY);
       },
       grpc::StatusCode::INVALID_ARGUMENT, "face 0: box x_max is not finite"},
      {"box empty",
       [&](v1::EmbedRequest* r) {
         *r->add_faces() = RawFace(good);
         r->mutable_faces(0)->mutable_box();  // all zero
       },
       grpc::StatusCode::INVALID_ARGUMENT, "face 0: "},
      {"too many faces",
       [&](v1::EmbedRequest* r) {
         for (int i = 0; i < 9; ++i) *r->add_faces() = RawFace(good);
       },
       grpc::StatusCode::RESOURCE_EXHAUSTED, "too many faces: 9"},
  };
  for (const Case& c : cases) {
    v1::EmbedRequest req;
    c.build(&req);
    v1::EmbedResponse resp;
    grpc::Status s = Embed(req, &resp);
    EXPECT_EQ(s.error_code(), c.code) << c.name << ": " << s.error_message();
    EXPECT_THAT(s.error_message(), HasSubstr(c.message)) << c.name;
  }
  // Nothing bad reached the model, and a valid call still works.
  EXPECT_TRUE(model_.batch_sizes().empty());
  v1::EmbedRequest ok;
  *ok.add_faces() = RawFace(good);
  v1::EmbedResponse resp;
  EXPECT_TRUE(Embed(ok, &resp).ok());
}

TEST_F(ServiceTest, CompareMatchesHandComputedCosines) {
  Start();
  Ready();
  std::vector<std::vector<uint8_t>> faces = {SeededCrop(10), SeededCrop(11), SeededCrop(12)};
  std::vector<std::vector<float>> embs;
  for (const auto& f : faces) embs.push_back(FakeEmbedding(f.data()));
  std::vector<float> given(kEmbeddingDim);
  for (int j = 0; j < kEmbeddingDim; ++j) given[j] = std::sin(0.1 * j) * 3;

  // Queries: face 0, embedding `given`; references: face 1, face 2, embedding of face 0 (raw).
  v1::CompareRequest req;
  *req.add_queries()->mutable_face() = RawFace(faces[0]);
  req.add_queries()->mutable_embedding()->mutable_values()->Assign(given.begin(), given.end());
  *req.add_references()->mutable_face() = RawFace(faces[1]);
  *req.add_references()->mutable_face() = RawFace(faces[2]);
  req.add_references()->mutable_embedding()->mutable_values()->Assign(embs[0].begin(),
                                                                      embs[0].end());
  req.set_threshold(0.05f);
  v1::CompareResponse resp;
  grpc::Status s = Compare(req, &resp);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(resp.rows(), 2u);
  EXPECT_EQ(resp.cols(), 3u);
  EXPECT_EQ(resp.model_id(), "arcface-r50@0123456789ab");
  const std::vector<std::vector<float>> q = {embs[0], given};
  const std::vector<std::vector<float>> r = {embs[1], embs[2], embs[0]};
  ASSERT_EQ(resp.similarities_size(), 6);
  ASSERT_EQ(resp.matches_size(), 6);
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 3; ++j) {
      const double want = Cosine(q[i], r[j]);
      EXPECT_NEAR(resp.similarities(i * 3 + j), want, 1e-6) << i << "," << j;
      EXPECT_EQ(resp.matches(i * 3 + j), resp.similarities(i * 3 + j) >= 0.05f);
    }
  }
  EXPECT_NEAR(resp.similarities(2), 1.0, 1e-6);  // face 0 against its own embedding

  // Without a threshold there are no matches.
  req.clear_threshold();
  ASSERT_TRUE(Compare(req, &resp).ok());
  EXPECT_EQ(resp.matches_size(), 0);
}

TEST_F(ServiceTest, CompareRejectsBadProbesAndOversizedMatrices) {
  ServiceOptions options;
  options.max_compare_rows = 3;
  options.max_compare_cols = 2;
  Start(options);
  Ready();
  std::vector<float> good(kEmbeddingDim, 0.5f);
  auto embedding = [](v1::Probe* p, const std::vector<float>& v) {
    p->mutable_embedding()->mutable_values()->Assign(v.begin(), v.end());
  };
  struct Case {
    std::string name;
    std::function<void(v1::CompareRequest*)> build;
    grpc::StatusCode code;
    std::string message;
  };
  std::vector<Case> cases = {
      {"short embedding",
       [&](v1::CompareRequest* r) {
         embedding(r->add_queries(), good);
         embedding(r->add_queries(), good);
         embedding(r->add_queries(), std::vector<float>(128, 1.0f));
         embedding(r->add_references(), good);
       },
       grpc::StatusCode::INVALID_ARGUMENT, "query 2: embedding has 128 values, expected 512"},
      {"nan value",
       [&](v1::CompareRequest* r) {
         embedding(r->add_queries(), good);
         std::vector<float> bad = good;
         bad[7] = NAN;
         embedding(r->add_references(), bad);
       },
       grpc::StatusCode::INVALID_ARGUMENT, "reference 0: embedding value 7 is not finite"},
      {"zero embedding",
       [&](v1::CompareRequest* r) {
         embedding(r->add_queries(), std::vector<float>(kEmbeddingDim, 0.0f));
         embedding(r->add_references(), good);
       },
       grpc::StatusCode::INVALID_ARGUMENT, "query 0: embedding has zero norm"},
      {"empty probe",
       [&](v1::CompareRequest* r) {
         embedding(r->add_queries(), good);
         r->add_references();
       },
       grpc::StatusCode::INVALID_ARGUMENT, "reference 0: probe has neither"},
      {"bad face",
       [&](v1::CompareRequest* r) {
         embedding(r->add_queries(), good);
         r->add_references()->mutable_face()->mutable_image()->set_encoded("junk");
       },
       grpc::StatusCode::INVALID_ARGUMENT, "reference 0: "},
      {"nan threshold",
       [&](v1::CompareRequest* r) {
         embedding(r->add_queries(), good);
         embedding(r->add_references(), good);
         r->set_threshold(NAN);
       },
       grpc::StatusCode::INVALID_ARGUMENT, "threshold is not finite"},
      {"too many rows",
       [&](v1::CompareRequest* r) {
         for (int i = 0; i < 4; ++i) embedding(r->add_queries(), good);
         embedding(r->add_references(), good);
       },
       grpc::StatusCode::RESOURCE_EXHAUSTED, "4 queries x 1 references is over the limit of 3 x 2"},
      {"too many cols",
       [&](v1::CompareRequest* r) {
         embedding(r->add_queries(), good);
         for (int i = 0; i < 3; ++i) embedding(r->add_references(), good);
       },
       grpc::StatusCode::RESOURCE_EXHAUSTED, "over the limit of 3 x 2"},
  };
  for (const Case& c : cases) {
    v1::CompareRequest req;
    c.build(&req);
    v1::CompareResponse resp;
    grpc::Status s = Compare(req, &resp);
    EXPECT_EQ(s.error_code(), c.code) << c.name << ": " << s.error_message();
    EXPECT_THAT(s.error_message(), HasSubstr(c.message)) << c.name;
  }
}

TEST_F(ServiceTest, GetModelInfoReportsTheModelAndLimits) {
  ServiceOptions options;
  options.server_version = "9.9.9";
  options.max_faces_per_request = 17;
  Start(options, /*max_batch_size=*/4, /*max_queue_size=*/64, absl::Microseconds(1500));
  Ready();
  grpc::ClientContext ctx;
  v1::ModelInfo info;
  ASSERT_TRUE(stub_->GetModelInfo(&ctx, v1::GetModelInfoRequest(), &info).ok());
  EXPECT_EQ(info.arch(), "r50");
  EXPECT_EQ(info.embedding_dim(), 512u);
  EXPECT_EQ(info.input_size(), 112u);
  EXPECT_EQ(info.weights_sha256(), std::string(64, 'a'));
  EXPECT_EQ(info.model_id(), "arcface-r50@0123456789ab");
  EXPECT_EQ(info.device(), "cpu");
  EXPECT_EQ(info.precision(), "fp32");
  EXPECT_TRUE(info.demo_weights());
  EXPECT_EQ(info.server_version(), "9.9.9");
  EXPECT_EQ(info.batching().max_batch_size(), 4u);
  EXPECT_EQ(info.batching().max_queue_delay_us(), 1500u);
  EXPECT_EQ(info.batching().max_queue_size(), 64u);
  EXPECT_EQ(info.max_faces_per_request(), 17u);
  // No device memory source: zeros.
  EXPECT_EQ(info.device_memory_allocated_bytes(), 0u);
  EXPECT_EQ(info.device_memory_reserved_bytes(), 0u);
}

TEST_F(ServiceTest, GetModelInfoReportsTheBatchesInFlight) {
  Start(ServiceOptions(), /*max_batch_size=*/4, /*max_queue_size=*/64, absl::Microseconds(1500),
        /*max_batches_in_flight=*/3);
  Ready();
  grpc::ClientContext ctx;
  v1::ModelInfo info;
  ASSERT_TRUE(stub_->GetModelInfo(&ctx, v1::GetModelInfoRequest(), &info).ok());
  EXPECT_EQ(info.batching().max_batches_in_flight(), 3u);
}

TEST_F(ServiceTest, GetModelInfoReadsTheDeviceMemoryAtEachCall) {
  std::atomic<int64_t> allocated{5 << 20};
  model_desc_.device_memory = [&allocated] {
    engine::DeviceMemory memory;
    memory.allocated_bytes = allocated.load();
    memory.reserved_bytes = int64_t{3} << 30;  // above 2^32: the field is 64-bit
    return memory;
  };
  Start();
  Ready();
  for (int64_t expected : {int64_t{5} << 20, int64_t{7} << 20}) {
    allocated = expected;
    grpc::ClientContext ctx;
    v1::ModelInfo info;
    ASSERT_TRUE(stub_->GetModelInfo(&ctx, v1::GetModelInfoRequest(), &info).ok());
    EXPECT_EQ(info.device_memory_allocated_bytes(), static_cast<uint64_t>(expected));
    EXPECT_EQ(info.device_memory_reserved_bytes(), uint64_t{3} << 30);
  }
}

TEST_F(ServiceTest, StreamAnswersInOrderAndCarriesErrors) {
  ServiceOptions options;
  options.stream_max_in_flight = 3;  // fewer than the messages: backpressure kicks in
  Start(options, /*max_batch_size=*/2);
  Ready();
  grpc::ClientContext ctx;
  auto stream = stub_->EmbedStream(&ctx);
  const int n = 12;
  std::vector<std::vector<uint8_t>> crops;
  for (int i = 0; i < n; ++i) crops.push_back(SeededCrop(200 + i));
  std::thread writer([&] {
    for (int i = 0; i < n; ++i) {
      v1::EmbedRequest req;
      req.set_request_id(absl::StrCat("m", i));
      if (i == 4) {
        req.add_faces()->mutable_image()->set_encoded("junk");
      } else {
        *req.add_faces() = RawFace(crops[i]);
        if (i % 3 == 0) *req.add_faces() = RawFace(crops[(i + 1) % n]);
      }
      ASSERT_TRUE(stream->Write(req));
    }
    stream->WritesDone();
  });
  std::vector<v1::EmbedResponse> responses;
  v1::EmbedResponse resp;
  while (stream->Read(&resp)) responses.push_back(resp);
  writer.join();
  grpc::Status s = stream->Finish();
  ASSERT_TRUE(s.ok()) << s.error_message();
  ASSERT_EQ(responses.size(), size_t(n));
  for (int i = 0; i < n; ++i) {
    const v1::EmbedResponse& r = responses[i];
    EXPECT_EQ(r.request_id(), absl::StrCat("m", i));
    EXPECT_EQ(r.model_id(), "arcface-r50@0123456789ab");
    if (i == 4) {
      EXPECT_EQ(r.error().code(), int(grpc::StatusCode::INVALID_ARGUMENT));
      EXPECT_THAT(r.error().message(), HasSubstr("face 0: "));
      EXPECT_EQ(r.embeddings_size(), 0);
      continue;
    }
    EXPECT_EQ(r.error().code(), 0);
    ASSERT_EQ(r.embeddings_size(), i % 3 == 0 ? 2 : 1);
    std::vector<float> want = FakeEmbedding(crops[i].data());
    EXPECT_TRUE(std::equal(want.begin(), want.end(), r.embeddings(0).values().begin()));
  }
}

// A raw EmbedStream: the bytes written go out as they are (EmbedStream is served raw).
using RawStream = grpc::ClientReaderWriter<grpc::ByteBuffer, grpc::ByteBuffer>;
std::unique_ptr<RawStream> OpenRawStream(grpc::Channel* channel, grpc::ClientContext* ctx) {
  return std::unique_ptr<RawStream>(
      grpc::internal::ClientReaderWriterFactory<grpc::ByteBuffer, grpc::ByteBuffer>::Create(
          channel,
          grpc::internal::RpcMethod("/arcface.v1.FaceEmbedding/EmbedStream",
                                    grpc::internal::RpcMethod::BIDI_STREAMING),
          ctx));
}

grpc::ByteBuffer Bytes(const std::string& data) {
  grpc::Slice slice(data);
  return grpc::ByteBuffer(&slice, 1);
}

TEST_F(ServiceTest, StreamAnswersMessagesThatDoNotParseAndGoesOn) {
  Start();
  Ready();
  auto channel =
      grpc::CreateChannel(absl::StrCat("127.0.0.1:", port_), grpc::InsecureChannelCredentials());
  grpc::ClientContext ctx;
  std::unique_ptr<RawStream> stream = OpenRawStream(channel.get(), &ctx);
  auto valid = [](int i) {
    v1::EmbedRequest req;
    req.set_request_id(absl::StrCat("m", i));
    *req.add_faces() = RawFace(SeededCrop(300 + i));
    return req.SerializeAsString();
  };
  const std::string truncated = valid(3).substr(0, 100);  // inside the face's pixels
  // Field 3 (request_id), length 2, bytes that are not UTF-8: proto3 refuses to parse it.
  const std::string bad_utf8 = std::string("\x1a\x02\xff\xfe", 4);
  const std::vector<std::string> messages = {
      valid(0), "\xff\xff\xff\xff garbage", valid(2), truncated, bad_utf8, valid(5)};
  for (const std::string& m : messages) ASSERT_TRUE(stream->Write(Bytes(m)));
  stream->WritesDone();
  std::vector<v1::EmbedResponse> responses;
  grpc::ByteBuffer bb;
  while (stream->Read(&bb)) {
    v1::EmbedResponse resp;
    ASSERT_TRUE(grpc::SerializationTraits<v1::EmbedResponse>::Deserialize(&bb, &resp).ok());
    responses.push_back(resp);
  }
  grpc::Status s = stream->Finish();
  ASSERT_TRUE(s.ok()) << s.error_message();
  ASSERT_EQ(responses.size(), messages.size());
  for (int i : {1, 3, 4}) {
    SCOPED_TRACE(i);
    const v1::EmbedResponse& r = responses[i];
    EXPECT_EQ(r.error().code(), int(grpc::StatusCode::INVALID_ARGUMENT));
    EXPECT_THAT(r.error().message(),
                HasSubstr(absl::StrCat("message ", i, " is not a valid EmbedRequest: its ",
                                       messages[i].size(), " bytes do not parse")));
    EXPECT_EQ(r.request_id(), "");
    EXPECT_EQ(r.model_id(), "arcface-r50@0123456789ab");
    EXPECT_EQ(r.embeddings_size(), 0);
  }
  for (int i : {0, 2, 5}) {
    SCOPED_TRACE(i);
    const v1::EmbedResponse& r = responses[i];
    EXPECT_FALSE(r.has_error());
    EXPECT_EQ(r.request_id(), absl::StrCat("m", i));
    ASSERT_EQ(r.embeddings_size(), 1);
    std::vector<float> want = FakeEmbedding(SeededCrop(300 + i).data());
    EXPECT_TRUE(std::equal(want.begin(), want.end(), r.embeddings(0).values().begin()));
  }
  const std::string text = metrics_->Render();
  EXPECT_THAT(text, HasSubstr("arcface_requests_total{rpc=\"EmbedStream\",code=\"OK\"} 3\n"));
  EXPECT_THAT(text, HasSubstr("arcface_requests_total{rpc=\"EmbedStream\",code="
                              "\"INVALID_ARGUMENT\"} 3\n"));
}

TEST_F(ServiceTest, RequestIdOverTheLimitIsInvalidNamingTheLimit) {
  Start();
  Ready();
  v1::EmbedRequest req;
  *req.add_faces() = RawFace(SeededCrop(1));
  req.set_request_id(std::string(kMaxRequestIdBytes, 'a'));
  v1::EmbedResponse resp;
  ASSERT_TRUE(Embed(req, &resp).ok());
  EXPECT_EQ(resp.request_id(), req.request_id());
  req.set_request_id(std::string(kMaxRequestIdBytes + 1, 'a'));
  grpc::Status s = Embed(req, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(s.error_message(), "request_id is 1025 bytes, over the limit of 1024 bytes");

  // In a stream: an error answer without the id, and the stream goes on.
  grpc::ClientContext ctx;
  auto stream = stub_->EmbedStream(&ctx);
  ASSERT_TRUE(stream->Write(req));
  req.set_request_id("next");
  ASSERT_TRUE(stream->Write(req));
  stream->WritesDone();
  v1::EmbedResponse first, second;
  ASSERT_TRUE(stream->Read(&first));
  ASSERT_TRUE(stream->Read(&second));
  EXPECT_FALSE(stream->Read(&resp));
  ASSERT_TRUE(stream->Finish().ok());
  EXPECT_EQ(first.request_id(), "");
  EXPECT_EQ(first.error().code(), int(grpc::StatusCode::INVALID_ARGUMENT));
  EXPECT_EQ(first.error().message(), "request_id is 1025 bytes, over the limit of 1024 bytes");
  EXPECT_EQ(second.request_id(), "next");
  EXPECT_EQ(second.embeddings_size(), 1);
}

TEST_F(ServiceTest, StreamCancelledWhileItsMessageIsInPreprocessing) {
  Start();
  Ready();
  // Both pool threads busy: the stream's message waits in the queue until the cancellation.
  // Shared with the jobs: a job may still be returning from its wait when the test ends.
  auto unblock = std::make_shared<absl::Notification>();
  auto blocked = std::make_shared<std::atomic<int>>(0);
  for (int i = 0; i < 2; ++i) {
    ASSERT_TRUE(pool_
                    ->Submit(
                        [unblock, blocked] {
                          ++*blocked;
                          unblock->WaitForNotification();
                          return false;
                        },
                        1)
                    .ok());
  }
  struct Unblock {  // also when an assertion ends the test early, or TearDown would hang
    std::shared_ptr<absl::Notification> n;
    ~Unblock() {
      if (!n->HasBeenNotified()) n->Notify();
    }
  } unblock_at_exit{unblock};
  while (blocked->load() < 2) absl::SleepFor(absl::Milliseconds(1));
  grpc::ClientContext ctx;
  auto stream = stub_->EmbedStream(&ctx);
  v1::EmbedRequest req;
  *req.add_faces() = RawFace(SeededCrop(1));
  ASSERT_TRUE(stream->Write(req));
  // pending() counts the two running holders too.
  while (pool_->pending() < 3) absl::SleepFor(absl::Milliseconds(1));
  ctx.TryCancel();
  EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::CANCELLED);
  // The server side learns of the cancellation; the message is still queued.
  EXPECT_EQ(service_->inflight(), 1);
  unblock->Notify();
  ASSERT_TRUE(service_->WaitForIdle(absl::Now() + absl::Seconds(10)));
  EXPECT_TRUE(model_.batch_sizes().empty());
  EXPECT_THAT(metrics_->Render(),
              HasSubstr("arcface_requests_total{rpc=\"EmbedStream\",code=\"CANCELLED\"} 1\n"));
  EXPECT_EQ(metrics_->stream_held_bytes().Value(), 0);
}

// A video client whose camera drops: a message answered, another sent, and the stream cancelled
// at once. The second message's read used to complete after the stream had decided to finish,
// and its preprocessing job then polled the freed call context (SIGSEGV).
TEST_F(ServiceTest, StreamsCancelledRightAfterAMessageLeaveNothingBehind) {
  Start();
  Ready();
  constexpr int kThreads = 4, kStreamsPerThread = 100;
  std::vector<std::thread> clients;
  for (int t = 0; t < kThreads; ++t) {
    clients.emplace_back([this, t] {
      for (int k = 0; k < kStreamsPerThread; ++k) {
        grpc::ClientContext ctx;
        auto stream = stub_->EmbedStream(&ctx);
        v1::EmbedRequest quick;  // answered from the pool, without the model
        quick.add_faces()->mutable_image()->set_encoded("not an image");
        v1::EmbedRequest face;
        *face.add_faces() = RawFace(SeededCrop(t * 1000 + k));
        v1::EmbedResponse resp;
        if (stream->Write(quick) && stream->Read(&resp)) stream->Write(face);
        ctx.TryCancel();
        stream->Finish();
      }
    });
  }
  for (std::thread& c : clients) c.join();
  ASSERT_TRUE(service_->WaitForIdle(absl::Now() + absl::Seconds(30)));
  EXPECT_EQ(metrics_->stream_held_bytes().Value(), 0);
  v1::EmbedRequest req;
  *req.add_faces() = RawFace(SeededCrop(5));
  v1::EmbedResponse resp;
  ASSERT_TRUE(Embed(req, &resp).ok());
  std::vector<float> want = FakeEmbedding(SeededCrop(5).data());
  EXPECT_TRUE(std::equal(want.begin(), want.end(), resp.embeddings(0).values().begin()));
}

// The model is held, so every message read stays in work and holds its request: what the
// streams hold is then exactly the messages they read.
TEST_F(ServiceTest, StreamsStopReadingAtTheirByteBudgets) {
  v1::EmbedRequest req;
  req.set_request_id("budget");
  *req.add_faces() = RawFace(SeededCrop(1));
  const double size = static_cast<double>(req.ByteSizeLong());
  ServiceOptions options;
  options.stream_max_held_bytes = static_cast<int64_t>(2.5 * size);  // reads 3
  options.streams_max_held_bytes = static_cast<int64_t>(3.5 * size);
  Start(options, /*max_batch_size=*/1);
  Ready();
  auto held = [this] { return metrics_->stream_held_bytes().Value(); };
  auto wait_held = [&](double want) {
    for (int i = 0; i < 10000 && held() != want; ++i) absl::SleepFor(absl::Milliseconds(1));
    ASSERT_EQ(held(), want);
    // Nothing more is read: the model is held, nothing else can change the state.
    absl::SleepFor(absl::Milliseconds(200));
    ASSERT_EQ(held(), want);
  };
  model_.Hold();
  constexpr int kMessages = 8;
  struct Client {
    grpc::ClientContext ctx;
    std::unique_ptr<grpc::ClientReaderWriter<v1::EmbedRequest, v1::EmbedResponse>> stream;
    std::thread writer;
  };
  Client a, b;
  for (Client* c : {&a, &b}) {
    c->stream = stub_->EmbedStream(&c->ctx);
    c->writer = std::thread([c, &req] {
      for (int i = 0; i < kMessages; ++i) c->stream->Write(req);
      c->stream->WritesDone();
    });
    // a: its own budget stops it after 3 (held >= 2.5 messages). b: all streams hold more
    // than 3.5 messages once it read one, which it may, holding nothing.
    ASSERT_NO_FATAL_FAILURE(wait_held((c == &a ? 3 : 4) * size));
  }
  model_.Release();
  for (Client* c : {&a, &b}) {
    v1::EmbedResponse resp;
    int answers = 0;
    while (c->stream->Read(&resp)) {
      EXPECT_EQ(resp.request_id(), "budget");
      EXPECT_EQ(resp.embeddings_size(), 1);
      ++answers;
    }
    c->writer.join();
    EXPECT_TRUE(c->stream->Finish().ok());
    EXPECT_EQ(answers, kMessages);
  }
  ASSERT_TRUE(service_->WaitForIdle(absl::Now() + absl::Seconds(10)));
  EXPECT_EQ(held(), 0);
}

TEST_F(ServiceTest, DrainRefusesNewCallsAndEndsOpenStreams) {
  Start();
  Ready();
  grpc::ClientContext stream_ctx;
  auto stream = stub_->EmbedStream(&stream_ctx);
  v1::EmbedRequest req;
  req.set_request_id("before");
  *req.add_faces() = RawFace(SeededCrop(1));
  ASSERT_TRUE(stream->Write(req));
  v1::EmbedResponse resp;
  ASSERT_TRUE(stream->Read(&resp));
  EXPECT_EQ(resp.request_id(), "before");

  service_->BeginDrain();
  EXPECT_FALSE(stream->Read(&resp));
  grpc::Status s = stream->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(s.error_message(), HasSubstr("draining"));

  v1::EmbedRequest unary;
  *unary.add_faces() = RawFace(SeededCrop(2));
  s = Embed(unary, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_TRUE(service_->WaitForIdle(absl::Now() + absl::Seconds(10)));
  EXPECT_EQ(service_->inflight(), 0);
}

// ---------------------------------------------------------------------------------------------
// Costly work stops with its call, and calls take turns on the preprocessing pool

// A real JPEG that is slow to decode for its size: 6000×6000 (36 MP, under the default 40 MP
// cap) of one colour at quality 90, ~0.55 MB (~64 pixels a byte, as dense as a legitimate
// heavily compressed photo): ~0.5 s of CPU to decode here.
const std::string& SlowJpeg() {
  static const std::string* jpeg = [] {
    cv::Mat flat(6000, 6000, CV_8UC3, cv::Scalar(120, 130, 140));
    std::vector<uchar> buf;
    EXPECT_TRUE(cv::imencode(".jpg", flat, buf, {cv::IMWRITE_JPEG_QUALITY, 90}));
    return new std::string(buf.begin(), buf.end());
  }();
  return *jpeg;
}

// What one SlowJpeg() costs the server to preprocess, measured now (the machine may be busy).
absl::Duration SlowFaceCost() {
  v1::Face face;
  face.mutable_image()->set_encoded(SlowJpeg());
  std::vector<uint8_t> crop;
  const absl::Time start = absl::Now();
  EXPECT_TRUE(AppendFaceCrop(face, image::Limits(), &crop).ok());
  return absl::Now() - start;
}

v1::EmbedRequest SlowRequest(int n) {
  v1::EmbedRequest req;
  for (int i = 0; i < n; ++i) req.add_faces()->mutable_image()->set_encoded(SlowJpeg());
  return req;
}

// The scenario at small scale: two clients each send kHeavy slow faces with a short
// deadline while a third sends one small face. The heavy calls' preprocessing stops at their
// deadline (before this fix both were decoded to the end, 2 × kHeavy faces), and the small call
// waits about one face per pool thread (before: the whole of the heavy calls).
TEST_F(ServiceTest, ExpiredCallsStopDecodingAndASmallCallIsNotStuckBehindThem) {
  Start();
  Ready();
  const absl::Duration cost = SlowFaceCost();
  constexpr int kHeavy = 12;
  const v1::EmbedRequest heavy = SlowRequest(kHeavy);
  std::vector<grpc::Status> heavy_status(2);
  std::vector<std::thread> clients;
  const absl::Time heavy_start = absl::Now();
  for (int c = 0; c < 2; ++c) {
    clients.emplace_back([&, c] {
      auto stub = NewStub();
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(500));
      v1::EmbedResponse resp;
      heavy_status[c] = stub->Embed(&ctx, heavy, &resp);
    });
  }
  // The small call arrives once both heavy calls are on the pool.
  const absl::Time wait_end = absl::Now() + absl::Seconds(30);
  while (pool_->pending() < 2 && absl::Now() < wait_end) absl::SleepFor(absl::Milliseconds(1));
  ASSERT_EQ(pool_->pending(), 2);
  v1::EmbedRequest small;
  *small.add_faces() = RawFace(SeededCrop(5));
  const absl::Time small_start = absl::Now();
  v1::EmbedResponse resp;
  grpc::Status s = Embed(small, &resp);
  const absl::Duration small_wait = absl::Now() - small_start;
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(resp.embeddings(0).values(0), FakeEmbedding(SeededCrop(5).data())[0]);
  for (std::thread& t : clients) t.join();
  for (const grpc::Status& h : heavy_status) {
    EXPECT_EQ(h.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << h.error_message();
  }
  // The server is done with the heavy calls soon after their deadline.
  ASSERT_TRUE(service_->WaitForIdle(absl::Now() + absl::Seconds(120)));
  const absl::Duration server_done = absl::Now() - heavy_start;
  ASSERT_TRUE(WaitForIdlePool());
  const double decoded = Metric("arcface_preprocess_faces_total") - 1;  // less the small face
  std::cout << "slow face: " << cost << "; small call waited " << small_wait << "; the server "
            << "ended the heavy calls " << server_done << " after they began, with " << decoded
            << " of their " << 2 * kHeavy << " faces decoded\n";
  // About one face per pool thread before the small call's turn; the margins absorb a loaded
  // machine or a sanitizer stretching some faces, and stay far below the heavy calls' whole
  // decode (kHeavy faces per pool thread) that the small call waited for before the fix.
  EXPECT_LT(small_wait, 5 * cost + absl::Seconds(1));
  EXPECT_LT(server_done, 6 * cost + absl::Seconds(1));
  // The deadline (0.5 s) passes during the heavy calls' first or second face.
  EXPECT_LE(decoded, 2 * (1 + absl::Milliseconds(500) / cost) + 2);
  EXPECT_EQ(Metric("arcface_preprocess_aborted_total", {{"reason", "deadline"}}), 2);
  EXPECT_EQ(Metric("arcface_requests_total", {{"rpc", "Embed"}, {"code", "DEADLINE_EXCEEDED"}}), 2);
  EXPECT_THAT(model_.batch_sizes(), ElementsAre(1));  // the heavy calls never reached the model
}

// Without deadlines, the heavy calls keep going, but a small call still gets its turn within
// about one slow face; cancelling the heavy calls stops their decoding.
TEST_F(ServiceTest, PoolTakesTurnsBetweenCallsAndCancellationStopsDecoding) {
  Start();
  Ready();
  const absl::Duration cost = SlowFaceCost();
  constexpr int kHeavy = 12;
  const v1::EmbedRequest heavy = SlowRequest(kHeavy);
  std::vector<grpc::Status> heavy_status(2);
  std::vector<grpc::ClientContext> contexts(2);
  std::vector<std::thread> clients;
  for (int c = 0; c < 2; ++c) {
    clients.emplace_back([&, c] {
      auto stub = NewStub();
      contexts[c].set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
      v1::EmbedResponse resp;
      heavy_status[c] = stub->Embed(&contexts[c], heavy, &resp);
    });
  }
  const absl::Time wait_end = absl::Now() + absl::Seconds(30);
  while (Metric("arcface_preprocess_faces_total") < 2 && absl::Now() < wait_end) {
    absl::SleepFor(absl::Milliseconds(1));
  }
  ASSERT_EQ(pool_->pending(), 2);  // both heavy calls are decoding
  v1::EmbedRequest small;
  *small.add_faces() = RawFace(SeededCrop(6));
  const absl::Time small_start = absl::Now();
  v1::EmbedResponse resp;
  grpc::Status s = Embed(small, &resp);
  const absl::Duration small_wait = absl::Now() - small_start;
  ASSERT_TRUE(s.ok()) << s.error_message();
  const double decoded_then = Metric("arcface_preprocess_faces_total") - 1;
  for (grpc::ClientContext& ctx : contexts) ctx.TryCancel();
  for (std::thread& t : clients) t.join();
  for (const grpc::Status& h : heavy_status) {
    EXPECT_EQ(h.error_code(), grpc::StatusCode::CANCELLED) << h.error_message();
  }
  ASSERT_TRUE(WaitForIdlePool());
  const double decoded = Metric("arcface_preprocess_faces_total") - 1;
  std::cout << "slow face: " << cost << "; small call waited " << small_wait << " with "
            << decoded_then << " heavy faces decoded; " << decoded << " of " << 2 * kHeavy
            << " when the pool was idle\n";
  // As above: far below the kHeavy faces per pool thread that it waited for before the fix.
  EXPECT_LT(small_wait, 5 * cost + absl::Seconds(1));
  EXPECT_LE(decoded_then, 6);
  // After the cancellation, at most the face each pool thread was decoding.
  EXPECT_LE(decoded, decoded_then + 2 + 2);
  EXPECT_EQ(Metric("arcface_preprocess_aborted_total", {{"reason", "cancelled"}}), 2);
  EXPECT_EQ(Metric("arcface_requests_total", {{"rpc", "Embed"}, {"code", "CANCELLED"}}), 2);
  EXPECT_THAT(model_.batch_sizes(), ElementsAre(1));
}

// A full pool (in faces) refuses at once, naming itself, with nothing kept from the refused
// calls, while an admitted call's later steps (its second slow face) go on although the pool is
// full.
TEST_F(ServiceTest, FullPoolRefusesAtOnceWithFlatMemoryAndAdmittedCallsFinish) {
  pool_threads_ = 2;
  pool_max_pending_ = 4;  // faces
  Start();
  Ready();
  // Holds one pool thread and one face's room.
  absl::Notification held, release;
  ASSERT_TRUE(pool_
                  ->Submit(
                      [&] {
                        held.Notify();
                        release.WaitForNotification();
                        return false;
                      },
                      /*cost=*/1)
                  .ok());
  held.WaitForNotification();
  v1::EmbedRequest admitted = SlowRequest(2);
  *admitted.add_faces() = RawFace(SeededCrop(7));
  grpc::Status admitted_status;
  v1::EmbedResponse admitted_resp;
  std::thread admitted_client([&] {
    auto stub = NewStub();
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
    admitted_status = stub->Embed(&ctx, admitted, &admitted_resp);
  });
  const absl::Time wait_end = absl::Now() + absl::Seconds(30);
  while (pool_->pending() < 2 && absl::Now() < wait_end) absl::SleepFor(absl::Milliseconds(1));
  ASSERT_EQ(pool_->pending(), 2);  // full: the holder and the admitted call, 1 + 3 faces
  ASSERT_EQ(pool_->pending_cost(), 4);

  // Each refused call carries 16 raw faces (600 KB): a leak of its request or crops would show.
  v1::EmbedRequest refused;
  for (int i = 0; i < 16; ++i) *refused.add_faces() = RawFace(SeededCrop(100 + i));
  auto rss_bytes = [] {
    std::ifstream statm("/proc/self/statm");
    long size = 0, resident = 0;
    statm >> size >> resident;
    return int64_t{resident} * sysconf(_SC_PAGESIZE);
  };
  // Bytes the process has allocated and not freed (RSS also counts what malloc keeps cached).
  // Under ASan mallinfo2 reads 0: there LeakSanitizer is the check that nothing is kept.
  auto heap_bytes = [] { return static_cast<int64_t>(mallinfo2().uordblks); };
  auto refuse = [&](int calls) {
    absl::Duration slowest;
    for (int i = 0; i < calls; ++i) {
      v1::EmbedResponse resp;
      const absl::Time start = absl::Now();
      grpc::Status s = Embed(refused, &resp);
      slowest = std::max(slowest, absl::Now() - start);
      EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
      // 4 of 4 while the admitted call decodes, 1 of 4 (the holder) once it is through (it may
      // be, on a slow build): a 16-face call is refused either way, the pool not being empty.
      EXPECT_THAT(s.error_message(),
                  AllOf(HasSubstr("preprocessing pool full ("),
                        HasSubstr(" of 4 face crops admitted, this call needs 16; "
                                  "--preprocess-queue)")));
    }
    return slowest;
  };
  refuse(50);  // warm-up: gRPC's buffers and arenas reach their working size
  const int64_t rss_before = rss_bytes(), heap_before = heap_bytes();
  const absl::Duration slowest = refuse(500);
  const int64_t rss_after = rss_bytes(), heap_after = heap_bytes();
  std::cout << "500 refused calls: heap in use " << heap_before / 1024 << " KiB -> "
            << heap_after / 1024 << " KiB, RSS " << rss_before / 1024 << " KiB -> "
            << rss_after / 1024 << " KiB; slowest refusal " << slowest << "\n";
  EXPECT_LT(heap_after - heap_before, 4 << 20);  // one leaked request each would be 300 MB
  EXPECT_LT(slowest, absl::Seconds(1));
  EXPECT_EQ(Metric("arcface_rejected_total", {{"reason", "preprocess_queue_full"}}), 550);

  release.Notify();
  admitted_client.join();
  ASSERT_TRUE(admitted_status.ok()) << admitted_status.error_message();
  ASSERT_EQ(admitted_resp.embeddings_size(), 3);
  EXPECT_EQ(admitted_resp.embeddings(2).values(0), FakeEmbedding(SeededCrop(7).data())[0]);
  EXPECT_EQ(Metric("arcface_preprocess_faces_total"), 3);
}

// Holds the (one-thread) pool while a call is in the middle of its preprocessing: `held` once
// the call's first slow face is done and its second waits behind a job that waits for `release`.
class PreprocessingHold {
 public:
  explicit PreprocessingHold(WorkQueue* pool) : pool_(pool) {
    EXPECT_TRUE(pool_
                    ->Submit(
                        [this] {
                          first_.WaitForNotification();
                          return false;
                        },
                        /*cost=*/1)
                    .ok());
  }
  // Call once the request's job is queued behind the first holder.
  void HoldAfterOneStep() {
    EXPECT_TRUE(pool_
                    ->Submit(
                        [this] {
                          held_.Notify();
                          release_.WaitForNotification();
                          return false;
                        },
                        /*cost=*/1)
                    .ok());
    first_.Notify();  // the call's first step runs, then this second holder
    held_.WaitForNotification();
  }
  void Release() { release_.Notify(); }

 private:
  WorkQueue* const pool_;
  absl::Notification first_, held_, release_;
};

TEST_F(ServiceTest, DeadlinePassingDuringPreprocessingEndsItBeforeTheModel) {
  pool_threads_ = 1;
  Start();
  Ready();
  PreprocessingHold hold(pool_.get());
  grpc::Status status;
  std::thread client([&] {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(3));
    v1::EmbedResponse resp;
    status = stub_->Embed(&ctx, SlowRequest(2), &resp);
  });
  const absl::Time wait_end = absl::Now() + absl::Seconds(30);
  while (pool_->pending() < 2 && absl::Now() < wait_end) absl::SleepFor(absl::Milliseconds(1));
  ASSERT_EQ(pool_->pending(), 2);
  hold.HoldAfterOneStep();
  EXPECT_EQ(Metric("arcface_preprocess_faces_total"), 1);  // in the middle of the call
  client.join();                                           // the deadline passes meanwhile
  EXPECT_EQ(status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  // The server's deadline is the client's plus the request's transit: let it pass too.
  absl::SleepFor(absl::Milliseconds(300));
  hold.Release();
  ASSERT_TRUE(WaitForIdlePool());
  EXPECT_TRUE(service_->WaitForIdle(absl::Now() + absl::Seconds(10)));
  EXPECT_EQ(Metric("arcface_requests_total", {{"rpc", "Embed"}, {"code", "DEADLINE_EXCEEDED"}}), 1);
  EXPECT_EQ(Metric("arcface_preprocess_aborted_total", {{"reason", "deadline"}}), 1);
  EXPECT_EQ(Metric("arcface_preprocess_faces_total"), 1);  // the second face never decoded
  EXPECT_TRUE(model_.batch_sizes().empty());
}

TEST_F(ServiceTest, CancellationDuringPreprocessingEndsItBeforeTheModel) {
  pool_threads_ = 1;
  Start();
  Ready();
  PreprocessingHold hold(pool_.get());
  grpc::Status status;
  grpc::ClientContext ctx;
  std::thread client([&] {
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
    v1::EmbedResponse resp;
    status = stub_->Embed(&ctx, SlowRequest(2), &resp);
  });
  const absl::Time wait_end = absl::Now() + absl::Seconds(30);
  while (pool_->pending() < 2 && absl::Now() < wait_end) absl::SleepFor(absl::Milliseconds(1));
  ASSERT_EQ(pool_->pending(), 2);
  hold.HoldAfterOneStep();
  EXPECT_EQ(Metric("arcface_preprocess_faces_total"), 1);
  ctx.TryCancel();
  client.join();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::CANCELLED);
  // The cancellation crosses loopback in well under a millisecond; nothing on the server can be
  // awaited for it (the call is held by the pool).
  absl::SleepFor(absl::Milliseconds(200));
  hold.Release();
  ASSERT_TRUE(WaitForIdlePool());
  EXPECT_TRUE(service_->WaitForIdle(absl::Now() + absl::Seconds(10)));
  EXPECT_EQ(Metric("arcface_requests_total", {{"rpc", "Embed"}, {"code", "CANCELLED"}}), 1);
  EXPECT_EQ(Metric("arcface_preprocess_aborted_total", {{"reason", "cancelled"}}), 1);
  EXPECT_EQ(Metric("arcface_preprocess_faces_total"), 1);
  EXPECT_TRUE(model_.batch_sizes().empty());
}

// The largest Compare the defaults accept has a reply within the message cap (its exact
// serialized size, built here), and one reference more is refused before any work.
TEST_F(ServiceTest, CompareRepliesFitTheMessageCapAtTheDefaults) {
  const ServiceOptions defaults;
  Start(defaults);
  Ready();
  const int rows = defaults.max_compare_rows;
  for (bool threshold : {false, true}) {
    int cols = 0;
    while (cols < defaults.max_compare_cols &&
           CompareReplyBytes(rows, cols + 1, threshold, model_desc_.model_id.size()) <=
               defaults.max_message_bytes) {
      ++cols;
    }
    v1::CompareResponse largest;
    largest.set_rows(rows);
    largest.set_cols(cols);
    largest.set_model_id(model_desc_.model_id);
    largest.mutable_similarities()->Resize(rows * cols, -0.123f);
    if (threshold) largest.mutable_matches()->Resize(rows * cols, true);
    EXPECT_LE(largest.ByteSizeLong(), defaults.max_message_bytes) << threshold;
    EXPECT_GE(largest.ByteSizeLong() + (threshold ? 5 : 4) * rows, defaults.max_message_bytes)
        << "the bound is tight to a column";
    std::cout << rows << " x " << cols << (threshold ? " with matches" : "") << ": "
              << largest.ByteSizeLong() << " bytes\n";

    // One column more: refused, without looking at the probes (empty here).
    v1::CompareRequest req;
    for (int i = 0; i < rows; ++i) req.add_queries();
    for (int j = 0; j <= cols; ++j) req.add_references();
    if (threshold) req.set_threshold(0.5f);
    v1::CompareResponse resp;
    grpc::Status s = Compare(req, &resp);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
    EXPECT_THAT(s.error_message(),
                HasSubstr(absl::StrCat(rows, " queries x ", cols + 1, " references")));
    EXPECT_THAT(s.error_message(),
                HasSubstr("over the message cap of 67108864 bytes (--max-message-bytes)"));
  }
}

// Through the server with a small cap: the largest accepted Compare's real reply fits it.
TEST_F(ServiceTest, LargestAcceptedCompareReplyFitsTheCap) {
  ServiceOptions options;
  options.max_message_bytes = 64 << 10;
  options.max_compare_cols = 65536;
  Start(options);
  Ready();
  const int rows = 2;
  int cols = 0;
  while (CompareReplyBytes(rows, cols + 1, true, model_desc_.model_id.size()) <=
         options.max_message_bytes) {
    ++cols;
  }
  std::vector<float> e(kEmbeddingDim);
  for (int j = 0; j < kEmbeddingDim; ++j) e[j] = std::cos(0.05 * j);
  v1::CompareRequest req;
  for (int i = 0; i < rows; ++i) {
    req.add_queries()->mutable_embedding()->mutable_values()->Assign(e.begin(), e.end());
  }
  for (int j = 0; j < cols; ++j) {
    req.add_references()->mutable_embedding()->mutable_values()->Assign(e.begin(), e.end());
  }
  req.set_threshold(0.5f);
  v1::CompareResponse resp;
  grpc::Status s = Compare(req, &resp);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(resp.similarities_size(), rows * cols);
  EXPECT_LE(resp.ByteSizeLong(), options.max_message_bytes);
  // Tight: within one column (5 bytes a row) and the bound's slack for the fields' headers.
  EXPECT_GT(resp.ByteSizeLong(), options.max_message_bytes - 5 * rows - 64);
  req.add_references()->mutable_embedding()->mutable_values()->Assign(e.begin(), e.end());
  s = Compare(req, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(s.error_message(), HasSubstr("(similarities and matches) would take up to"));
}

// A big Compare cancelled while its matrix is computed stops within a block of rows.
TEST_F(ServiceTest, CancelledCompareStopsItsMatrixEarly) {
  Start();
  Ready();
  constexpr int kRows = 4096, kCols = 4000;  // 8.4 G multiply-adds: seconds of CPU
  std::vector<float> e(kEmbeddingDim);
  v1::CompareRequest req;
  for (int i = 0; i < kRows + kCols; ++i) {
    for (int j = 0; j < kEmbeddingDim; ++j) e[j] = std::cos(0.01 * i * j + j);
    v1::Probe* p = i < kRows ? req.add_queries() : req.add_references();
    p->mutable_embedding()->mutable_values()->Assign(e.begin(), e.end());
  }
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
  grpc::Status status;
  std::thread client([&] {
    v1::CompareResponse resp;
    status = stub_->Compare(&ctx, req, &resp);
  });
  const absl::Time wait_end = absl::Now() + absl::Seconds(30);
  while (pool_->pending() < 1 && absl::Now() < wait_end) absl::SleepFor(absl::Milliseconds(1));
  ASSERT_EQ(pool_->pending(), 1);
  absl::SleepFor(absl::Milliseconds(300));  // into the matrix
  // The matrix's pace: how long 64 of its rows take on this machine now.
  std::vector<float> a(size_t(64) * kEmbeddingDim, 0.01f), b(size_t(kCols) * kEmbeddingDim, 0.02f);
  absl::Time start = absl::Now();
  CosineMatrix(a, b, 64, kCols, kEmbeddingDim);
  const absl::Duration per_64_rows = absl::Now() - start;
  start = absl::Now();
  ctx.TryCancel();
  client.join();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::CANCELLED);
  ASSERT_TRUE(WaitForIdlePool());
  const absl::Duration stopped_after = absl::Now() - start;
  std::cout << "64 rows: " << per_64_rows << "; whole matrix ~" << per_64_rows * (kRows / 64)
            << "; the cancelled matrix stopped " << stopped_after << " after the cancel\n";
  // A block is ~8 rows; the whole matrix would take 64 times per_64_rows.
  EXPECT_LT(stopped_after, per_64_rows * 4 + absl::Milliseconds(200));
  EXPECT_EQ(Metric("arcface_preprocess_aborted_total", {{"reason", "cancelled"}}), 1);
  EXPECT_TRUE(service_->WaitForIdle(absl::Now() + absl::Seconds(10)));
  EXPECT_EQ(Metric("arcface_requests_total", {{"rpc", "Compare"}, {"code", "CANCELLED"}}), 1);
}

TEST_F(ServiceTest, MetricsCountRequestsAndFaces) {
  Start();
  Ready();
  v1::EmbedRequest req;
  *req.add_faces() = RawFace(SeededCrop(1));
  *req.add_faces() = RawFace(SeededCrop(2));
  v1::EmbedResponse resp;
  ASSERT_TRUE(Embed(req, &resp).ok());
  v1::EmbedRequest bad;
  bad.add_faces();
  EXPECT_FALSE(Embed(bad, &resp).ok());
  const std::string text = metrics_->Render();
  EXPECT_THAT(text, HasSubstr("arcface_requests_total{rpc=\"Embed\",code=\"OK\"} 1\n"));
  EXPECT_THAT(text,
              HasSubstr("arcface_requests_total{rpc=\"Embed\",code=\"INVALID_ARGUMENT\"} 1\n"));
  EXPECT_THAT(text, HasSubstr("arcface_faces_total 2\n"));
  EXPECT_THAT(text, HasSubstr("arcface_request_seconds_count{rpc=\"Embed\"} 2\n"));
}

TEST(CosineMatrix, MatchesDirectDotProducts) {
  const int rows = 3, cols = 5, dim = 7;
  std::vector<float> a(rows * dim), b(cols * dim);
  for (size_t i = 0; i < a.size(); ++i) a[i] = std::cos(0.3 * i);
  for (size_t i = 0; i < b.size(); ++i) b[i] = std::sin(0.7 * i);
  std::vector<float> m = CosineMatrix(a, b, rows, cols, dim);
  for (int i = 0; i < rows; ++i) {
    for (int j = 0; j < cols; ++j) {
      double dot = 0;
      for (int k = 0; k < dim; ++k) dot += double(a[i * dim + k]) * b[j * dim + k];
      EXPECT_NEAR(m[i * cols + j], dot, 1e-6);
    }
  }
}

}  // namespace
}  // namespace arcface::service
