// ServerConfig: arcface-server's command line. Every flag has an ARCFACE_* environment variable
// (the flag wins when both are given); `arcface-server --help` lists them.
//
// Contract
// - ParseServerFlags() never exits the process: it returns the exit status the caller should
//   exit with (0 after --help/--version, 2 for any bad flag or value, with a message naming the
//   flag written to `err`), or -1 with a validated config to run with.
// - Validation: each option's own rule is a CLI11 validator beside it (CLI::Range for sizes,
//   CLI::IsMember for precision and logging, CLI::ExistingFile for the weights and TLS files,
//   validators of our own for the device, host:port addresses (common/address.h) and the
//   drain timeout); the first bad value ends the parse, its message saying "--flag: what is
//   wrong". Then the rules between flags (at least one model: --model, --weights or
//   --demo-weights, not both of the last two; distinct model names;
//   --max-queue-size >= --max-batch-size, TLS files in the right combinations) and the hidden
//   test hook's fault spec are checked, every broken one reported. Whether the device or precision
//   is available on this machine is decided later, by the engine.
// - Pure apart from reading the environment and checking that named files exist; thread-safe.
#ifndef ARCFACE_SERVER_SERVICE_SERVER_CONFIG_H_
#define ARCFACE_SERVER_SERVICE_SERVER_CONFIG_H_

#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

#include "absl/time/time.h"

namespace arcface::service {

// One served model: the name requests give (EmbedRequest.model), and its weights (a file whose
// architecture is read from it), or the seeded random demo weights.
struct ModelSpec {
  std::string name;
  std::string path;  // empty with demo
  bool demo = false;
};

// The model names --weights and --demo-weights give their model.
inline constexpr char kWeightsModelName[] = "arcface";
inline constexpr char kDemoModelName[] = "arcface-demo";

struct ServerConfig {
  std::string weights;
  bool demo_weights = false;
  // --model NAME=PATH as given, and parsed, in order: NAME [a-z0-9_.-]{1,64}, distinct.
  std::vector<std::string> model_flags;
  std::vector<ModelSpec> models;
  std::string listen = "0.0.0.0:50051";
  std::string http_listen = "0.0.0.0:8080";
  std::string device = "auto";
  std::string precision = "fp32";
  int threads = 0;
  // CPU: Winograd 3×3 convolutions (faster; about 1.2 GB more resident memory for their
  // transformed weights, see docs/PERFORMANCE.md).
  bool cpu_winograd = true;
  int max_batch_size = 32;
  int64_t max_queue_delay_us = 2000;
  int max_queue_size = 4096;
  // Batches in the model at once. 0: automatic (1 on the CPU, the engine's CUDA lanes on CUDA);
  // an explicit value on CUDA also sets the number of lanes.
  int max_batches_in_flight = 0;
  // How often queued calls are checked for cancellation (expired ones leave at their deadline).
  int64_t cancel_poll_interval_us = 20'000;
  int max_faces_per_request = 256;
  int64_t max_message_bytes = int64_t{64} << 20;
  int64_t max_image_pixels = 40'000'000;
  int max_compare_rows = 4096;
  int max_compare_cols = 4096;
  int preprocess_threads = 0;  // 0: the number of hardware threads (at least 2)
  int preprocess_queue = 0;    // faces admitted to preprocessing; 0: max(1024, max_queue_size)
  int warmup_batch_size = 8;
  // The face gallery: "none", "sqlite:PATH" or a postgres:// URI, and its limits.
  std::string gallery_store = "none";
  int gallery_max_faces_per_enroll = 64;
  int gallery_max_probes = 256;
  int gallery_max_top_k = 100;
  int gallery_threads = 2;
  int64_t gallery_hnsw_min_faces = 0;  // 0: exact search only
  // HNSW's graph degree and search beam (gallery::HnswOptions' defaults: recall@10 >= 0.99).
  int gallery_hnsw_m = 48;
  int gallery_hnsw_ef_search = 256;
  // The face detector behind Detect: "none" (Detect answers UNIMPLEMENTED), or a folder with
  // face-api's files, optionally "tiny_face_detector:DIR" or "ssd_mobilenetv1:DIR" to choose
  // the box network (ParseDetectorFlag()); and its batcher and limits, in frames.
  std::string detector = "none";
  int detector_max_batch_size = 8;             // 1..1024
  int64_t detector_max_queue_delay_us = 2000;  // 0..10 s
  int detector_max_queue_size = 64;            // >= detector_max_batch_size
  int detector_max_faces = 256;                // faces one frame may return; 1..5118
  float detector_min_score = 0.5f;             // DetectRequest.min_score when 0; in [0, 1]
  // Decoded frames held by Detect calls at once, over all calls, in MiB (a 40 MP frame is
  // 114 MiB); beyond, RESOURCE_EXHAUSTED. 16..1048576.
  int64_t detector_max_held_mib = 1024;
  absl::Duration drain_timeout = absl::Seconds(30);
  std::string log_level = "info";
  std::string log_format = "text";
  bool reflection = false;
  // ModelAdmin.ReloadModels (model_admin_service.h); only with a loopback --listen or mutual TLS.
  bool admin_rpc = false;
  std::string tls_cert;
  std::string tls_key;
  std::string tls_client_ca;
  std::string port_file;
  std::string test_hold_model_file;
  std::string test_fault_injection;  // FaultInjector's SPEC; empty: off
};

struct ParsedFlags {
  int exit_code = -1;  // >= 0: exit now with this status
  ServerConfig config;
};

ParsedFlags ParseServerFlags(int argc, const char* const* argv, std::ostream& out,
                             std::ostream& err);

// Every model `config` serves, the default first: the --model ones in order, then --weights's
// (kWeightsModelName), then --demo-weights's (kDemoModelName).
std::vector<ModelSpec> ServedModelSpecs(const ServerConfig& config);

// --model's value into *spec; "" when it is good, else what is wrong with it (the name's rule,
// a path that does not exist).
std::string ParseModelFlag(const std::string& text, ModelSpec* spec);

// --detector's value: false for "none"; else true with the folder in *dir and the box network
// in *network ("" when the value names none: the detector's default).
bool ParseDetectorFlag(const std::string& text, std::string* network, std::string* dir);

// Whether a gRPC listen address ("host:port", "[v6]:port", "unix:PATH") reaches this machine
// only: 127.0.0.0/8, ::1, localhost, or a unix socket.
bool IsLoopback(const std::string& listen);

// "30s", "1.5m", "500ms" (absl::ParseDuration) or a plain number of seconds ("30", "0.5").
bool ParseDrainTimeout(const std::string& text, absl::Duration* out);

}  // namespace arcface::service

#endif  // ARCFACE_SERVER_SERVICE_SERVER_CONFIG_H_
