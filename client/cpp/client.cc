#include "client/cpp/client.h"

#include <netdb.h>
#include <sys/socket.h>
#include <arpa/inet.h>

#include <algorithm>
#include <cstring>
#include <deque>
#include <random>
#include <thread>
#include <utility>

#include <opencv2/imgproc.hpp>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/address.h"
#include "common/files.h"
#include "grpc_health_v1/health.grpc.pb.h"

namespace arcface::client {
namespace {

using arcface::v1::EmbedRequest;
using arcface::v1::EmbedResponse;
namespace health = ::grpc::health::v1;

absl::Status ToAbsl(const grpc::Status& s) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

std::string FaceName(const std::string& word, size_t index, const std::string& label) {
  return label.empty() ? absl::StrCat(word, " ", index)
                       : absl::StrCat(word, " ", index, " (", label, ")");
}

// The server names a face by its index within one request ("face 3: undecodable image"); the
// caller knows it by its index in its own list and its label. Rewrites a leading "<word> N" into
// the caller's terms; other messages are kept, prefixed with `rpc`.
absl::Status NameFace(const absl::Status& status, const std::string& rpc,
                      const std::function<std::optional<std::string>(const std::string& word,
                                                                     size_t index)>& rename) {
  if (status.ok()) return status;
  const std::string message(status.message());
  for (const char* word : {"face", "faces", "probes", "query", "reference"}) {
    const std::string prefix = absl::StrCat(word, " ");
    if (!absl::StartsWith(message, prefix)) continue;
    size_t end = prefix.size();
    while (end < message.size() && absl::ascii_isdigit(message[end])) ++end;
    size_t index = 0;
    if (end == prefix.size() || !absl::SimpleAtoi(message.substr(prefix.size(), end - prefix.size()),
                                                  &index)) {
      break;
    }
    if (!rename) break;
    std::optional<std::string> name = rename(word, index);
    if (!name) break;
    return absl::Status(status.code(), absl::StrCat(rpc, ": ", *name, message.substr(end)));
  }
  return absl::Status(status.code(), absl::StrCat(rpc, ": ", message));
}

absl::Status NameFaceInList(const absl::Status& status, const std::string& rpc, size_t offset,
                            const std::vector<FaceInput>& faces) {
  return NameFace(status, rpc, [&](const std::string& word, size_t i) -> std::optional<std::string> {
    if (word != "face" || offset + i >= faces.size()) return std::nullopt;
    return FaceName("face", offset + i, faces[offset + i].label());
  });
}

// As NameFaceInList, for the Probe lists of the gallery calls (`word`: the request's field,
// "faces" or "probes", as the server names them).
absl::Status NameProbeInList(const absl::Status& status, const std::string& rpc,
                             const std::string& word, size_t offset,
                             const std::vector<Probe>& probes) {
  return NameFace(status, rpc, [&](const std::string& w, size_t i) -> std::optional<std::string> {
    if (w != word || offset + i >= probes.size()) return std::nullopt;
    const auto* f = std::get_if<FaceInput>(&probes[offset + i]);
    return FaceName(word, offset + i, f ? f->label() : "");
  });
}

void SetProbe(const Probe& probe, arcface::v1::Probe* out) {
  if (const auto* f = std::get_if<FaceInput>(&probe)) {
    *out->mutable_face() = f->proto();
  } else {
    const auto& v = std::get<std::vector<float>>(probe);
    out->mutable_embedding()->mutable_values()->Assign(v.begin(), v.end());
  }
}

// A Probe's serialized size, with its own tag and length around the face or embedding.
size_t ProbeBytes(const Probe& probe) {
  constexpr size_t kProbeWrapperBytes = 6;
  if (const auto* f = std::get_if<FaceInput>(&probe)) {
    return f->proto().ByteSizeLong() + kProbeWrapperBytes;
  }
  return std::get<std::vector<float>>(probe).size() * sizeof(float) + 2 * kProbeWrapperBytes;
}

// The [begin, end) requests of a gallery call: at most `max_count` probes (0: any number) and
// within `max_bytes` each; one empty request for no probes (the server judges it).
absl::StatusOr<std::vector<std::pair<size_t, size_t>>> SplitProbes(
    const std::vector<Probe>& probes, int max_count, uint64_t max_bytes) {
  if (probes.empty()) return std::vector<std::pair<size_t, size_t>>{{0, 0}};
  std::vector<size_t> sizes;
  sizes.reserve(probes.size());
  for (const Probe& p : probes) sizes.push_back(ProbeBytes(p));
  const int count = max_count > 0 ? max_count
                                  : static_cast<int>(std::min<size_t>(probes.size(), INT32_MAX));
  return SplitIntoRequests(sizes, count, max_bytes);
}

std::vector<Embedding> ToEmbeddings(const EmbedResponse& response) {
  std::vector<Embedding> out(response.embeddings_size());
  for (int i = 0; i < response.embeddings_size(); ++i) {
    const auto& e = response.embeddings(i);
    out[i].values.assign(e.values().begin(), e.values().end());
    out[i].norm = e.norm();
  }
  return out;
}

// The error a stream response carries for its own message (EmbedResponse, DetectResponse).
template <typename Response>
absl::Status CarriedError(const Response& response) {
  if (!response.has_error() || response.error().code() == 0) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(response.error().code()),
                      response.error().message());
}

// "<rpc>: <label>: <message>": a frame's error, named by its label when it has one.
absl::Status NameFrame(const absl::Status& status, const std::string& rpc,
                       const FaceInput& frame) {
  if (status.ok()) return status;
  return absl::Status(status.code(),
                      frame.label().empty()
                          ? absl::StrCat(rpc, ": ", status.message())
                          : absl::StrCat(rpc, ": ", frame.label(), ": ", status.message()));
}

arcface::v1::DetectRequest MakeDetectRequest(const FaceInput& frame, const DetectOptions& options,
                                             const std::string& model) {
  arcface::v1::DetectRequest request;
  request.set_model(model);
  *request.mutable_image() = frame.proto().image();
  request.set_min_score(options.min_score);
  request.set_max_faces(options.max_faces);
  request.set_min_face_size(options.min_face_size);
  request.set_embed(options.embed);
  request.set_normalize(options.normalize);
  request.set_gallery(options.gallery);
  request.set_top_k(options.top_k);
  if (options.threshold) request.set_threshold(*options.threshold);
  return request;
}

// A frame is a whole image: landmarks or a box would be silently ignored by Detect.
absl::Status CheckFrame(const FaceInput& frame) {
  if (frame.proto().landmarks_size() == 0 && !frame.proto().has_box()) return absl::OkStatus();
  return absl::InvalidArgumentError(
      "a frame is a whole image: it must carry neither landmarks nor a box");
}

// The answer to one frame; INTERNAL when it breaks the API's promises (five landmarks per
// face, an embedding per face when one was asked for).
absl::StatusOr<Detection> ToDetection(const arcface::v1::DetectResponse& response,
                                      const DetectOptions& options, const std::string& rpc) {
  const bool embedded = options.embed || !options.gallery.empty();
  Detection out;
  out.image_width = static_cast<int>(response.image_width());
  out.image_height = static_cast<int>(response.image_height());
  out.model_id = response.model_id();
  out.detector_id = response.detector_id();
  if (response.has_threshold()) out.threshold = response.threshold();
  out.faces.reserve(response.faces_size());
  for (int i = 0; i < response.faces_size(); ++i) {
    const arcface::v1::DetectedFace& f = response.faces(i);
    if (f.landmarks_size() != 5) {
      return absl::InternalError(
          absl::StrCat(rpc, ": face ", i, " has ", f.landmarks_size(), " landmarks, not 5"));
    }
    if (embedded && !f.has_embedding()) {
      return absl::InternalError(absl::StrCat(rpc, ": face ", i, " has no embedding"));
    }
    DetectedFace face;
    face.box = {f.box().x_min(), f.box().y_min(), f.box().x_max(), f.box().y_max()};
    face.score = f.score();
    for (int k = 0; k < 5; ++k) face.landmarks[k] = {f.landmarks(k).x(), f.landmarks(k).y()};
    if (f.has_embedding()) {
      face.embedding = Embedding{
          {f.embedding().values().begin(), f.embedding().values().end()}, f.embedding().norm()};
    }
    for (const arcface::v1::Candidate& c : f.identification().candidates()) {
      face.candidates.push_back({c.subject_id(), c.face_id(), c.similarity()});
    }
    out.faces.push_back(std::move(face));
  }
  return out;
}

// IP literals ("a.b.c.d:p" or "[v6]:p") of every address; a name with IPv4 addresses
// contributes only those, so that names resolving to both families still form one target.
absl::StatusOr<std::vector<std::string>> Resolve(const std::vector<std::string>& addresses) {
  std::vector<std::string> out;
  for (const std::string& address : addresses) {
    absl::StatusOr<common::HostPort> parsed =
        common::ParseHostPort(address, common::PortZero::kRefused);
    if (!parsed.ok()) return parsed.status();
    const std::string& host = parsed->host;
    const int port = parsed->port;
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* result = nullptr;
    const int rc = getaddrinfo(host.c_str(), nullptr, &hints, &result);
    if (rc != 0) {
      return absl::UnavailableError(
          absl::StrCat("cannot resolve '", host, "' (", address, "): ", gai_strerror(rc)));
    }
    std::vector<std::string> v4, v6;
    for (addrinfo* a = result; a != nullptr; a = a->ai_next) {
      char text[INET6_ADDRSTRLEN] = {};
      if (a->ai_family == AF_INET) {
        inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(a->ai_addr)->sin_addr, text,
                  sizeof(text));
        v4.push_back(absl::StrCat(text, ":", port));
      } else if (a->ai_family == AF_INET6) {
        inet_ntop(AF_INET6, &reinterpret_cast<sockaddr_in6*>(a->ai_addr)->sin6_addr, text,
                  sizeof(text));
        v6.push_back(absl::StrCat("[", text, "]:", port));
      }
    }
    freeaddrinfo(result);
    std::vector<std::string>& chosen = v4.empty() ? v6 : v4;
    for (std::string& a : chosen) {
      if (std::find(out.begin(), out.end(), a) == out.end()) out.push_back(std::move(a));
    }
  }
  return out;
}

int ToMillis(absl::Duration d) {
  return static_cast<int>(std::min<int64_t>(absl::ToInt64Milliseconds(d), 1 << 30));
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Inputs

absl::StatusOr<TlsOptions> LoadTlsFiles(const std::string& root_ca, const std::string& cert,
                                        const std::string& key) {
  TlsOptions tls;
  if (cert.empty() != key.empty()) {
    return absl::InvalidArgumentError(
        "mutual TLS needs both a client certificate and its key (--tls-cert and --tls-key)");
  }
  for (auto [path, out] : {std::pair{&root_ca, &tls.root_ca_pem},
                           std::pair{&cert, &tls.client_cert_pem},
                           std::pair{&key, &tls.client_key_pem}}) {
    if (path->empty()) continue;
    absl::StatusOr<std::string> bytes = common::ReadFile(*path);
    if (!bytes.ok()) return bytes.status();
    *out = *std::move(bytes);
  }
  return tls;
}

FaceInput FaceInput::FromEncoded(std::string bytes, std::string label) {
  FaceInput f;
  f.face_.mutable_image()->set_encoded(std::move(bytes));
  f.label_ = std::move(label);
  return f;
}

absl::StatusOr<FaceInput> FaceInput::FromFile(const std::string& path) {
  absl::StatusOr<std::string> bytes = common::ReadFile(path);
  if (!bytes.ok()) return bytes.status();
  if (bytes->empty()) return absl::InvalidArgumentError(absl::StrCat(path, ": empty file"));
  return FromEncoded(*std::move(bytes), path);
}

absl::StatusOr<FaceInput> FaceInput::FromMat(const cv::Mat& image, std::string label) {
  const std::string who = label.empty() ? "image" : label;
  if (image.empty()) return absl::InvalidArgumentError(absl::StrCat(who, ": empty cv::Mat"));
  if (image.dims != 2 || image.depth() != CV_8U) {
    return absl::InvalidArgumentError(absl::StrCat(
        who, ": cv::Mat must be 8-bit (CV_8UC1, CV_8UC3 BGR or CV_8UC4 BGRA), got type ",
        image.type()));
  }
  cv::Mat pixels;
  arcface::v1::PixelFormat format;
  switch (image.channels()) {
    case 1:
      pixels = image;
      format = arcface::v1::GRAY8;
      break;
    case 3:
      pixels = image;
      format = arcface::v1::BGR8;  // OpenCV's order; the server converts
      break;
    case 4:
      cv::cvtColor(image, pixels, cv::COLOR_BGRA2BGR);
      format = arcface::v1::BGR8;
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat(who, ": cv::Mat has ", image.channels(), " channels; need 1, 3 or 4"));
  }
  FaceInput f;
  auto* raw = f.face_.mutable_image()->mutable_raw();
  raw->set_width(pixels.cols);
  raw->set_height(pixels.rows);
  raw->set_format(format);
  const size_t row_bytes = size_t(pixels.cols) * pixels.elemSize();
  std::string* data = raw->mutable_data();
  data->resize(row_bytes * pixels.rows);
  for (int y = 0; y < pixels.rows; ++y) {  // tightly packed, whatever the Mat's stride
    std::memcpy(data->data() + row_bytes * y, pixels.ptr(y), row_bytes);
  }
  f.label_ = std::move(label);
  return f;
}

FaceInput& FaceInput::WithLandmarks(const std::array<cv::Point2f, 5>& points) {
  face_.clear_landmarks();
  for (const cv::Point2f& p : points) {
    auto* point = face_.add_landmarks();
    point->set_x(p.x);
    point->set_y(p.y);
  }
  return *this;
}

FaceInput& FaceInput::WithBox(const Box& box) {
  auto* b = face_.mutable_box();
  b->set_x_min(box.x_min);
  b->set_y_min(box.y_min);
  b->set_x_max(box.x_max);
  b->set_y_max(box.y_max);
  return *this;
}

// ---------------------------------------------------------------------------------------------
// Client

absl::StatusOr<std::unique_ptr<Client>> Client::Create(const ClientOptions& options) {
  if (options.addresses.empty()) return absl::InvalidArgumentError("no server address given");
  for (const std::string& a : options.addresses) {
    absl::StatusOr<common::HostPort> parsed = common::ParseHostPort(a, common::PortZero::kRefused);
    if (!parsed.ok()) return parsed.status();
  }
  if (options.timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        absl::StrCat("timeout must be positive, got ", absl::FormatDuration(options.timeout)));
  }
  if (absl::Status s = ValidateRetryPolicy(options.retry); !s.ok()) return s;
  if (options.max_faces_per_request < 0) {
    return absl::InvalidArgumentError("max_faces_per_request must be >= 0");
  }

  std::string target = options.addresses.front();
  if (options.addresses.size() > 1) {
    absl::StatusOr<std::vector<std::string>> ips = Resolve(options.addresses);
    if (!ips.ok()) return ips.status();
    absl::StatusOr<std::string> t = StaticTarget(*ips);
    if (!t.ok()) return t.status();
    target = *t;
  }

  grpc::ChannelArguments args;
  // Every address gets a connection; calls rotate over the ready ones.
  args.SetServiceConfigJSON(R"({"loadBalancingConfig": [{"round_robin": {}}]})");
  // The server's own limit (ModelInfo.max_message_bytes) is the one that should apply.
  args.SetMaxReceiveMessageSize(-1);
  args.SetMaxSendMessageSize(-1);
  // Reconnect about as eagerly as calls are retried, so a restarted server is found soon.
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, ToMillis(options.retry.initial_backoff));
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, ToMillis(options.retry.max_backoff));

  std::shared_ptr<grpc::ChannelCredentials> creds;
  if (options.tls) {
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = options.tls->root_ca_pem;
    ssl.pem_cert_chain = options.tls->client_cert_pem;
    ssl.pem_private_key = options.tls->client_key_pem;
    if (ssl.pem_cert_chain.empty() != ssl.pem_private_key.empty()) {
      return absl::InvalidArgumentError("mutual TLS needs both the client certificate and key");
    }
    creds = grpc::SslCredentials(ssl);
    std::string name = options.tls->server_name;
    if (name.empty() && options.addresses.size() > 1) {
      // An ipv4:/ipv6: target has no host name of its own: check the first one given.
      name = common::ParseHostPort(options.addresses.front(), common::PortZero::kRefused)->host;
    }
    if (!name.empty()) args.SetSslTargetNameOverride(name);
  } else {
    creds = grpc::InsecureChannelCredentials();
  }
  auto channel = grpc::CreateCustomChannel(target, creds, args);
  return std::unique_ptr<Client>(new Client(options, std::move(channel), target));
}

Client::Client(const ClientOptions& options, std::shared_ptr<grpc::Channel> channel,
               std::string target)
    : options_(options),
      target_(std::move(target)),
      channel_(std::move(channel)),
      stub_(arcface::v1::FaceEmbedding::NewStub(channel_)),
      gallery_stub_(arcface::v1::FaceGallery::NewStub(channel_)),
      admin_stub_(arcface::v1::ModelAdmin::NewStub(channel_)),
      rng_state_(std::random_device{}() ^ (uint64_t{std::random_device{}()} << 32)) {}

void Client::SetDeadline(grpc::ClientContext* context) const {
  context->set_deadline(absl::ToChronoTime(absl::Now() + options_.timeout));
}

uint64_t Client::NextRandom() {
  uint64_t x;
  {
    absl::MutexLock lock(&mu_);
    x = (rng_state_ += 0x9E3779B97F4A7C15ull);  // splitmix64
  }
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

absl::Duration Client::NextBackoff(int retry) {
  return BackoffDelay(options_.retry, retry,
                      double(NextRandom() >> 11) / double(uint64_t{1} << 53));
}

grpc::Status Client::WithRetries(
    const std::function<grpc::Status(grpc::ClientContext*)>& attempt) {
  for (int n = 1;; ++n) {
    grpc::ClientContext context;
    SetDeadline(&context);
    grpc::Status status = attempt(&context);
    if (status.ok() || status.error_code() != grpc::StatusCode::UNAVAILABLE ||
        n >= options_.retry.max_attempts) {
      return status;
    }
    const absl::Duration wait = NextBackoff(n);
    if (options_.on_retry) options_.on_retry(ToAbsl(status), n + 1, wait);
    absl::SleepFor(wait);
  }
}

absl::StatusOr<arcface::v1::ListModelsResponse> Client::ListModels() {
  arcface::v1::ListModelsResponse models;
  grpc::Status s = WithRetries([&](grpc::ClientContext* context) {
    return stub_->ListModels(context, arcface::v1::ListModelsRequest(), &models);
  });
  if (!s.ok()) return NameFace(ToAbsl(s), "ListModels", nullptr);
  return models;
}

absl::StatusOr<arcface::v1::ReloadModelsResponse> Client::ReloadModels(
    const std::vector<std::string>& models) {
  arcface::v1::ReloadModelsRequest request;
  for (const std::string& m : models) request.add_models(m);
  arcface::v1::ReloadModelsResponse response;
  grpc::ClientContext context;
  SetDeadline(&context);
  grpc::Status s = admin_stub_->ReloadModels(&context, request, &response);
  if (!s.ok()) return NameFace(ToAbsl(s), "ReloadModels", nullptr);
  return response;
}

absl::StatusOr<arcface::v1::ModelInfo> Client::GetModelInfo() {
  arcface::v1::ModelInfo info;
  arcface::v1::GetModelInfoRequest request;
  request.set_model(options_.model);
  grpc::Status s = WithRetries(
      [&](grpc::ClientContext* context) { return stub_->GetModelInfo(context, request, &info); });
  if (!s.ok()) return NameFace(ToAbsl(s), "GetModelInfo", nullptr);
  absl::MutexLock lock(&mu_);
  limits_ = Limits{static_cast<int>(info.max_faces_per_request()), info.max_message_bytes(),
                   static_cast<int>(info.gallery().max_faces_per_enroll()),
                   static_cast<int>(info.gallery().max_probes_per_identify())};
  return info;
}

absl::StatusOr<Client::Limits> Client::ServerLimits(bool gallery) {
  Limits limits;
  bool known = false;
  {
    absl::MutexLock lock(&mu_);
    if (limits_) limits = *limits_;
    known = limits_.has_value();
  }
  const bool need_server = (options_.max_faces_per_request == 0 && limits.max_faces == 0) ||
                           (options_.max_message_bytes == 0 && limits.max_bytes == 0) ||
                           (gallery && !known);
  if (need_server) {
    absl::StatusOr<arcface::v1::ModelInfo> info = GetModelInfo();
    if (!info.ok()) return info.status();
    absl::MutexLock lock(&mu_);
    limits = *limits_;
  }
  // The smaller of the caller's and the server's limits (0: unknown/none).
  auto smaller = [](auto mine, auto server) {
    if (mine == 0) return server;
    if (server == 0) return mine;
    return std::min(mine, server);
  };
  limits.max_faces = smaller(options_.max_faces_per_request, limits.max_faces);
  limits.max_bytes = smaller(options_.max_message_bytes, limits.max_bytes);
  if (limits.max_faces <= 0) limits.max_faces = 256;
  return limits;
}

absl::StatusOr<std::vector<Embedding>> Client::Embed(const std::vector<FaceInput>& faces,
                                                     bool normalize) {
  std::vector<Embedding> out;
  if (faces.empty()) return out;
  absl::StatusOr<Limits> limits = ServerLimits();
  if (!limits.ok()) return limits.status();
  std::vector<size_t> sizes;
  sizes.reserve(faces.size());
  for (const FaceInput& f : faces) sizes.push_back(f.proto().ByteSizeLong());
  auto chunks = SplitIntoRequests(sizes, limits->max_faces, limits->max_bytes);
  if (!chunks.ok()) return NameFaceInList(chunks.status(), "Embed", 0, faces);
  out.reserve(faces.size());
  for (const auto& [begin, end] : *chunks) {
    EmbedRequest request;
    request.set_normalize(normalize);
    request.set_model(options_.model);
    for (size_t i = begin; i < end; ++i) *request.add_faces() = faces[i].proto();
    EmbedResponse response;
    grpc::Status s = WithRetries([&](grpc::ClientContext* context) {
      response.Clear();
      return stub_->Embed(context, request, &response);
    });
    if (!s.ok()) return NameFaceInList(ToAbsl(s), "Embed", begin, faces);
    if (response.embeddings_size() != int(end - begin)) {
      return absl::InternalError(absl::StrCat("Embed: ", response.embeddings_size(),
                                              " embeddings for ", end - begin, " faces"));
    }
    for (Embedding& e : ToEmbeddings(response)) out.push_back(std::move(e));
  }
  return out;
}

template <typename Item, typename Request, typename Response>
absl::Status Client::RunStream(
    const std::string& rpc,
    const std::function<std::unique_ptr<grpc::ClientReaderWriter<Request, Response>>(
        grpc::ClientContext*)>& open,
    const std::function<std::optional<Item>()>& next,
    const std::function<Request(const Item&)>& request,
    const std::function<void(const Item&, const Response&)>& answer,
    const std::function<void(const Item&, const absl::Status&)>& fail,
    const StreamOptions& stream_options) {
  struct Pending {
    Item item;
    Request request;
  };
  const size_t window = static_cast<size_t>(std::max(1, stream_options.max_in_flight));
  absl::Mutex mu;
  absl::CondVar changed;
  // Taken from `next` and not yet answered, in order; element references stay valid while
  // other elements are added or removed at the ends (std::deque).
  std::deque<Pending> pending;
  bool source_done = false;
  int64_t sequence = 0;

  for (int attempt = 1;; ++attempt) {
    grpc::ClientContext context;
    auto stream = open(&context);
    size_t sent = 0;  // pending[0, sent) went out on this stream
    bool reader_done = false;
    bool timed_out = false;
    absl::Time last_progress = absl::Now();

    // The writer sends what is pending (re-sending after a reconnect), then pulls new items,
    // keeping at most `window` messages unanswered, and half-closes after the last.
    std::thread writer([&] {
      absl::MutexLock lock(&mu);
      while (!reader_done) {
        if (sent < pending.size() && sent < window) {
          Pending& p = pending[sent];
          ++sent;
          mu.Unlock();
          const bool ok = stream->Write(p.request);
          mu.Lock();
          if (!ok) return;  // the stream is broken; Read returns false and Finish says why
          continue;
        }
        if (!source_done && sent == pending.size() && sent < window) {
          mu.Unlock();
          std::optional<Item> item = next();
          mu.Lock();
          if (!item) {
            source_done = true;
            continue;
          }
          Pending p{std::move(*item), Request()};
          p.request = request(p.item);
          p.request.set_request_id(absl::StrCat(sequence++));
          pending.push_back(std::move(p));
          if (sent == 0) last_progress = absl::Now();
          continue;
        }
        if (source_done && sent == pending.size()) {
          mu.Unlock();
          stream->WritesDone();
          mu.Lock();
          return;
        }
        changed.Wait(&mu);  // the window is full: until an answer (or the end)
      }
    });
    // Its own thread, so that it fires even while the writer is blocked in Write: the oldest
    // unanswered message may wait at most `timeout`.
    std::thread watchdog([&] {
      absl::MutexLock lock(&mu);
      while (!reader_done) {
        if (sent > 0 && absl::Now() - last_progress > options_.timeout) {
          timed_out = true;
          context.TryCancel();
          return;
        }
        changed.WaitWithTimeout(&mu, absl::Milliseconds(100));
      }
    });

    bool progressed = false;
    std::string protocol_error;
    Response response;
    while (stream->Read(&response)) {
      Pending p;
      {
        absl::MutexLock lock(&mu);
        if (sent == 0) {
          protocol_error = "an answer to a message that was not sent";
        } else {
          p = std::move(pending.front());
          pending.pop_front();
          --sent;
          last_progress = absl::Now();
          changed.SignalAll();
        }
      }
      if (protocol_error.empty() && response.request_id() != p.request.request_id()) {
        protocol_error = absl::StrCat("answer '", response.request_id(), "' where '",
                                      p.request.request_id(), "' was due");
      }
      if (!protocol_error.empty()) {
        context.TryCancel();
        break;
      }
      progressed = true;
      answer(p.item, response);
    }
    {
      absl::MutexLock lock(&mu);
      reader_done = true;
      changed.SignalAll();
    }
    writer.join();
    watchdog.join();
    absl::Status status = ToAbsl(stream->Finish());
    if (timed_out) {
      status = absl::DeadlineExceededError(
          absl::StrCat(rpc, ": no answer within ", absl::FormatDuration(options_.timeout)));
    } else if (!protocol_error.empty()) {
      status = absl::InternalError(absl::StrCat(rpc, ": ", protocol_error));
    } else if (status.ok()) {
      if (pending.empty() && source_done) return absl::OkStatus();
      status = absl::InternalError(absl::StrCat(rpc, ": the server ended the stream with ",
                                                pending.size(), " messages unanswered"));
    } else {
      status = absl::Status(status.code(), absl::StrCat(rpc, ": ", status.message()));
    }
    // A stream that got answers before it broke starts its retry budget afresh.
    if (progressed) attempt = 1;
    if (status.code() == absl::StatusCode::kUnavailable &&
        attempt < options_.retry.max_attempts) {
      const absl::Duration wait = NextBackoff(attempt);
      if (options_.on_retry) options_.on_retry(status, attempt + 1, wait);
      absl::SleepFor(wait);
      continue;
    }
    for (Pending& p : pending) fail(p.item, status);
    return status;
  }
}

absl::Status Client::EmbedStream(
    const std::function<std::optional<StreamItem>()>& next, bool normalize,
    const std::function<void(int64_t, absl::StatusOr<std::vector<Embedding>>)>& on_result,
    const StreamOptions& stream_options) {
  return RunStream<StreamItem, EmbedRequest, EmbedResponse>(
      "EmbedStream",
      [&](grpc::ClientContext* context) { return stub_->EmbedStream(context); }, next,
      [&](const StreamItem& item) {
        EmbedRequest request;
        request.set_normalize(normalize);
        request.set_model(options_.model);
        for (const FaceInput& f : item.faces) *request.add_faces() = f.proto();
        return request;
      },
      [&](const StreamItem& item, const EmbedResponse& response) {
        if (absl::Status error = CarriedError(response); !error.ok()) {
          on_result(item.tag, NameFaceInList(error, "EmbedStream", 0, item.faces));
        } else if (response.embeddings_size() != int(item.faces.size())) {
          on_result(item.tag, absl::InternalError(absl::StrCat(
                                  "EmbedStream: ", response.embeddings_size(),
                                  " embeddings for ", item.faces.size(), " faces")));
        } else {
          on_result(item.tag, ToEmbeddings(response));
        }
      },
      [&](const StreamItem& item, const absl::Status& status) { on_result(item.tag, status); },
      stream_options);
}

absl::StatusOr<Detection> Client::Detect(const FaceInput& frame, const DetectOptions& options) {
  if (absl::Status s = CheckFrame(frame); !s.ok()) return NameFrame(s, "Detect", frame);
  const arcface::v1::DetectRequest request = MakeDetectRequest(frame, options, options_.model);
  arcface::v1::DetectResponse response;
  grpc::Status s = WithRetries([&](grpc::ClientContext* context) {
    response.Clear();
    return stub_->Detect(context, request, &response);
  });
  if (!s.ok()) return NameFrame(ToAbsl(s), "Detect", frame);
  return ToDetection(response, options, "Detect");
}

absl::Status Client::DetectStream(
    const std::function<std::optional<FrameItem>()>& next, const DetectOptions& options,
    const std::function<void(int64_t, absl::StatusOr<Detection>)>& on_result,
    const StreamOptions& stream_options) {
  using arcface::v1::DetectRequest;
  using arcface::v1::DetectResponse;
  return RunStream<FrameItem, DetectRequest, DetectResponse>(
      "DetectStream", [&](grpc::ClientContext* context) { return stub_->DetectStream(context); },
      next,
      [&](const FrameItem& item) { return MakeDetectRequest(item.frame, options, options_.model); },
      [&](const FrameItem& item, const DetectResponse& response) {
        // A frame with landmarks or a box went out as its image alone; it fails all the same.
        absl::Status error = CheckFrame(item.frame);
        if (error.ok()) error = CarriedError(response);
        if (!error.ok()) {
          on_result(item.tag, NameFrame(error, "DetectStream", item.frame));
        } else {
          on_result(item.tag, ToDetection(response, options, "DetectStream"));
        }
      },
      [&](const FrameItem& item, const absl::Status& status) { on_result(item.tag, status); },
      stream_options);
}

absl::StatusOr<CompareResult> Client::Compare(const std::vector<Probe>& queries,
                                              const std::vector<Probe>& references,
                                              std::optional<float> threshold) {
  absl::StatusOr<Limits> limits = ServerLimits();
  if (!limits.ok()) return limits.status();
  // Face probes, in the server's order (queries first), with their labels.
  std::vector<FaceInput> faces;
  uint64_t face_bytes = 0;
  for (const auto* list : {&queries, &references}) {
    for (const Probe& p : *list) {
      if (const auto* f = std::get_if<FaceInput>(&p)) {
        faces.push_back(*f);
        face_bytes += f->proto().ByteSizeLong() + kPerFaceOverheadBytes;
      }
    }
  }
  const bool embed_first =
      faces.size() > size_t(limits->max_faces) ||
      (limits->max_bytes > 0 && face_bytes + kRequestOverheadBytes > limits->max_bytes);
  std::vector<Embedding> embedded;
  if (embed_first) {
    absl::StatusOr<std::vector<Embedding>> e = Embed(faces);
    if (!e.ok()) return e.status();
    embedded = std::move(*e);
  }

  arcface::v1::CompareRequest request;
  size_t face_index = 0;
  for (const bool is_query : {true, false}) {
    for (const Probe& p : is_query ? queries : references) {
      auto* probe = is_query ? request.add_queries() : request.add_references();
      const bool is_face = std::holds_alternative<FaceInput>(p);
      if (is_face && embed_first) {
        const auto& v = embedded[face_index].values;
        probe->mutable_embedding()->mutable_values()->Assign(v.begin(), v.end());
      } else {
        SetProbe(p, probe);
      }
      if (is_face) ++face_index;
    }
  }
  if (threshold) request.set_threshold(*threshold);
  request.set_model(options_.model);

  arcface::v1::CompareResponse response;
  grpc::Status s = WithRetries([&](grpc::ClientContext* context) {
    response.Clear();
    return stub_->Compare(context, request, &response);
  });
  if (!s.ok()) {
    return NameFace(ToAbsl(s), "Compare",
                    [&](const std::string& word, size_t i) -> std::optional<std::string> {
                      const auto& list = word == "query" ? queries : references;
                      if ((word != "query" && word != "reference") || i >= list.size()) {
                        return std::nullopt;
                      }
                      const auto* f = std::get_if<FaceInput>(&list[i]);
                      return FaceName(word, i, f ? f->label() : "");
                    });
  }
  CompareResult result;
  result.rows = static_cast<int>(response.rows());
  result.cols = static_cast<int>(response.cols());
  if (result.rows != int(queries.size()) || result.cols != int(references.size()) ||
      response.similarities_size() != result.rows * result.cols) {
    return absl::InternalError(absl::StrCat("Compare: a ", response.rows(), "x", response.cols(),
                                            " answer for ", queries.size(), "x",
                                            references.size()));
  }
  result.similarities.assign(response.similarities().begin(), response.similarities().end());
  result.matches.assign(response.matches().begin(), response.matches().end());
  result.model_id = response.model_id();
  return result;
}

// ---------------------------------------------------------------------------------------------
// Gallery

absl::StatusOr<arcface::v1::EnrollResponse> Client::Enroll(const std::string& gallery,
                                                           const std::string& subject_id,
                                                           const std::vector<Probe>& faces,
                                                           const EnrollOptions& options) {
  absl::StatusOr<Limits> limits = ServerLimits(/*gallery=*/true);
  if (!limits.ok()) return limits.status();
  auto chunks = SplitProbes(faces, limits->max_enroll, limits->max_bytes);
  if (!chunks.ok()) return NameProbeInList(chunks.status(), "Enroll", "faces", 0, faces);
  // A key on every request, so that a retry after UNAVAILABLE never adds a face twice.
  const std::string base = !options.request_id.empty()
                               ? options.request_id
                               : absl::StrCat(absl::Hex(NextRandom(), absl::kZeroPad16),
                                              absl::Hex(NextRandom(), absl::kZeroPad16));
  arcface::v1::EnrollResponse out;
  for (size_t n = 0; n < chunks->size(); ++n) {
    const auto [begin, end] = (*chunks)[n];
    arcface::v1::EnrollRequest request;
    request.set_gallery(gallery);
    request.set_subject_id(subject_id);
    request.mutable_labels()->insert(options.labels.begin(), options.labels.end());
    request.set_request_id(chunks->size() == 1 ? base : absl::StrCat(base, "#", n));
    request.set_model_id(options.model_id);
    request.set_model(options.model);
    for (size_t i = begin; i < end; ++i) SetProbe(faces[i], request.add_faces());
    arcface::v1::EnrollResponse response;
    grpc::Status s = WithRetries([&](grpc::ClientContext* context) {
      response.Clear();
      return gallery_stub_->Enroll(context, request, &response);
    });
    if (!s.ok()) return NameProbeInList(ToAbsl(s), "Enroll", "faces", begin, faces);
    if (response.face_ids_size() != int(end - begin)) {
      return absl::InternalError(absl::StrCat("Enroll: ", response.face_ids_size(),
                                              " face ids for ", end - begin, " faces"));
    }
    out.set_subject_id(response.subject_id());
    out.mutable_face_ids()->MergeFrom(response.face_ids());
    out.set_gallery_version(response.gallery_version());
  }
  return out;
}

absl::StatusOr<arcface::v1::IdentifyResponse> Client::Identify(const std::string& gallery,
                                                               const std::vector<Probe>& probes,
                                                               uint32_t top_k,
                                                               std::optional<float> threshold) {
  arcface::v1::IdentifyResponse out;
  if (probes.empty()) return out;
  absl::StatusOr<Limits> limits = ServerLimits(/*gallery=*/true);
  if (!limits.ok()) return limits.status();
  // Face probes also count against the server's max_faces_per_request.
  int max_count = limits->max_probes;
  if (std::any_of(probes.begin(), probes.end(),
                  [](const Probe& p) { return std::holds_alternative<FaceInput>(p); })) {
    max_count = max_count > 0 ? std::min(max_count, limits->max_faces) : limits->max_faces;
  }
  auto chunks = SplitProbes(probes, max_count, limits->max_bytes);
  if (!chunks.ok()) return NameProbeInList(chunks.status(), "Identify", "probes", 0, probes);
  for (const auto& [begin, end] : *chunks) {
    arcface::v1::IdentifyRequest request;
    request.set_gallery(gallery);
    request.set_top_k(top_k);
    if (threshold) request.set_threshold(*threshold);
    for (size_t i = begin; i < end; ++i) SetProbe(probes[i], request.add_probes());
    arcface::v1::IdentifyResponse response;
    grpc::Status s = WithRetries([&](grpc::ClientContext* context) {
      response.Clear();
      return gallery_stub_->Identify(context, request, &response);
    });
    if (!s.ok()) return NameProbeInList(ToAbsl(s), "Identify", "probes", begin, probes);
    if (response.results_size() != int(end - begin)) {
      return absl::InternalError(absl::StrCat("Identify: ", response.results_size(),
                                              " results for ", end - begin, " probes"));
    }
    out.mutable_results()->MergeFrom(response.results());
    out.set_model_id(response.model_id());
    out.set_gallery_version(response.gallery_version());
    if (response.has_threshold()) out.set_threshold(response.threshold());
  }
  return out;
}

absl::StatusOr<arcface::v1::ForgetResponse> Client::Forget(
    const std::string& gallery, const std::string& subject_id,
    const std::vector<std::string>& face_ids) {
  arcface::v1::ForgetRequest request;
  request.set_gallery(gallery);
  request.set_subject_id(subject_id);
  for (const std::string& id : face_ids) request.add_face_ids(id);
  arcface::v1::ForgetResponse response;
  grpc::ClientContext context;
  SetDeadline(&context);
  grpc::Status s = gallery_stub_->Forget(&context, request, &response);
  if (!s.ok()) return NameFace(ToAbsl(s), "Forget", nullptr);
  return response;
}

absl::StatusOr<arcface::v1::ListSubjectsResponse> Client::ListSubjects(
    const std::string& gallery, uint32_t page_size, const std::string& page_token) {
  arcface::v1::ListSubjectsRequest request;
  request.set_gallery(gallery);
  request.set_page_size(page_size);
  request.set_page_token(page_token);
  arcface::v1::ListSubjectsResponse response;
  grpc::Status s = WithRetries([&](grpc::ClientContext* context) {
    response.Clear();
    return gallery_stub_->ListSubjects(context, request, &response);
  });
  if (!s.ok()) return NameFace(ToAbsl(s), "ListSubjects", nullptr);
  return response;
}

absl::StatusOr<arcface::v1::GalleryInfo> Client::GetGalleryInfo(const std::string& gallery) {
  arcface::v1::GetGalleryInfoRequest request;
  request.set_gallery(gallery);
  arcface::v1::GalleryInfo info;
  grpc::Status s = WithRetries([&](grpc::ClientContext* context) {
    info.Clear();
    return gallery_stub_->GetGalleryInfo(context, request, &info);
  });
  if (!s.ok()) return NameFace(ToAbsl(s), "GetGalleryInfo", nullptr);
  return info;
}

absl::StatusOr<ServingStatus> Client::CheckHealth() {
  auto stub = health::Health::NewStub(channel_);
  grpc::ClientContext context;
  SetDeadline(&context);
  health::HealthCheckRequest request;
  health::HealthCheckResponse response;
  grpc::Status s = stub->Check(&context, request, &response);
  if (!s.ok()) return NameFace(ToAbsl(s), "Health.Check", nullptr);
  switch (response.status()) {
    case health::HealthCheckResponse::SERVING:
      return ServingStatus::kServing;
    case health::HealthCheckResponse::NOT_SERVING:
      return ServingStatus::kNotServing;
    default:
      return ServingStatus::kUnknown;
  }
}

absl::Status Client::WaitForHealthy(absl::Duration timeout) {
  auto stub = health::Health::NewStub(channel_);
  const absl::Time deadline = absl::Now() + timeout;
  std::string last = "no answer yet";
  bool answered = false;  // the last check got an answer (that was not SERVING)
  while (true) {
    const absl::Duration left = deadline - absl::Now();
    if (left <= absl::ZeroDuration()) {
      const std::string why = absl::StrCat(" within ", absl::FormatDuration(timeout),
                                           " (last: ", last, ")");
      if (!answered) return absl::UnavailableError(absl::StrCat("no answer from the server", why));
      return absl::DeadlineExceededError(absl::StrCat("the server was not SERVING", why));
    }
    grpc::ClientContext context;
    // Waits for a connection rather than failing at once while the server is not up.
    context.set_wait_for_ready(true);
    context.set_deadline(absl::ToChronoTime(absl::Now() + std::min(left, absl::Seconds(2))));
    health::HealthCheckResponse response;
    grpc::Status s = stub->Check(&context, health::HealthCheckRequest(), &response);
    if (s.ok() && response.status() == health::HealthCheckResponse::SERVING) {
      return absl::OkStatus();
    }
    answered = s.ok();
    last = s.ok() ? health::HealthCheckResponse::ServingStatus_Name(response.status())
                  : absl::StrCat(absl::StatusCodeToString(ToAbsl(s).code()), ": ",
                                 s.error_message());
    absl::SleepFor(std::min(absl::Milliseconds(100), deadline - absl::Now()));
  }
}

}  // namespace arcface::client
