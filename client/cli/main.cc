// arcface-client: the command-line client of the ArcFace embedding service.
// `arcface-client --help` and `arcface-client COMMAND --help` describe every flag; commands.h
// states the exit codes (0 ok, 1 some inputs failed, 2 usage error, 3 server unreachable).
#include <cmath>
#include <cstdio>
#include <fstream>
#include <optional>
#include <sstream>

#include <CLI/CLI.hpp>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "client/cli/commands.h"
#include "client/cli/eval_data.h"

#ifndef ARCFACE_VERSION
#define ARCFACE_VERSION "0.0.0"
#endif

namespace {

using namespace arcface::cli;

int Usage(const std::string& message) {
  std::fprintf(stderr, "arcface-client: %s\nRun with --help for the commands and flags.\n",
               message.c_str());
  return kExitUsage;
}

// The --landmarks and --box flags of the commands that embed files.
struct FaceFlags {
  std::string landmarks_path;
  std::string box_text;

  void AddTo(CLI::App* command) {
    command
        ->add_option("--landmarks", landmarks_path,
                     "JSON: [[x,y] x5] for every file, or {\"file\": [[x,y] x5], ...} "
                     "(keyed by the path as given or the base name): align to ArcFace's template")
        ->check(CLI::ExistingFile);
    command->add_option("--box", box_text, "x0,y0,x1,y1: crop this region of every image");
  }

  // Fills `face`; a usage error's message otherwise.
  std::optional<std::string> Parse(FaceOptions* face) const {
    if (!box_text.empty()) {
      absl::StatusOr<std::array<float, 4>> box = ParseBox(box_text);
      if (!box.ok()) return absl::StrCat("--box: ", box.status().message());
      face->box = *box;
    }
    if (!landmarks_path.empty()) {
      std::ifstream in(landmarks_path);
      std::stringstream text;
      text << in.rdbuf();
      absl::StatusOr<LandmarksFile> lm = ParseLandmarksJson(text.str());
      if (!lm.ok()) {
        return absl::StrCat("--landmarks ", landmarks_path, ": ", lm.status().message());
      }
      face->landmarks = *lm;
    }
    return std::nullopt;
  }
};

int Main(int argc, char** argv) {
  CLI::App app(
      "arcface-client: embed, compare and detect faces with an arcface-server, enroll and "
      "identify people in its gallery, measure its accuracy (eval), load-test it and "
      "reload its models.\n"
      "Exit codes: 0 ok, 1 some inputs failed, 2 usage error, 3 server unreachable.",
      "arcface-client");
  app.set_version_flag("--version", std::string(ARCFACE_VERSION));
  app.require_subcommand(1);
  app.fallthrough();  // the common flags may come after the command too

  CommonOptions common;
  app.add_option("--server", common.server,
                 "HOST:PORT[,HOST:PORT...]; several: calls are spread round-robin")
      ->envname("ARCFACE_SERVER")
      ->capture_default_str();
  app.add_option("--timeout", common.timeout_s, "Deadline of each call, in seconds")
      ->capture_default_str();
  app.add_option("--retries", common.attempts,
                 "Attempts per call when the server is UNAVAILABLE (exponential backoff); 1: none")
      ->capture_default_str()
      ->check(CLI::Range(1, 100));
  app.add_flag("--tls", common.tls, "Use TLS with the system's root certificates");
  app.add_option("--tls-ca", common.tls_ca, "CA bundle (PEM) to verify the server; implies TLS")
      ->check(CLI::ExistingFile);
  app.add_option("--tls-cert", common.tls_cert, "Client certificate (PEM) for mutual TLS")
      ->check(CLI::ExistingFile);
  app.add_option("--tls-key", common.tls_key, "Client private key (PEM) for mutual TLS")
      ->check(CLI::ExistingFile);
  app.add_option("--tls-server-name", common.tls_server_name,
                 "Name to check in the server's certificate (default: the host)");
  app.add_option("--model", common.model,
                 "The served model to use (see `models`); default: the server's default model")
      ->envname("ARCFACE_MODEL");

  // info
  bool info_json = false;
  CLI::App* info = app.add_subcommand("info", "Print the served model and its limits");
  info->add_flag("--json", info_json, "As JSON (the ModelInfo message)");

  // models
  bool models_json = false;
  CLI::App* models_cmd = app.add_subcommand("models", "List the served models, the default first");
  models_cmd->add_flag("--json", models_json, "As JSON (the ListModelsResponse message)");

  // reload
  ReloadOptions reload;
  CLI::App* reload_cmd = app.add_subcommand(
      "reload",
      "Reload the served models' files (ModelAdmin.ReloadModels: a server with "
      "--admin-rpc): one line per model, RELOADED (previous -> new model_id), "
      "UNCHANGED or FAILED (the previous weights keep serving); exit 1 if any failed. "
      "The answer waits for the new weights to load and warm up: raise --timeout for "
      "large models");
  reload_cmd->add_option("models", reload.models,
                         "Served model names (see `models`); none: every model (--model is not "
                         "used)");
  reload_cmd->add_flag("--json", reload.json, "As JSON (the ReloadModelsResponse message)");

  // health
  double health_wait = 0;
  CLI::App* health = app.add_subcommand(
      "health", "grpc.health.v1: print SERVING (exit 0) or NOT_SERVING (exit 1)");
  health->add_option("--wait", health_wait, "Wait up to this many seconds for SERVING");

  // embed
  EmbedOptions embed;
  FaceFlags embed_face;
  CLI::App* embed_cmd = app.add_subcommand(
      "embed", "Embed the faces of image files (directories: recursively), streamed through "
               "EmbedStream; a failed file is reported and the rest go on");
  embed_cmd->add_option("inputs", embed.inputs, "Image files and directories")->required();
  embed_face.AddTo(embed_cmd);
  embed_cmd->add_flag("--normalize", embed.normalize, "Unit-length embeddings (default: raw)");
  embed_cmd->add_option("--out", embed.out,
                        "FILE.npy (float32 [N,512], rows in input order, names in "
                        "FILE.files.txt), FILE.json or FILE.csv; default: a line per file");

  // compare
  CompareOptions compare;
  CLI::App* compare_cmd = app.add_subcommand(
      "compare", "compare A B: the cosine and a same/different verdict; compare --matrix "
                 "FILES...: every pair, as a table and optionally a picture. Against random "
                 "(demo) weights the output says it is no identity verdict");
  compare_cmd->add_option("files", compare.files, "Image files")->required();
  compare_cmd->add_flag("--matrix", compare.matrix, "All pairs of FILES");
  compare_cmd->add_option("--threshold", compare.threshold,
                          "Cosine at or above which two faces are the same person (default: "
                          "the served model's, 0.4 for ArcFace as InsightFace uses, 0.9144 for "
                          "dlib's 0.6)");
  compare_cmd->add_option("--plot", compare.plot,
                          "With --matrix: write a PNG with face thumbnails and the heat map");

  // detect
  DetectOptions detect;
  float detect_threshold = 0;
  CLI::App* detect_cmd = app.add_subcommand(
      "detect", "Find the faces of an image with the server's detector (Detect): boxes, scores "
                "and the five landmarks; with --embed their embeddings and pairwise cosines, "
                "with --gallery who they are");
  detect_cmd->add_option("image", detect.image, "Image file")->required();
  detect_cmd->add_option("--plot", detect.plot,
                         "Write the image with the boxes, landmarks and labels (PNG)");
  detect_cmd->add_flag("--json", detect.json, "One JSON document on stdout instead of text");
  detect_cmd->add_option("--min-score", detect.request.min_score,
                         "Leave out faces scoring below this, in [0, 1] (default: the "
                         "server's, `arcface-client info`)")
      ->check(CLI::Range(0.0, 1.0));
  detect_cmd->add_option("--max-faces", detect.request.max_faces,
                         "Only the highest-scoring faces (default: all)");
  detect_cmd->add_option("--min-face-size", detect.request.min_face_size,
                         "Leave out faces whose box is smaller than this, in pixels (its "
                         "shorter side)")
      ->check(CLI::NonNegativeNumber);
  detect_cmd->add_flag("--embed", detect.request.embed,
                       "Also embed each face, aligned by its landmarks");
  detect_cmd->add_flag("--normalize", detect.request.normalize,
                       "Unit-length embeddings (default: raw)");
  detect_cmd->add_option("--gallery", detect.request.gallery,
                         "Identify each face in this gallery (a server with --gallery-store)");
  detect_cmd->add_option("--top-k", detect.request.top_k, "With --gallery: subjects per face")
      ->check(CLI::Range(1, 1000000));
  CLI::Option* detect_threshold_opt = detect_cmd->add_option(
      "--threshold", detect_threshold,
      "With --gallery: only subjects with at least this similarity (default: the model's, "
      "0.4 for ArcFace, 0.9144 for dlib; -1 keeps all)");

  // bench
  BenchOptions bench;
  std::string concurrency_text = "1,8,32,64";
  CLI::App* bench_cmd = app.add_subcommand(
      "bench", "Load test: Embed requests back to back from N concurrent callers per setting; "
               "throughput, latency p50/p90/p99/max, errors by status code");
  bench_cmd->add_option("--concurrency", concurrency_text, "Comma-separated caller counts")
      ->capture_default_str();
  bench_cmd->add_option("--faces-per-request", bench.faces_per_request, "Faces in each request")
      ->capture_default_str();
  bench_cmd->add_option("--duration", bench.duration_s, "Seconds per setting")
      ->capture_default_str();
  bench_cmd->add_option("--json", bench.json, "Also write the results as JSON");
  bench_cmd->add_option("--image", bench.image,
                        "Send this image file (default: a synthetic 112x112 crop, raw)")
      ->check(CLI::ExistingFile);

  // eval
  EvalOptions eval;
  std::string eval_faces = "whole";
  CLI::App* eval_cmd = app.add_subcommand(
      "eval",
      "Verification and identification figures of the served model on a folder of identity "
      "subfolders (LFW's layout ROOT/<person>/<images>): 10-fold accuracy, ROC AUC, TAR at FAR "
      "1e-3 and 1e-2, leave-one-out top-1");
  eval_cmd->add_option("root", eval.root, "Folder of identity subfolders")->required();
  eval_cmd
      ->add_option("--pairs", eval.pairs,
                   "LFW-style pairs.txt (\"10 300\" or a count, then \"NAME I J\" and \"NAME1 I "
                   "NAME2 J\"; image I: ROOT/NAME/NAME_%04d.jpg, else the I-th image of ROOT/NAME "
                   "by name); default: every pair of images")
      ->check(CLI::ExistingFile);
  eval_cmd
      ->add_option("--faces", eval_faces,
                   "whole: each image is the crop (resized whole, as embed sends a file); "
                   "detect: the largest face the server's detector finds (none: a failure)")
      ->check(CLI::IsMember({"whole", "detect"}))
      ->capture_default_str();
  CLI::Option* eval_pad_opt =
      eval_cmd
          ->add_option("--pad", eval.pad,
                       "With --faces detect: send each image inside a black border FRACTION of "
                       "its width left and right and of its height above and below, so that a "
                       "face filling a tight crop is found (dlib's johns chips: 1)")
          ->check(CLI::Range(0.0, kMaxPad));
  eval_cmd->add_option("--gallery", eval.gallery,
                       "Also measure top-1 through the server's gallery: enrol every image into "
                       "this scratch gallery (refused when it holds faces), forget/identify/"
                       "re-enrol each, forget all at the end");
  eval_cmd->add_option("--roc", eval.roc, "Write the ROC curve (PNG)");
  eval_cmd->add_flag("--json", eval.json, "One JSON document on stdout instead of a table");

  // gallery
  GalleryOptions gallery;
  CLI::App* gallery_cmd = app.add_subcommand(
      "gallery", "The face gallery (a server with --gallery-store): enroll people, identify "
                 "faces against them, forget them, list them");
  gallery_cmd->require_subcommand(1);
  gallery_cmd->fallthrough();
  gallery_cmd->add_option("--gallery", gallery.gallery, "Gallery name (default: \"default\")");
  gallery_cmd->add_flag("--json", gallery.json, "One JSON document on stdout instead of a table");

  GalleryEnrollOptions enroll;
  FaceFlags enroll_face;
  std::vector<std::string> label_texts;
  CLI::App* enroll_cmd = gallery_cmd->add_subcommand(
      "enroll", "Add the faces of image files (directories: recursively) to SUBJECT, in "
                "requests of the server's max_faces_per_enroll; a bad file is reported and the "
                "rest go on");
  enroll_cmd->add_option("subject", enroll.subject, "Subject id")->required();
  enroll_cmd->add_option("inputs", enroll.inputs, "Image files and directories")->required();
  enroll_cmd->add_option("--label", label_texts, "key=value set on the subject (repeatable)");
  enroll_face.AddTo(enroll_cmd);

  GalleryIdentifyOptions identify;
  FaceFlags identify_face;
  float identify_threshold = 0;
  CLI::App* identify_cmd = gallery_cmd->add_subcommand(
      "identify", "For the face of each image file, the best-matching subjects (cosine "
                  "similarity, descending)");
  identify_cmd->add_option("inputs", identify.inputs, "Image files and directories")->required();
  identify_cmd->add_option("--top-k", identify.top_k, "Subjects per file")
      ->capture_default_str()
      ->check(CLI::Range(1, 1000000));
  CLI::Option* threshold_opt = identify_cmd->add_option(
      "--threshold", identify_threshold,
      "Only candidates with at least this similarity (default: the gallery's model's, 0.4 for "
      "ArcFace, 0.9144 for dlib; -1 keeps all)");
  identify_face.AddTo(identify_cmd);

  std::string forget_subject;
  std::vector<std::string> forget_faces;
  CLI::App* forget_cmd = gallery_cmd->add_subcommand(
      "forget", "Remove SUBJECT with all its faces, or (--face) some of its faces");
  forget_cmd->add_option("subject", forget_subject, "Subject id")->required();
  forget_cmd->add_option("--face", forget_faces, "Remove only this face id (repeatable)");

  CLI::App* list_cmd = gallery_cmd->add_subcommand(
      "list", "Every subject of the gallery with its number of faces and labels");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);  // prints help / version / the error
    return rc == 0 ? kExitOk : kExitUsage;
  }

  if (*info) return RunInfo(common, info_json);
  if (*models_cmd) return RunModels(common, models_json);
  if (*health) return RunHealth(common, health_wait);
  if (*reload_cmd) return RunReload(common, reload);
  if (*embed_cmd) {
    if (!embed.out.empty() && !IsKnownOutputExtension(embed.out)) {
      return Usage("--out: use a .npy, .json or .csv file name");
    }
    if (auto error = embed_face.Parse(&embed.face)) return Usage(*error);
    return RunEmbed(common, embed);
  }
  if (*enroll_cmd) {
    if (auto error = enroll_face.Parse(&enroll.face)) return Usage(*error);
    for (const std::string& text : label_texts) {
      absl::StatusOr<std::pair<std::string, std::string>> label = ParseLabel(text);
      if (!label.ok()) return Usage(absl::StrCat("--label: ", label.status().message()));
      enroll.labels[label->first] = label->second;
    }
    return RunGalleryEnroll(common, gallery, enroll);
  }
  if (*identify_cmd) {
    if (auto error = identify_face.Parse(&identify.face)) return Usage(*error);
    if (threshold_opt->count() > 0) {
      if (!std::isfinite(identify_threshold)) return Usage("--threshold must be a number");
      identify.threshold = identify_threshold;
    }
    return RunGalleryIdentify(common, gallery, identify);
  }
  if (*forget_cmd) return RunGalleryForget(common, gallery, forget_subject, forget_faces);
  if (*list_cmd) return RunGalleryList(common, gallery);
  if (*compare_cmd) {
    if (!compare.matrix && compare.files.size() != 2) {
      return Usage("compare takes two files (A B), or --matrix with several");
    }
    if (!compare.matrix && !compare.plot.empty()) return Usage("--plot needs --matrix");
    if (compare.threshold && !std::isfinite(*compare.threshold)) {
      return Usage("--threshold must be a number");
    }
    return RunCompare(common, compare);
  }
  if (*detect_cmd) {
    if (detect.request.gallery.empty() &&
        (detect.request.top_k > 0 || detect_threshold_opt->count() > 0)) {
      return Usage("--top-k and --threshold need --gallery");
    }
    if (detect_threshold_opt->count() > 0) {
      if (!std::isfinite(detect_threshold)) return Usage("--threshold must be a number");
      detect.request.threshold = detect_threshold;
    }
    return RunDetect(common, detect);
  }
  if (*eval_cmd) {
    eval.detect = eval_faces == "detect";
    if (eval_pad_opt->count() > 0 && !eval.detect) {
      return Usage("--pad pads the image for the detector: it needs --faces detect");
    }
    return RunEval(common, eval);
  }
  if (*bench_cmd) {
    bench.concurrency.clear();
    for (absl::string_view part : absl::StrSplit(concurrency_text, ',')) {
      int c = 0;
      if (!absl::SimpleAtoi(part, &c)) {
        return Usage(absl::StrCat("--concurrency: '", part, "' is not a number"));
      }
      bench.concurrency.push_back(c);
    }
    return RunBench(common, bench);
  }
  return Usage("no command");
}

}  // namespace

int main(int argc, char** argv) { return Main(argc, argv); }
