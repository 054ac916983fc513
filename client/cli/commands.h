// The commands of `arcface-client` (main.cc parses the flags and calls one of these).
//
// Contract
// - Each Run* function returns the process exit status: kExitOk, kExitSomeFailed (some inputs
//   or requests failed; the rest were done and reported), kExitUsage (bad flags or arguments,
//   found before any call), kExitUnreachable (the server could not be reached: UNAVAILABLE
//   after the retries).
// - Results go to stdout (or --out files); errors, notes and progress to stderr. Progress is
//   drawn only when stdout and stderr are both terminals.
// - Blocking; each command owns its Client.
#ifndef ARCFACE_CLIENT_CLI_COMMANDS_H_
#define ARCFACE_CLIENT_CLI_COMMANDS_H_

#include <cstdint>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "client/cli/output.h"
#include "client/cli/progress.h"
#include "client/cpp/client.h"

namespace arcface::cli {

enum ExitCode { kExitOk = 0, kExitSomeFailed = 1, kExitUsage = 2, kExitUnreachable = 3 };

struct CommonOptions {
  std::string server = "localhost:50051";
  double timeout_s = 30;
  int attempts = 5;
  bool tls = false;
  std::string tls_ca, tls_cert, tls_key, tls_server_name;
  std::string model;  // the served model to use (--model); empty: the server's default
};

// How each file's face is found: its landmarks (from the landmarks file), else the box, else
// the whole image.
struct FaceOptions {
  std::optional<LandmarksFile> landmarks;
  std::optional<std::array<float, 4>> box;
};

struct EmbedOptions {
  std::vector<std::string> inputs;
  FaceOptions face;
  bool normalize = false;
  std::string out;  // empty: a summary line per file on stdout
};

struct CompareOptions {
  std::vector<std::string> files;
  bool matrix = false;
  // Cosine at or above which two faces are the same person; unset: the served model's
  // default_threshold (ArcFace 0.4, dlib 0.9144).
  std::optional<float> threshold;
  std::string plot;
};

// `detect`: the server's detector (Detect) on one image file.
struct DetectOptions {
  std::string image;
  std::string plot;  // PNG: the image with boxes, landmarks and labels
  bool json = false;
  client::DetectOptions request;  // embed, gallery, thresholds
};

struct BenchOptions {
  std::vector<int> concurrency = {1, 8, 32, 64};
  int faces_per_request = 1;
  double duration_s = 10;
  std::string json;
  std::string image;  // empty: a synthetic 112x112 crop sent raw
};

// The `gallery` commands' options (service FaceGallery).
struct GalleryOptions {
  std::string gallery;  // empty: the server's "default"
  bool json = false;    // one JSON document on stdout instead of a table
};

struct GalleryEnrollOptions {
  std::string subject;
  std::vector<std::string> inputs;  // files and directories, as `embed` takes them
  FaceOptions face;
  std::map<std::string, std::string> labels;
};

struct GalleryIdentifyOptions {
  std::vector<std::string> inputs;
  FaceOptions face;
  uint32_t top_k = 1;
  std::optional<float> threshold;  // unset: the server's, the gallery's model's default
};

// `eval`: verification and identification figures on a folder of identity subfolders
// (eval_data.h has the layout and pairs.txt; eval_metrics.h the figures).
struct EvalOptions {
  std::string root;
  std::string pairs;    // LFW-style pairs.txt; empty: every pair of images
  bool detect = false;  // --faces detect: the largest face the server's detector finds
  double pad = 0;       // with detect: a black border this fraction of the size (PadImage)
  std::string gallery;  // also measure top-1 through FaceGallery in this scratch gallery
  std::string roc;      // PNG of the ROC
  bool json = false;
};

// `reload`: ModelAdmin.ReloadModels on a server started with --admin-rpc.
struct ReloadOptions {
  std::vector<std::string> models;  // served names; empty: every model
  bool json = false;                // the ReloadModelsResponse as JSON instead of a table
};

// Said with every verdict (same/different, who a face is) when the server runs random (demo)
// weights: such a verdict tells nothing about identity.
inline constexpr char kRandomWeightsVerdict[] = "random weights: not an identity verdict";

// The client for the common options; `attempts` overrides CommonOptions::attempts when > 0.
absl::StatusOr<std::unique_ptr<client::Client>> MakeClient(const CommonOptions& options,
                                                           int attempts = 0);
// Prints "arcface-client: <what>: <status>" and returns its exit code (3 for UNAVAILABLE, 2 for
// INVALID_ARGUMENT from the client's own checks when `usage` is set, else 1).
int Fail(const std::string& what, const absl::Status& status, bool usage = false);

int RunInfo(const CommonOptions& common, bool json);
// `models`: the served models (ListModels), the default first.
int RunModels(const CommonOptions& common, bool json);
int RunHealth(const CommonOptions& common, double wait_s);
int RunEmbed(const CommonOptions& common, const EmbedOptions& options);
int RunCompare(const CommonOptions& common, const CompareOptions& options);
int RunDetect(const CommonOptions& common, const DetectOptions& options);
int RunBench(const CommonOptions& common, const BenchOptions& options);
int RunEval(const CommonOptions& common, const EvalOptions& options);
// reload.cc: one line per model (result, seconds, previous -> new model_id, error); exit 1 when
// a model FAILED (it keeps serving its previous weights), Fail's codes when the call fails.
int RunReload(const CommonOptions& common, const ReloadOptions& options);

// One JSON document on stdout (invalid UTF-8 in a file name replaced, not fatal).
void PrintJson(const nlohmann::json& doc);
// A server's answer as indented JSON with every field, named as in the proto (info, models).
void PrintProtoJson(const google::protobuf::Message& message);

// A note on stderr when the server runs the demo (random) weights.
void NoteDemo(const arcface::v1::ModelInfo& info);

// The outcome of embedding one file through EmbedStream.
struct FileOutcome {
  std::string file;
  absl::StatusOr<client::Embedding> embedding = absl::UnknownError("not embedded");
};

// Embeds each file as one EmbedStream message (so one bad file fails alone), in order,
// printing each failure as it happens. Returns the stream's own status.
absl::Status EmbedFiles(client::Client& client, const std::vector<std::string>& files,
                        const FaceOptions& face_options, bool normalize, ProgressBar& progress,
                        std::vector<FileOutcome>* outcomes);

// The face of `file` as FaceOptions say (its landmarks, else the box, else the whole image).
absl::StatusOr<client::FaceInput> LoadFace(const std::string& file, const FaceOptions& options);

// gallery.cc. Enroll and identify send the files in requests of the server's
// max_faces_per_enroll / max_probes_per_identify with a progress bar; a file that cannot be
// read or decoded is reported and left out, and the rest go on (exit 1).
int RunGalleryEnroll(const CommonOptions& common, const GalleryOptions& gallery,
                     const GalleryEnrollOptions& options);
int RunGalleryIdentify(const CommonOptions& common, const GalleryOptions& gallery,
                       const GalleryIdentifyOptions& options);
int RunGalleryForget(const CommonOptions& common, const GalleryOptions& gallery,
                     const std::string& subject, const std::vector<std::string>& face_ids);
int RunGalleryList(const CommonOptions& common, const GalleryOptions& gallery);

}  // namespace arcface::cli

#endif  // ARCFACE_CLIENT_CLI_COMMANDS_H_
