// arcface::client::Client: the C++ client of arcface.v1.FaceEmbedding (embedding, comparison,
// the server's face detector), arcface.v1.FaceGallery and arcface.v1.ModelAdmin (reloads).
//
// Contract
// - Client::Create validates the options and builds one gRPC channel; it does not connect (the
//   first call, or WaitForHealthy, does). All addresses share that channel under gRPC's
//   `round_robin` policy: a list of several is resolved once, at Create, into IP addresses
//   (getaddrinfo); a single address goes through gRPC's DNS resolver, so a name with several
//   A records (a headless Kubernetes service) is spread over too.
// - Blocking: every method blocks its caller until the answer, a final error or the deadline.
//   Each RPC attempt carries the deadline ClientOptions::timeout; EmbedStream and DetectStream
//   instead fail with DEADLINE_EXCEEDED when their oldest outstanding message waits longer.
// - Retries: a call that fails with UNAVAILABLE is retried per RetryPolicy (exponential backoff
//   with jitter, policies.h); every other code, INVALID_ARGUMENT above all, is returned at once.
//   Embed, Compare, Detect, GetModelInfo and health checks are idempotent, so a retry is safe;
//   an EmbedStream or DetectStream that breaks with UNAVAILABLE is reopened and its unanswered
//   messages re-sent.
//   The gallery's reads are idempotent too, and Enroll always carries a request_id (the
//   caller's, else one made per call) with which the server adds its faces once; Forget alone
//   is never retried (a repeat would report 0 faces removed for faces the first one removed).
//   Nor is ReloadModels: a reload whose answer was lost may have swapped the model in, and a
//   repeat would report it UNCHANGED.
// - Limits: Embed and Compare read the server's max_faces_per_request and max_message_bytes
//   from GetModelInfo once (on first need) and split large lists into several requests, keeping
//   input order. ClientOptions can set smaller limits. Enroll and Identify split likewise under
//   the server's GalleryLimits (max_faces_per_enroll, max_probes_per_identify); a split Enroll
//   is not atomic (its requests carry the keys "<request_id>#<n>": repeating a failed call with
//   the same request_id completes it without duplicates).
// - Errors: absl::Status with gRPC's codes (absl and gRPC share the numbering). A face's error
//   names the face by its label (the file path for FaceInput::FromFile) and its index in the
//   caller's list, e.g. "face 7 (img/b.png): undecodable image ..." (Enroll: "faces 7 ...",
//   Identify: "probes 7 ...", as the server names the request's fields); a frame's error
//   (Detect, DetectStream) is prefixed with its label. A server without a gallery store answers
//   the gallery calls UNIMPLEMENTED, one started with --detector none Detect and DetectStream,
//   one without --admin-rpc ReloadModels (its message names the flag and SIGHUP).
// - Thread safety: a Client may be used from many threads at once. FaceInput is a value.
#ifndef ARCFACE_CLIENT_CPP_CLIENT_H_
#define ARCFACE_CLIENT_CPP_CLIENT_H_

#include <array>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include <grpcpp/grpcpp.h>
#include <opencv2/core.hpp>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "arcface/v1/face_embedding.grpc.pb.h"
#include "arcface/v1/face_gallery.grpc.pb.h"
#include "client/cpp/policies.h"

namespace arcface::client {

// PEM contents (not paths; LoadTlsFiles reads files).
struct TlsOptions {
  std::string root_ca_pem;      // empty: the system's roots
  std::string client_cert_pem;  // mutual TLS: both the chain and the key
  std::string client_key_pem;
  std::string server_name;      // checked against the server's certificate; empty: the host
};

// Reads the PEM files; empty paths stay empty. NOT_FOUND naming the file that cannot be read.
absl::StatusOr<TlsOptions> LoadTlsFiles(const std::string& root_ca, const std::string& cert,
                                        const std::string& key);

struct ClientOptions {
  std::vector<std::string> addresses = {"localhost:50051"};  // "host:port", see ParseAddressList
  absl::Duration timeout = absl::Seconds(30);                 // per RPC attempt
  std::optional<TlsOptions> tls;                              // nullopt: plaintext
  RetryPolicy retry;
  int max_faces_per_request = 0;   // 0: the server's (GetModelInfo)
  uint64_t max_message_bytes = 0;  // 0: the server's (GetModelInfo)
  // The served model (ListModels' names) that Embed, EmbedStream, Compare, Detect, DetectStream
  // and GetModelInfo ask for; empty: the server's default model (NOT_FOUND for an unknown one).
  std::string model;
  // Called before each retry's wait (say, to print a note); from the calling thread.
  std::function<void(const absl::Status& error, int next_attempt, absl::Duration wait)> on_retry;
};

struct Box {
  float x_min = 0, y_min = 0, x_max = 0, y_max = 0;  // pixels
};

// One face to embed: an image (encoded bytes, or raw pixels) with optional 5 landmarks (left
// eye, right eye, nose tip, left and right mouth corner) or a box. Neither: the whole image.
class FaceInput {
 public:
  // JPEG, PNG, BMP, WebP or TIFF file bytes, decoded by the server.
  static FaceInput FromEncoded(std::string bytes, std::string label = "");
  // Reads the file (its bytes travel encoded); NOT_FOUND naming the path when unreadable.
  static absl::StatusOr<FaceInput> FromFile(const std::string& path);
  // Raw pixels as OpenCV holds them: CV_8UC3 BGR (sent as BGR8), CV_8UC1 (GRAY8) or CV_8UC4
  // BGRA (alpha dropped). INVALID_ARGUMENT for other types or an empty image.
  static absl::StatusOr<FaceInput> FromMat(const cv::Mat& image, std::string label = "");

  FaceInput& WithLandmarks(const std::array<cv::Point2f, 5>& points);
  FaceInput& WithBox(const Box& box);

  const std::string& label() const { return label_; }
  const arcface::v1::Face& proto() const { return face_; }

 private:
  arcface::v1::Face face_;
  std::string label_;
};

struct Embedding {
  // The model's embedding_dim values (512 for ArcFace): raw, or unit length when normalize was
  // asked
  std::vector<float> values;
  float norm = 0;  // L2 norm of the raw vector
};

// A Compare operand: a face (embedded by the server) or an embedding taken as given.
using Probe = std::variant<FaceInput, std::vector<float>>;

struct CompareResult {
  int rows = 0;
  int cols = 0;
  std::vector<float> similarities;  // rows x cols cosines, row-major
  std::vector<bool> matches;        // similarity >= threshold; empty without a threshold
  std::string model_id;
  float at(int row, int col) const { return similarities[size_t(row) * cols + col]; }
};

// One EmbedStream message: the faces of, say, one video frame. `tag` is the caller's, echoed.
struct StreamItem {
  std::vector<FaceInput> faces;
  int64_t tag = 0;
};

struct StreamOptions {
  int max_in_flight = 16;  // messages sent and not yet answered at most
};

enum class ServingStatus { kUnknown, kServing, kNotServing };

// What a Detect or DetectStream call asks for (DetectRequest's fields of the same names; zeros
// mean the server's defaults).
struct DetectOptions {
  float min_score = 0;      // in [0, 1]; 0: DetectorInfo.default_min_score
  uint32_t max_faces = 0;   // the highest-scoring faces only; 0: all
  float min_face_size = 0;  // shorter box side in the frame's pixels; 0: all
  bool embed = false;       // also align and embed each face
  bool normalize = false;   // unit-length embeddings
  std::string gallery;      // identify each face in this gallery (implies embed)
  uint32_t top_k = 0;       // candidates (distinct subjects) per face; 0: 1
  // Only candidates with at least this similarity; unset: the model's default_threshold.
  std::optional<float> threshold;
};

// A gallery subject that matches a detected face (arcface.v1.Candidate).
struct Candidate {
  std::string subject_id;
  std::string face_id;  // the subject's best-matching face
  float similarity = 0;
};

struct DetectedFace {
  Box box;  // in the frame's pixels
  float score = 0;
  // Left eye, right eye, nose tip, left and right mouth corners: FaceInput::WithLandmarks's
  // order, in the frame's pixels.
  std::array<cv::Point2f, 5> landmarks;
  std::optional<Embedding> embedding;  // with embed or a gallery
  std::vector<Candidate> candidates;   // with a gallery: by similarity, descending
};

// The faces of one frame, by score descending.
struct Detection {
  std::vector<DetectedFace> faces;
  int image_width = 0;
  int image_height = 0;
  std::string model_id;  // with embed or a gallery
  std::string detector_id;
  std::optional<float> threshold;  // with a gallery: the candidates' cut (asked, or the model's)
};

// One DetectStream message: a frame (its image only: no landmarks, no box). `tag` is echoed.
struct FrameItem {
  FaceInput frame;
  int64_t tag = 0;
};

// The optional parts of an Enroll (EnrollRequest's fields of the same names).
struct EnrollOptions {
  std::map<std::string, std::string> labels;  // set on the subject; other keys are kept
  std::string request_id;                     // idempotency key; empty: one made per call
  std::string model_id;                       // of the embedding probes; empty: the server's
  // The served model that embeds the face probes of a new gallery; empty: the gallery's own
  // (a new gallery: the server's default).
  std::string model;
};

class Client {
 public:
  static absl::StatusOr<std::unique_ptr<Client>> Create(const ClientOptions& options);

  // ClientOptions::model's ModelInfo.
  absl::StatusOr<arcface::v1::ModelInfo> GetModelInfo();
  // Every model the server serves, the default first.
  absl::StatusOr<arcface::v1::ListModelsResponse> ListModels();
  // ModelAdmin.ReloadModels: the server re-reads the named models' files (empty: every served
  // model) and swaps in those that changed; one result per model, in the request's order (all:
  // the served order). A file that fails leaves its model serving and is a FAILED result with
  // its error, not an error of the call; NOT_FOUND names the served models when one is not.
  // The answer comes once every model is loaded and warmed up (seconds each), so
  // ClientOptions::timeout must cover that; a deadline passing first only loses the answer,
  // the reload goes on. Never retried (see Retries).
  absl::StatusOr<arcface::v1::ReloadModelsResponse> ReloadModels(
      const std::vector<std::string>& models = {});

  // One embedding per face, in order; large lists go in several requests.
  absl::StatusOr<std::vector<Embedding>> Embed(const std::vector<FaceInput>& faces,
                                               bool normalize = false);

  // One EmbedStream call: `next` is called on a writer thread for each message until it
  // returns nullopt; `on_result` is called on the calling thread exactly once per message
  // taken, in order, with the embeddings or that message's own error (the stream goes on).
  // Returns OK when every message was answered, else the error that ended the stream (after
  // retries); messages left unanswered then get that error through `on_result` first.
  absl::Status EmbedStream(
      const std::function<std::optional<StreamItem>()>& next, bool normalize,
      const std::function<void(int64_t tag, absl::StatusOr<std::vector<Embedding>>)>& on_result,
      const StreamOptions& stream_options = {});

  // The faces of one frame found by the server's detector. `frame` is a whole image:
  // INVALID_ARGUMENT when it carries landmarks or a box.
  absl::StatusOr<Detection> Detect(const FaceInput& frame, const DetectOptions& options = {});

  // One DetectStream call, as EmbedStream: `next` on a writer thread until nullopt, `on_result`
  // on the calling thread once per frame taken, in order, with its faces or its own error.
  absl::Status DetectStream(
      const std::function<std::optional<FrameItem>()>& next, const DetectOptions& options,
      const std::function<void(int64_t tag, absl::StatusOr<Detection>)>& on_result,
      const StreamOptions& stream_options = {});

  // Cosine of every query against every reference. When the face probes exceed the server's
  // per-request limit they are embedded first (split) and compared as embeddings.
  absl::StatusOr<CompareResult> Compare(const std::vector<Probe>& queries,
                                        const std::vector<Probe>& references,
                                        std::optional<float> threshold = std::nullopt);

  // One grpc.health.v1 Check of the whole server ("" service); errors as statuses.
  absl::StatusOr<ServingStatus> CheckHealth();
  // Polls health until SERVING: OK. When `timeout` passes first: UNAVAILABLE if the last check
  // got no answer (server down, unreachable), DEADLINE_EXCEEDED if the server answered but was
  // not SERVING (still loading, draining); either names the last state or error.
  absl::Status WaitForHealthy(absl::Duration timeout);

  // The gallery (service FaceGallery; face_gallery.proto has the semantics). An empty gallery
  // is "default". Probes are faces (embedded by the server's model) or embeddings as given.

  // Adds `faces` to the subject; the answer (face ids in input order) comes once they are
  // durable. More faces than the server's max_faces_per_enroll go in several requests.
  absl::StatusOr<arcface::v1::EnrollResponse> Enroll(const std::string& gallery,
                                                     const std::string& subject_id,
                                                     const std::vector<Probe>& faces,
                                                     const EnrollOptions& options = {});
  // One Identification per probe, in order (top_k 0 means 1); more probes than the server's
  // max_probes_per_identify (face probes: its max_faces_per_request) go in several requests.
  // Without a threshold the server cuts at the model's default_threshold; the response's
  // `threshold` says the one used.
  absl::StatusOr<arcface::v1::IdentifyResponse> Identify(
      const std::string& gallery, const std::vector<Probe>& probes, uint32_t top_k = 1,
      std::optional<float> threshold = std::nullopt);
  // A subject alone: it and all its faces; face ids: those faces. Never retried.
  absl::StatusOr<arcface::v1::ForgetResponse> Forget(const std::string& gallery,
                                                     const std::string& subject_id,
                                                     const std::vector<std::string>& face_ids = {});
  // One page; pass its next_page_token for the next one (empty on the last page).
  absl::StatusOr<arcface::v1::ListSubjectsResponse> ListSubjects(
      const std::string& gallery, uint32_t page_size = 0, const std::string& page_token = "");
  absl::StatusOr<arcface::v1::GalleryInfo> GetGalleryInfo(const std::string& gallery);

  const std::string& target() const { return target_; }

 private:
  Client(const ClientOptions& options, std::shared_ptr<grpc::Channel> channel, std::string target);

  struct Limits {
    int max_faces = 0;
    uint64_t max_bytes = 0;
    int max_enroll = 0;  // GalleryLimits; 0: no count limit known
    int max_probes = 0;
  };
  // `gallery`: the gallery limits are needed too (GetModelInfo once, whatever the options say).
  absl::StatusOr<Limits> ServerLimits(bool gallery = false);
  // Runs `attempt` (one RPC with a fresh context) until it succeeds, fails with a code other
  // than UNAVAILABLE, or the attempts are spent.
  grpc::Status WithRetries(const std::function<grpc::Status(grpc::ClientContext*)>& attempt);
  void SetDeadline(grpc::ClientContext* context) const;
  // The engine of EmbedStream and DetectStream (client.cc): the window of messages in flight,
  // the order check, the watchdog and the reopening after UNAVAILABLE. `Item` has a `tag`;
  // `request` makes its message (the request_id is set here); `answer` gets each response in
  // order (which may carry its own error) and `fail` each item left unanswered at the end.
  template <typename Item, typename Request, typename Response>
  absl::Status RunStream(
      const std::string& rpc,
      const std::function<std::unique_ptr<grpc::ClientReaderWriter<Request, Response>>(
          grpc::ClientContext*)>& open,
      const std::function<std::optional<Item>()>& next,
      const std::function<Request(const Item&)>& request,
      const std::function<void(const Item&, const Response&)>& answer,
      const std::function<void(const Item&, const absl::Status&)>& fail,
      const StreamOptions& stream_options);
  absl::Duration NextBackoff(int retry);
  uint64_t NextRandom();  // splitmix64 over rng_state_

  const ClientOptions options_;
  const std::string target_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<arcface::v1::FaceEmbedding::Stub> stub_;
  std::unique_ptr<arcface::v1::FaceGallery::Stub> gallery_stub_;
  std::unique_ptr<arcface::v1::ModelAdmin::Stub> admin_stub_;

  absl::Mutex mu_;
  std::optional<Limits> limits_ ABSL_GUARDED_BY(mu_);
  uint64_t rng_state_ ABSL_GUARDED_BY(mu_);
};

}  // namespace arcface::client

#endif  // ARCFACE_CLIENT_CPP_CLIENT_H_
