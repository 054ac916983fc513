// Fuzz target: raw request bytes → the real FaceEmbeddingService (Embed, Compare, EmbedStream,
// Detect, DetectStream), behind a real gRPC server started once per process, with a fake model
// instead of the engine and a fake detector instead of face-api's networks.
//
// Input: byte 0 picks the RPC (mod 5: Embed, Compare, EmbedStream, Detect, DetectStream); the
// rest is the request body, sent as is through a generic stub, so that bytes that are no valid
// message reach gRPC's deserialization in the server exactly as from a network client. For the
// streams the rest is split at "#next#" into the stream's messages.
//
// Why this way: the handlers need a live grpc::CallbackServerContext (DefaultReactor, deadline,
// cancellation), which only a gRPC server makes, and their private steps (StartEmbed, ...) are
// not reachable otherwise without changing the service. The server listens on 127.0.0.1:0 and
// the client keeps one connection, so an execution costs one call, not a connection. (gRPC's
// in-process channel would save the loopback, but Debian's gRPC 1.51 in-process transport
// keeps both call arenas, ~22 KB, of every stream whose message fails to deserialize: 892 of
// 1,000 such streams stayed alive, and a long run reached the 2 GB limit in minutes; the same
// streams over TCP to arcface-server leave its RSS flat.) The fake model hashes each crop into an
// embedding, so that every answer can be checked for shape; the fake detector finds one face in
// the middle of every frame of at least 8×8 pixels (none in smaller ones), so that Detect's
// alignment and embedding run on whatever frame the fuzzer makes.
//
// Leaks: libFuzzer's own check (after every input whose mallocs and frees differ) runs on
// nearly every input here, as gRPC frees a call's memory on its threads after the client has
// its answer, and made this target 20 times slower; so the runner passes -detect_leaks=0 and
// this target runs LeakSanitizer itself every few seconds and at exit, once the service has no
// call in flight: memory nothing points to any more is reported whenever it leaked.
//
// Checked (abort = a finding): an OK Embed answers every face with 512 finite values and echoes
// request_id; an OK Detect answers faces with five finite landmarks (and, with embed, 512 finite
// values each) and echoes request_id; an OK Compare has rows × cols finite similarities in [-1, 1] (and as many matches
// when a threshold was given); no RPC ends UNKNOWN or INTERNAL (the fake model never fails, so
// INTERNAL would be a validation gap); an EmbedStream answers at most one response per message,
// in order (request_id echoed; a message that does not parse answered INVALID_ARGUMENT) and,
// when it ends OK, one each; DetectStream the same.
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include <sanitizer/lsan_interface.h>

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "arcface/v1/face_embedding.pb.h"
#include "server/service/detection_model.h"
#include "server/service/embedder.h"
#include "server/service/embedding_model.h"
#include "server/service/face_embedding_service.h"
#include "server/service/frame_detector.h"
#include "server/service/service_metrics.h"
#include "server/service/work_queue.h"

namespace arcface::service {
namespace {

namespace v1 = ::arcface::v1;
using model::kCropBytes;
using model::kEmbeddingDim;

constexpr char kSeparator[] = "#next#";

void Fail(const std::string& what) {
  std::fprintf(stderr, "fuzz_service: %s\n", what.c_str());
  std::abort();
}

// Each crop's embedding is a function of its bytes: finite, of both signs, never zero.
class FakeModel final : public EmbeddingModel {
 public:
  const arcface::model::CropGeometry& geometry() const override {
    return arcface::model::kArcFaceCrop;
  }
  int embedding_dim() const override { return kEmbeddingDim; }

 public:
  absl::StatusOr<EmbeddingBatch> Run(absl::Span<const uint8_t> crops) override {
    const size_t n = crops.size() / kCropBytes;
    EmbeddingBatch out;
    out.size = static_cast<int>(n);
    out.values.resize(n * kEmbeddingDim);
    out.norms.resize(n);
    for (size_t i = 0; i < n; ++i) {
      uint64_t h = 1469598103934665603ull;
      for (size_t b = 0; b < kCropBytes; ++b) h = (h ^ crops[i * kCropBytes + b]) * 1099511628211ull;
      double squares = 0;
      for (int j = 0; j < kEmbeddingDim; ++j) {
        h = h * 6364136223846793005ull + 1442695040888963407ull;
        const float v = static_cast<float>(int(h >> 53) - 512) / 64.0f + 0.01f;
        out.values[i * kEmbeddingDim + j] = v;
        squares += double(v) * v;
      }
      out.norms[i] = static_cast<float>(std::sqrt(squares));
    }
    return out;
  }
};

// One face in the middle of every frame of at least 8×8 pixels.
class FakeDetector final : public DetectionModel {
 public:
  absl::StatusOr<PreparedFrame> Prepare(const cv::Mat& rgb,
                                        const DetectFilter& filter) const override {
    PreparedFrame frame;
    frame.rgb = rgb;
    frame.filter = filter;
    return frame;
  }
  absl::StatusOr<std::vector<std::vector<DetectedBox>>> Run(
      absl::Span<const PreparedFrame* const> frames) override {
    std::vector<std::vector<DetectedBox>> out(frames.size());
    for (size_t i = 0; i < frames.size(); ++i) {
      const float w = static_cast<float>(frames[i]->rgb.cols);
      const float h = static_cast<float>(frames[i]->rgb.rows);
      if (w < 8 || h < 8 || frames[i]->filter.min_score > 0.9f) continue;
      DetectedBox face;
      face.box = {0.25f * w, 0.25f * h, 0.75f * w, 0.75f * h};
      face.score = 0.9f;
      face.landmarks = {image::Point{0.4f * w, 0.4f * h}, image::Point{0.6f * w, 0.4f * h},
                        image::Point{0.5f * w, 0.5f * h}, image::Point{0.42f * w, 0.6f * h},
                        image::Point{0.58f * w, 0.6f * h}};
      out[i].push_back(face);
    }
    return out;
  }
};

// The server side, built once and never destroyed (its threads run until the process exits).
struct Harness {
  FakeModel model;
  FakeDetector detector_model;
  std::unique_ptr<ServiceMetrics> metrics;
  std::unique_ptr<WorkQueue> pool;
  std::unique_ptr<Embedder> embedder;
  std::unique_ptr<FrameDetector> detector;
  std::unique_ptr<FaceEmbeddingService> service;
  std::unique_ptr<grpc::Server> server;
  std::unique_ptr<grpc::GenericStub> stub;

  Harness() {
    ServiceOptions options;
    options.image_limits.max_pixels = 4'000'000;  // as fuzz_face_crop, for the same reason
    metrics = std::make_unique<ServiceMetrics>(32);
    pool = *WorkQueue::Create(2, 64);
    service = std::make_unique<FaceEmbeddingService>(options, metrics.get(), pool.get());
    EmbedderOptions eo;
    eo.batching.max_batch_size = 32;
    eo.batching.max_queue_delay = absl::ZeroDuration();
    eo.batching.observer = metrics.get();
    embedder = *Embedder::Create(eo, &model);
    batching::DynamicBatcher::Options detector_batching;
    detector_batching.max_batch_size = 8;
    detector_batching.max_queue_size = 64;
    detector_batching.max_queue_delay = absl::ZeroDuration();
    DetectorDescription description;
    description.detector_id = "fake+fake@0123456789ab";
    description.max_faces_per_frame = 16;
    detector = *FrameDetector::Create(detector_batching, &detector_model, description, nullptr);
    service->SetDetection(detector.get(), nullptr);
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(service.get());
    server = builder.BuildAndStart();
    if (server == nullptr || port <= 0) Fail("the gRPC server did not start");
    ModelDescription desc;
    desc.arch = "r50";
    desc.model_id = "arcface-r50@0123456789ab";
    desc.device = "cpu";
    desc.precision = "fp32";
    service->SetReady(embedder.get(), desc);
    stub = std::make_unique<grpc::GenericStub>(grpc::CreateChannel(
        absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials()));
  }
};

Harness* harness = nullptr;

grpc::ByteBuffer ToBuffer(const std::string& bytes) {
  grpc::Slice slice(bytes);
  return grpc::ByteBuffer(&slice, 1);
}

std::string FromBuffer(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  std::string out;
  if (!buffer.Dump(&slices).ok()) Fail("cannot read a response buffer");
  for (const grpc::Slice& s : slices) out.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return out;
}

void SetDeadline(grpc::ClientContext* ctx) {
  // Far beyond libFuzzer's -timeout, which is what reports a slow call.
  ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
}

void CheckCode(const grpc::Status& status, const char* rpc) {
  if (status.error_code() == grpc::StatusCode::UNKNOWN ||
      status.error_code() == grpc::StatusCode::INTERNAL) {
    Fail(absl::StrCat(rpc, " ended with code ", status.error_code(), ": ",
                      status.error_message()));
  }
}

void CheckEmbeddings(const v1::EmbedRequest& request, const v1::EmbedResponse& response,
                     const std::string& where) {
  if (response.request_id() != request.request_id()) Fail(where + ": request_id not echoed");
  if (response.embeddings_size() != request.faces_size()) {
    Fail(absl::StrCat(where, ": ", response.embeddings_size(), " embeddings for ",
                      request.faces_size(), " faces"));
  }
  for (const v1::Embedding& e : response.embeddings()) {
    if (e.values_size() != kEmbeddingDim) Fail(where + ": an embedding of the wrong size");
    for (float v : e.values()) {
      if (!std::isfinite(v)) Fail(where + ": a non-finite embedding value");
    }
  }
}

// Runs one unary call synchronously; returns its status and the response's bytes.
grpc::Status Unary(const std::string& method, const std::string& body, std::string* response) {
  grpc::ClientContext ctx;
  SetDeadline(&ctx);
  grpc::CompletionQueue cq;
  grpc::ByteBuffer request = ToBuffer(body);
  grpc::ByteBuffer reply;
  grpc::Status status;
  auto call = harness->stub->PrepareUnaryCall(&ctx, method, request, &cq);
  call->StartCall();
  call->Finish(&reply, &status, reinterpret_cast<void*>(1));
  void* tag;
  bool ok;
  if (!cq.Next(&tag, &ok) || !ok) Fail("a unary call did not complete");
  if (status.ok()) *response = FromBuffer(reply);
  cq.Shutdown();
  while (cq.Next(&tag, &ok)) {
  }
  return status;
}

void Embed(const std::string& body) {
  std::string reply;
  const grpc::Status status = Unary("/arcface.v1.FaceEmbedding/Embed", body, &reply);
  CheckCode(status, "Embed");
  if (!status.ok()) return;
  v1::EmbedRequest request;
  v1::EmbedResponse response;
  if (!request.ParseFromString(body)) Fail("Embed accepted a request that does not parse");
  if (!response.ParseFromString(reply)) Fail("Embed answered an unparseable response");
  CheckEmbeddings(request, response, "Embed");
}

void Compare(const std::string& body) {
  std::string reply;
  const grpc::Status status = Unary("/arcface.v1.FaceEmbedding/Compare", body, &reply);
  CheckCode(status, "Compare");
  if (!status.ok()) return;
  v1::CompareRequest request;
  v1::CompareResponse response;
  if (!request.ParseFromString(body)) Fail("Compare accepted a request that does not parse");
  if (!response.ParseFromString(reply)) Fail("Compare answered an unparseable response");
  const int64_t cells = int64_t{request.queries_size()} * request.references_size();
  if (response.rows() != static_cast<uint32_t>(request.queries_size()) ||
      response.cols() != static_cast<uint32_t>(request.references_size()) ||
      response.similarities_size() != cells) {
    Fail("Compare: the matrix does not match the probes");
  }
  if (response.matches_size() != (request.has_threshold() ? cells : 0)) {
    Fail("Compare: wrong number of matches");
  }
  for (float s : response.similarities()) {
    if (!(std::fabs(s) <= 1.0f + 1e-5f)) Fail(absl::StrCat("Compare: similarity ", s));
  }
}

void CheckFaces(const v1::DetectRequest& request, const v1::DetectResponse& response,
                const std::string& where) {
  if (response.request_id() != request.request_id()) Fail(where + ": request_id not echoed");
  const bool embed = request.embed() || !request.gallery().empty();
  for (const v1::DetectedFace& f : response.faces()) {
    if (f.landmarks_size() != 5) Fail(where + ": a face without its five landmarks");
    for (const v1::Point& p : f.landmarks()) {
      if (!std::isfinite(p.x()) || !std::isfinite(p.y())) Fail(where + ": a non-finite landmark");
    }
    if (embed != f.has_embedding()) Fail(where + ": embed and the embeddings disagree");
    if (!embed) continue;
    if (f.embedding().values_size() != kEmbeddingDim) Fail(where + ": an embedding of the wrong size");
    for (float v : f.embedding().values()) {
      if (!std::isfinite(v)) Fail(where + ": a non-finite embedding value");
    }
  }
}

void Detect(const std::string& body) {
  std::string reply;
  const grpc::Status status = Unary("/arcface.v1.FaceEmbedding/Detect", body, &reply);
  CheckCode(status, "Detect");
  if (!status.ok()) return;
  v1::DetectRequest request;
  v1::DetectResponse response;
  if (!request.ParseFromString(body)) Fail("Detect accepted a request that does not parse");
  if (!response.ParseFromString(reply)) Fail("Detect answered an unparseable response");
  CheckFaces(request, response, "Detect");
}

// EmbedStream or DetectStream: `check` looks at an answer without an error.
template <typename Request, typename Response, typename Check>
void Stream(const char* rpc, const std::string& body, Check check) {
  const std::vector<std::string> messages = absl::StrSplit(body, kSeparator);
  grpc::ClientContext ctx;
  SetDeadline(&ctx);
  grpc::CompletionQueue cq;
  auto call =
      harness->stub->PrepareCall(&ctx, absl::StrCat("/arcface.v1.FaceEmbedding/", rpc), &cq);
  enum Tag : intptr_t { kStart = 1, kWrite, kWritesDone, kRead, kFinish };
  auto tag_of = [](Tag t) { return reinterpret_cast<void*>(t); };
  call->StartCall(tag_of(kStart));

  // One write and one read outstanding at a time, as gRPC allows; reading while writing keeps
  // the server's per-stream backpressure from deadlocking against this client.
  std::vector<grpc::ByteBuffer> outgoing;
  for (const std::string& m : messages) outgoing.push_back(ToBuffer(m));
  size_t written = 0;
  bool writing = true, reading = true, finishing = false, finished = false;
  grpc::ByteBuffer incoming;
  std::vector<std::string> replies;
  grpc::Status status;
  void* tag;
  bool ok;
  while (!finished) {
    if (!cq.Next(&tag, &ok)) Fail("the stream's queue shut down");
    switch (static_cast<Tag>(reinterpret_cast<intptr_t>(tag))) {
      case kStart:
        if (!ok) {
          writing = reading = false;
          break;
        }
        call->Read(&incoming, tag_of(kRead));
        if (outgoing.empty()) {
          call->WritesDone(tag_of(kWritesDone));
        } else {
          call->Write(outgoing[written++], tag_of(kWrite));
        }
        break;
      case kWrite:
        if (ok && written < outgoing.size()) {
          call->Write(outgoing[written++], tag_of(kWrite));
        } else if (ok) {
          call->WritesDone(tag_of(kWritesDone));
        } else {
          writing = false;
        }
        break;
      case kWritesDone:
        writing = false;
        break;
      case kRead:
        if (ok) {
          replies.push_back(FromBuffer(incoming));
          call->Read(&incoming, tag_of(kRead));
        } else {
          reading = false;
        }
        break;
      case kFinish:
        finished = true;
        break;
    }
    if (!writing && !reading && !finishing) {
      call->Finish(&status, tag_of(kFinish));
      finishing = true;
    }
  }
  cq.Shutdown();
  while (cq.Next(&tag, &ok)) {
  }

  CheckCode(status, rpc);
  if (replies.size() > messages.size()) Fail(absl::StrCat(rpc, ": more responses than messages"));
  std::vector<Request> requests(messages.size());
  std::vector<bool> parsed(messages.size());
  for (size_t i = 0; i < messages.size(); ++i) parsed[i] = requests[i].ParseFromString(messages[i]);
  for (size_t i = 0; i < replies.size(); ++i) {
    Response response;
    if (!response.ParseFromString(replies[i])) Fail(absl::StrCat(rpc, ": an unparseable response"));
    const std::string where = absl::StrCat(rpc, " message ", i);
    if (!parsed[i]) {
      // Answered in-stream, without an id to echo.
      if (response.error().code() != grpc::StatusCode::INVALID_ARGUMENT) {
        Fail(where + ": a message that does not parse is not answered INVALID_ARGUMENT");
      }
      continue;
    }
    if (response.has_error()) {
      // An over-long request_id is itself the error and is not echoed.
      const std::string& id = requests[i].request_id();
      if (response.request_id() != (id.size() <= service::kMaxRequestIdBytes ? id : "")) {
        Fail(where + ": request_id not echoed");
      }
      if (response.error().code() == grpc::StatusCode::OK ||
          response.error().code() == grpc::StatusCode::UNKNOWN ||
          response.error().code() == grpc::StatusCode::INTERNAL) {
        Fail(absl::StrCat(where, ": error code ", response.error().code()));
      }
    } else {
      check(requests[i], response, where);
    }
  }
  // The silent loss of issue 10: a stream must never end OK with messages unanswered.
  if (status.ok() && replies.size() != messages.size()) {
    Fail(absl::StrCat(rpc, " ended OK after answering ", replies.size(), " of ",
                      messages.size(), " messages"));
  }
}

void CheckLeaks() {
  // A call's last steps (Release, the reactor's deletion) may still run after its client has
  // the answer; until then its memory is in use, not leaked, but wait for them to be sure.
  const absl::Time give_up = absl::Now() + absl::Seconds(5);
  while (harness->service->inflight() > 0 && absl::Now() < give_up) {
    absl::SleepFor(absl::Milliseconds(1));
  }
  if (__lsan_do_recoverable_leak_check() != 0) Fail("LeakSanitizer found leaks (see above)");
}

absl::Time last_leak_check;

}  // namespace
}  // namespace arcface::service

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  arcface::service::harness = new arcface::service::Harness();
  arcface::service::last_leak_check = absl::Now();
  std::atexit(arcface::service::CheckLeaks);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return -1;
  const std::string body(reinterpret_cast<const char*>(data) + 1, size - 1);
  namespace v1 = ::arcface::v1;
  switch (data[0] % 5) {
    case 0:
      arcface::service::Embed(body);
      break;
    case 1:
      arcface::service::Compare(body);
      break;
    case 2:
      arcface::service::Stream<v1::EmbedRequest, v1::EmbedResponse>(
          "EmbedStream", body, arcface::service::CheckEmbeddings);
      break;
    case 3:
      arcface::service::Detect(body);
      break;
    default:
      arcface::service::Stream<v1::DetectRequest, v1::DetectResponse>(
          "DetectStream", body, arcface::service::CheckFaces);
      break;
  }
  if (absl::Now() - arcface::service::last_leak_check > absl::Seconds(2)) {
    arcface::service::CheckLeaks();
    arcface::service::last_leak_check = absl::Now();
  }
  return 0;
}
