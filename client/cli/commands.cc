#include "client/cli/commands.h"

#include <atomic>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <iostream>

#include <google/protobuf/util/json_util.h>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "client/cli/plot.h"
#include "client/cli/progress.h"

namespace arcface::cli {
namespace {

using client::Client;
using client::Embedding;
using client::FaceInput;

std::string CodeName(const absl::Status& s) { return absl::StatusCodeToString(s.code()); }

}  // namespace

absl::Status EmbedFiles(Client& client, const std::vector<std::string>& files,
                        const FaceOptions& face_options, bool normalize, ProgressBar& progress,
                        std::vector<FileOutcome>* outcomes) {
  outcomes->assign(files.size(), FileOutcome{});
  for (size_t i = 0; i < files.size(); ++i) (*outcomes)[i].file = files[i];
  std::atomic<int64_t> done{0};
  auto finished = [&](size_t i) {
    const FileOutcome& o = (*outcomes)[i];
    if (!o.embedding.ok()) {
      progress.Print(absl::StrCat("error: ", o.file, ": ", CodeName(o.embedding.status()), ": ",
                                  o.embedding.status().message()));
    }
    progress.Update(++done);
  };
  size_t next_index = 0;  // only the writer thread touches it
  auto next = [&]() -> std::optional<client::StreamItem> {
    while (next_index < files.size()) {
      const size_t i = next_index++;
      FileOutcome& o = (*outcomes)[i];
      absl::StatusOr<FaceInput> face = LoadFace(files[i], face_options);
      if (!face.ok()) {
        o.embedding = face.status();
        finished(i);
        continue;
      }
      return client::StreamItem{{std::move(*face)}, static_cast<int64_t>(i)};
    }
    return std::nullopt;
  };
  auto on_result = [&](int64_t tag, absl::StatusOr<std::vector<Embedding>> result) {
    FileOutcome& o = (*outcomes)[tag];
    if (result.ok()) {
      o.embedding = std::move(result->front());
    } else {
      o.embedding = result.status();
    }
    finished(tag);
  };
  absl::Status status = client.EmbedStream(next, normalize, on_result);
  progress.Finish();
  return status;
}

namespace {

// A thumbnail's source: the whole image as the user passed it.
cv::Mat ReadThumbnailSource(const std::string& file) {
  try {
    return cv::imread(file, cv::IMREAD_COLOR | cv::IMREAD_IGNORE_ORIENTATION);
  } catch (const cv::Exception&) {
    return cv::Mat();  // drawn as a placeholder; the embedding came from the server anyway
  }
}

}  // namespace

void PrintJson(const nlohmann::json& doc) {
  // Invalid UTF-8 in a file name is replaced rather than failing the whole output.
  std::cout << doc.dump(1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
}

void NoteDemo(const arcface::v1::ModelInfo& info) {
  if (info.demo_weights()) {
    std::fprintf(stderr,
                 "note: the server runs DEMO (random) weights: embeddings are not meaningful\n");
  }
}

absl::StatusOr<std::unique_ptr<client::Client>> MakeClient(const CommonOptions& o, int attempts) {
  client::ClientOptions options;
  absl::StatusOr<std::vector<std::string>> addresses = client::ParseAddressList(o.server);
  if (!addresses.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("--server: ", addresses.status().message()));
  }
  options.addresses = *addresses;
  if (!(o.timeout_s > 0)) return absl::InvalidArgumentError("--timeout must be positive");
  options.timeout = absl::Seconds(o.timeout_s);
  options.retry.max_attempts = attempts > 0 ? attempts : o.attempts;
  options.model = o.model;
  if (o.tls || !o.tls_ca.empty() || !o.tls_cert.empty() || !o.tls_key.empty()) {
    absl::StatusOr<client::TlsOptions> tls = client::LoadTlsFiles(o.tls_ca, o.tls_cert, o.tls_key);
    if (!tls.ok()) return absl::InvalidArgumentError(absl::StrCat("--tls-*: ", tls.status().message()));
    tls->server_name = o.tls_server_name;
    options.tls = *tls;
  } else if (!o.tls_server_name.empty()) {
    return absl::InvalidArgumentError("--tls-server-name needs TLS (--tls or --tls-ca)");
  }
  const int max_attempts = options.retry.max_attempts;
  options.on_retry = [max_attempts](const absl::Status& error, int attempt, absl::Duration wait) {
    std::fprintf(stderr, "arcface-client: %s: %s; retrying in %.1f s (attempt %d of %d)\n",
                 CodeName(error).c_str(), std::string(error.message()).c_str(),
                 absl::ToDoubleSeconds(wait), attempt, max_attempts);
  };
  return Client::Create(options);
}

absl::StatusOr<FaceInput> LoadFace(const std::string& file, const FaceOptions& options) {
  absl::StatusOr<FaceInput> face = FaceInput::FromFile(file);
  if (!face.ok()) return face;
  if (options.landmarks) {
    if (auto points = options.landmarks->Find(file)) face->WithLandmarks(*points);
  }
  if (options.box) {
    const auto& b = *options.box;
    face->WithBox({b[0], b[1], b[2], b[3]});
  }
  return face;
}

int Fail(const std::string& what, const absl::Status& status, bool usage) {
  std::fprintf(stderr, "arcface-client: %s: %s: %s\n", what.c_str(), CodeName(status).c_str(),
               std::string(status.message()).c_str());
  if (status.code() == absl::StatusCode::kUnavailable) {
    std::fprintf(stderr, "arcface-client: server unreachable (--server, ARCFACE_SERVER)\n");
    return kExitUnreachable;
  }
  if (usage && status.code() == absl::StatusCode::kInvalidArgument) return kExitUsage;
  return kExitSomeFailed;
}

void PrintProtoJson(const google::protobuf::Message& message) {
  std::string text;
  google::protobuf::util::JsonPrintOptions print;
  print.add_whitespace = true;
  print.always_print_primitive_fields = true;
  print.preserve_proto_field_names = true;
  (void)google::protobuf::util::MessageToJsonString(message, &text, print);
  std::cout << text;
}

int RunInfo(const CommonOptions& common, bool json) {
  auto client = MakeClient(common);
  if (!client.ok()) return Fail("client", client.status(), true);
  absl::StatusOr<arcface::v1::ModelInfo> info = (*client)->GetModelInfo();
  if (!info.ok()) return Fail("info", info.status());
  if (json) {
    PrintProtoJson(*info);
    return kExitOk;
  }
  const auto& b = info->batching();
  std::cout << "server          " << (*client)->target() << "\n"
            << "model_id        " << info->model_id() << "\n"
            << "arch            " << info->arch() << (info->demo_weights() ? "  (DEMO weights)" : "")
            << "\n"
            << "embedding_dim   " << info->embedding_dim() << "\n"
            << "input_size      " << info->input_size() << "\n"
            << "weights_sha256  " << info->weights_sha256() << "\n"
            << "device          " << info->device() << " (" << info->precision() << ")\n"
            << "batching        max batch " << b.max_batch_size() << ", max delay "
            << b.max_queue_delay_us() << " us, max queue " << b.max_queue_size() << ", "
            << b.max_batches_in_flight() << " in flight\n"
            << "limits          " << info->max_faces_per_request() << " faces/request, "
            << info->max_message_bytes() << " bytes/message\n"
            << "server_version  " << info->server_version() << "\n";
  const auto& d = info->detector();
  if (d.enabled()) {
    std::cout << absl::StrFormat(
        "detector        %s (%s + %s, %dpx input, min score %.2f, up to %d faces/frame)\n",
        d.detector_id(), d.detector(), d.landmarks(), d.input_size(), d.default_min_score(),
        d.max_faces_per_frame());
  } else {
    std::cout << "detector        none (Detect is off: the server runs with --detector none)\n";
  }
  return kExitOk;
}

int RunModels(const CommonOptions& common, bool json) {
  auto client = MakeClient(common);
  if (!client.ok()) return Fail("client", client.status(), true);
  absl::StatusOr<arcface::v1::ListModelsResponse> models = (*client)->ListModels();
  if (!models.ok()) return Fail("models", models.status());
  if (json) {
    PrintProtoJson(*models);
    return kExitOk;
  }
  std::cout << absl::StrFormat("%-16s %-8s %-9s %-10s %4s %5s  %s\n", "NAME", "FAMILY", "METRIC",
                               "THRESHOLD", "DIM", "CROP", "MODEL_ID");
  for (const arcface::v1::ModelInfo& m : models->models()) {
    std::cout << absl::StrFormat("%-16s %-8s %-9s %-10.2f %4d %5d  %s%s%s\n", m.name(), m.family(),
                                 m.metric(), m.default_threshold(), m.embedding_dim(),
                                 m.input_size(), m.model_id(), m.is_default() ? "  (default)" : "",
                                 m.demo_weights() ? "  (DEMO weights)" : "");
  }
  return kExitOk;
}

int RunHealth(const CommonOptions& common, double wait_s) {
  auto client = MakeClient(common);
  if (!client.ok()) return Fail("client", client.status(), true);
  if (wait_s > 0) {
    absl::Status s = (*client)->WaitForHealthy(absl::Seconds(wait_s));
    if (s.ok()) {
      std::cout << "SERVING\n";
      return kExitOk;
    }
    return Fail("health", s);  // 3 when the server never answered
  }
  absl::StatusOr<client::ServingStatus> status = (*client)->CheckHealth();
  if (!status.ok()) return Fail("health", status.status());
  switch (*status) {
    case client::ServingStatus::kServing:
      std::cout << "SERVING\n";
      return kExitOk;
    case client::ServingStatus::kNotServing:
      std::cout << "NOT_SERVING\n";
      return kExitSomeFailed;
    default:
      std::cout << "UNKNOWN\n";
      return kExitSomeFailed;
  }
}

int RunEmbed(const CommonOptions& common, const EmbedOptions& options) {
  std::vector<std::string> missing;
  const std::vector<std::string> files = CollectInputFiles(options.inputs, &missing);
  for (const std::string& m : missing) {
    std::fprintf(stderr, "error: %s: NOT_FOUND: no such file or directory\n", m.c_str());
  }
  auto client = MakeClient(common);
  if (!client.ok()) return Fail("client", client.status(), true);
  absl::StatusOr<arcface::v1::ModelInfo> info = (*client)->GetModelInfo();
  if (!info.ok()) return Fail("embed", info.status());
  NoteDemo(*info);

  const absl::Time start = absl::Now();
  ProgressBar progress(static_cast<int64_t>(files.size()), ProgressWanted());
  std::vector<FileOutcome> outcomes;
  absl::Status stream =
      EmbedFiles(**client, files, options.face, options.normalize, progress, &outcomes);

  std::vector<EmbeddingRow> rows;
  std::vector<FailedInput> failed;
  for (const std::string& m : missing) failed.push_back({m, "NOT_FOUND", "no such file or directory"});
  for (FileOutcome& o : outcomes) {
    if (o.embedding.ok()) {
      rows.push_back({o.file, o.embedding->norm, std::move(o.embedding->values)});
    } else {
      failed.push_back({o.file, CodeName(o.embedding.status()),
                        std::string(o.embedding.status().message())});
    }
  }
  if (!options.out.empty()) {
    absl::Status s = WriteEmbeddings(options.out, rows, failed, info->model_id(), options.normalize);
    if (!s.ok()) return Fail("--out", s);
  } else {
    for (const EmbeddingRow& r : rows) {
      std::cout << r.file << "\t" << EmbeddingSummary(r.norm, r.values) << "\n";
    }
  }
  const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
  std::fprintf(stderr, "embedded %zu of %zu files (%zu failed) in %.1f s%s%s\n", rows.size(),
               files.size() + missing.size(), failed.size(), seconds,
               options.out.empty() ? "" : " -> ", options.out.c_str());
  if (!stream.ok()) return Fail("embed", stream);
  return failed.empty() ? kExitOk : kExitSomeFailed;
}

int RunCompare(const CommonOptions& common, const CompareOptions& options) {
  auto client = MakeClient(common);
  if (!client.ok()) return Fail("client", client.status(), true);

  absl::StatusOr<arcface::v1::ModelInfo> info = (*client)->GetModelInfo();
  if (!info.ok()) return Fail("compare", info.status());
  NoteDemo(*info);
  const float threshold = options.threshold.value_or(info->default_threshold());
  if (!options.matrix) {
    std::vector<client::Probe> probes;
    for (const std::string& f : options.files) {
      absl::StatusOr<FaceInput> face = FaceInput::FromFile(f);
      if (!face.ok()) return Fail(f, face.status());
      probes.emplace_back(std::move(*face));
    }
    absl::StatusOr<client::CompareResult> r =
        (*client)->Compare({probes[0]}, {probes[1]}, threshold);
    if (!r.ok()) return Fail("compare", r.status());
    const float cosine = r->at(0, 0);
    const bool same = !r->matches.empty() && r->matches[0];
    std::cout << absl::StrFormat(
        "%s\t%s\tcosine=%.4f\t%s (threshold %s%s)\n", options.files[0], options.files[1], cosine,
        same ? "same" : "different", FormatThreshold(threshold),
        info->demo_weights() ? absl::StrCat("; ", kRandomWeightsVerdict) : "");
    return kExitOk;
  }

  ProgressBar progress(static_cast<int64_t>(options.files.size()), ProgressWanted());
  std::vector<FileOutcome> outcomes;
  absl::Status stream = EmbedFiles(**client, options.files, FaceOptions{}, /*normalize=*/false,
                                   progress, &outcomes);
  std::vector<std::string> names;
  std::vector<client::Probe> vectors;
  for (FileOutcome& o : outcomes) {
    if (!o.embedding.ok()) continue;
    names.push_back(o.file);
    vectors.emplace_back(std::move(o.embedding->values));
  }
  if (!stream.ok()) return Fail("compare", stream);
  const bool some_failed = names.size() != options.files.size();
  if (names.empty()) return kExitSomeFailed;
  // The server computes the matrix from the embeddings as given.
  absl::StatusOr<client::CompareResult> r = (*client)->Compare(vectors, vectors, threshold);
  if (!r.ok()) return Fail("compare", r.status());

  const int n = static_cast<int>(names.size());
  for (int i = 0; i < n; ++i) std::cout << absl::StrFormat("[%d] %s\n", i + 1, names[i]);
  std::cout << "      ";
  for (int j = 0; j < n; ++j) std::cout << absl::StrFormat("%7s", absl::StrCat("[", j + 1, "]"));
  std::cout << "\n";
  for (int i = 0; i < n; ++i) {
    std::cout << absl::StrFormat("%6s", absl::StrCat("[", i + 1, "]"));
    for (int j = 0; j < n; ++j) std::cout << absl::StrFormat("%7.3f", r->at(i, j));
    std::cout << "\n";
  }
  if (info->demo_weights()) std::cout << "(" << kRandomWeightsVerdict << ")\n";
  if (!options.plot.empty()) {
    std::vector<cv::Mat> thumbnails;
    for (const std::string& f : names) thumbnails.push_back(ReadThumbnailSource(f));
    cv::Mat picture = DrawSimilarityMatrix(
        thumbnails, r->similarities, threshold,
        absl::StrCat("cosine similarity, ", info->model_id()),
        info->demo_weights() ? absl::StrCat(kRandomWeightsVerdict, " (the server's demo weights)")
                             : "");
    absl::Status s = WritePng(options.plot, picture);
    if (!s.ok()) return Fail("--plot", s);
    std::fprintf(stderr, "wrote %s (%dx%d)\n", options.plot.c_str(), picture.cols, picture.rows);
  }
  return some_failed ? kExitSomeFailed : kExitOk;
}

}  // namespace arcface::cli
