// Server: one arcface-server process's service, from a validated ServerConfig to its exit
// status. main.cc parses the flags and runs it.
//
// Phases (Run() goes through them in order)
// 1. Listen: the gRPC port (FaceEmbedding, health, and reflection with --reflection) and the
//    HTTP port (/metrics, /healthz, /readyz) open before the model loads, so that a busy port
//    is reported at once and liveness probes see the process while it loads. Meanwhile health
//    says NOT_SERVING, /readyz 503, and FaceEmbedding calls get UNAVAILABLE.
// 2. Load models: each model's weights file (or the demo weights) is read and validated
//    (ServerConfig::models: --model NAME=PATH, --weights, --demo-weights).
// 3. Warm up: each model's engine is built on its device and runs its warm-up batches (CUDA:
//    captures its graphs) on a thread that exits afterwards (docs/PERFORMANCE.md); each model's
//    batcher (its own Embedder: queue, batch thread, model threads) starts.
// 4. Load the detector (--detector, unless none): face-api's files are read and validated, the
//    networks built on the model's device and warmed up (on a thread that exits afterwards),
//    and the detector's own batcher starts; a missing or malformed file stops the start (exit
//    2) naming the file.
// 5. Open the gallery (--gallery-store): the store is opened (its schema created or migrated)
//    and every gallery loaded into memory, timed and logged; a store that cannot be opened
//    stops the start (exit 2 for a bad URI or a newer schema, 1 when it cannot be reached).
// 6. Serve: health SERVING, /readyz 200, the port file is written, "SERVING" is logged; then
//    Run() waits for `stop`. Meanwhile SIGHUP (and ModelAdmin.ReloadModels with --admin-rpc)
//    reloads the models whose files changed, beside the serving ones (service::ModelReloader).
// 7. Drain: health NOT_SERVING, /readyz 503, new calls UNAVAILABLE, open streams finish after
//    their read messages; every accepted call finishes (calls still running at the drain
//    timeout are cancelled); the gRPC server shuts down, the batcher flushes, the
//    preprocessing pool and the HTTP server stop; Run() returns 0. A drain still unfinished at
//    the drain timeout + 10 s (a batch stuck in the model keeps the batcher from flushing)
//    ends the process with status 1.
//
// Contract
// - Errors: one path. A phase that fails returns a status naming the cause (the flag, when a
//   flag's value is at fault); Run() logs it, stops what was started (see Teardown below) and
//   returns the exit status: 2 when a flag's value cannot be served (INVALID_ARGUMENT,
//   FAILED_PRECONDITION, UNIMPLEMENTED: a bad weights or TLS file, a device or precision this
//   build or machine lacks, --reflection without its library), else 1 (the machine failed: a
//   port in use, out of memory, a device error).
// - Blocking: Run() blocks the calling thread through every phase until the drain is over.
//   Call it once.
// - `stop` may be notified from any thread at any time; before SERVING, the drain follows
//   right after the model is ready. It is borrowed and must outlive Run().
// - Process-wide state it sets: gRPC's log function (into spdlog), the installed fault
//   injector (--test-fault-injection), libtorch's thread count (--threads), the SIGHUP reload
//   handler (process_signals.h) while it serves. One Server per process.
// - Thread safety: Run() and the destructor on one thread; nothing else is public.
//
// Teardown
// Stopping and destroying are two steps. StopServing() stops, in this order: the gRPC server
// (no call reaches the service any more; those running at its deadline are cancelled), the
// reloader (a reload in progress finishes, a replaced version is shut down), the detector's
// batcher and then each model's (each flushes: every accepted frame and crop is answered; a
// frame's faces may still go on to the embedder), the preprocessing pool, the fault
// injector's installation, the HTTP server (the last reader of the metrics' sources). Both the
// drain and a failed start end with it. Then the members are destroyed in the reverse of their
// declaration order below, which is why they are declared so: each is declared after
// everything it uses, and so destroyed before it.
#ifndef ARCFACE_SERVER_APP_SERVER_H_
#define ARCFACE_SERVER_APP_SERVER_H_

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "server/app/detector_model.h"
#include "server/app/model_builder.h"
#include "server/detect/face_detector.h"
#include "server/engine/engine.h"
#include "server/gallery/galleries.h"
#include "server/model/checkpoint.h"
#include "server/service/detector_metrics.h"
#include "server/service/embedder.h"
#include "server/service/embedding_model.h"
#include "server/service/face_embedding_service.h"
#include "server/service/face_gallery_service.h"
#include "server/service/fault_injection.h"
#include "server/service/frame_detector.h"
#include "server/service/gallery_metrics.h"
#include "server/service/http_server.h"
#include "server/service/model_admin_service.h"
#include "server/service/model_reloader.h"
#include "server/service/server_config.h"
#include "server/service/service_metrics.h"
#include "server/service/work_queue.h"

namespace arcface::app {

class Server {
 public:
  explicit Server(service::ServerConfig config);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // The phases above; the process's exit status.
  int Run(const absl::Notification& stop);

 private:
  absl::Status Listen();
  absl::Status LoadModels();
  absl::Status WarmUp();
  absl::Status LoadDetector();
  absl::Status OpenGallery();
  void Serve(const absl::Notification& stop);
  int Drain();
  // The first step of the teardown (see above); idempotent. `grpc_deadline`: when calls still
  // running are cancelled. `since`: the start of the drain, for the debug log's timings.
  void StopServing(absl::Time grpc_deadline, absl::Time since);

  const service::ServerConfig config_;
  // The models to serve (service::ServedModelSpecs), the default first.
  const std::vector<service::ModelSpec> specs_;
  // What the phases pass on to the next: the listening ports, each model's weights (until its
  // engine holds its own copy) and description, in config_.models' order (the default first).
  int grpc_port_ = 0;
  std::string tls_mode_;  // "plaintext", "tls", "mutual-tls"
  int pool_threads_ = 0;
  int pool_faces_ = 0;
  absl::Time load_start_;
  std::vector<model::Checkpoint> checkpoints_;
  bool faults_installed_ = false;
  bool stopped_ = false;  // StopServing() has run

  // Declared in dependency order; destroyed bottom-up (see Teardown above).
  // Every part reports into the metrics; the HTTP server renders them.
  std::unique_ptr<service::ServiceMetrics> metrics_;
  std::unique_ptr<service::FaultInjector> faults_;
  // Builds each model's version (engine, adapter, Embedder), which reports into the metrics and
  // calls the fault injector; the versions built by the warm-up, until they serve (then the
  // service's ServedModels own them, and a reload's versions).
  std::unique_ptr<ModelBuilder> builder_;
  std::vector<service::ServedModel> built_;
  // The face detector (null with --detector none), on the engine's device; the adapter that
  // calls it; the metrics its batcher reports into (they render into metrics_'s registry).
  std::unique_ptr<detect::FaceDetector> detector_;
  std::unique_ptr<DetectorModel> detector_model_;
  std::unique_ptr<service::DetectorMetrics> detector_metrics_;
  // Preprocessing calls the installed fault injector.
  std::unique_ptr<service::WorkQueue> pool_;
  // Its model thread calls the detector model; its frames' faces go on to the pool and the
  // embedder.
  std::unique_ptr<service::FrameDetector> frame_detector_;
  // Borrows the metrics, the pool, (once ready) the embedder and the detector, and the gallery
  // service's search (gallery_service_, below: gRPC is shut down before anything is destroyed,
  // so no call reaches the search while it goes).
  std::unique_ptr<service::FaceEmbeddingService> service_;
  // The galleries (null with --gallery-store none), their metrics (which read them), and the
  // queue that runs their writes and searches.
  std::unique_ptr<gallery::Galleries> galleries_;
  std::unique_ptr<service::GalleryMetrics> gallery_metrics_;
  std::unique_ptr<service::WorkQueue> gallery_queue_;
  // Borrows the embedding service's call environment, the galleries, the queue and metrics.
  std::unique_ptr<service::FaceGalleryService> gallery_service_;
  // ModelAdmin (reloads with --admin-rpc), and the reloader that SIGHUP and it ask: it swaps
  // versions in the service's models, built by builder_.
  std::unique_ptr<service::ModelAdminService> admin_service_;
  std::unique_ptr<service::ModelReloader> reloader_;
  // Dispatches calls into the service.
  std::unique_ptr<grpc::Server> grpc_;
  // Renders the metrics, whose sources read the pool, the batcher and the engine.
  std::unique_ptr<service::HttpServer> http_;
};

}  // namespace arcface::app

#endif  // ARCFACE_SERVER_APP_SERVER_H_
