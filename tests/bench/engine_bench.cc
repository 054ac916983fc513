// engine_bench: the engine's offline throughput on one weights file, one JSON line per batch
// size, then the process's peak RSS. tests/bench/engine_vs_onnxruntime.py runs it beside
// ONNX Runtime and prints the table.
#include <sys/resource.h>

#include <time.h>

#include <chrono>
#include <cstdio>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>

#include "server/engine/engine.h"
#include "server/engine/openmp_env.h"
#include "server/model/checkpoint.h"
#include "server/model/demo_weights.h"

namespace {

double ProcessCpuSeconds() {
  timespec t{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) + t.tv_nsec * 1e-9;
}

}  // namespace

int main(int argc, char** argv) {
  // The server's OpenMP waiting, so that offline and in-server figures compare.
  const std::string openmp = arcface::engine::ApplyOpenMpDefaults(argv);
  CLI::App app{"Offline throughput of the ArcFace engine"};
  std::string weights;
  std::vector<int> batches = {1, 8, 32};
  arcface::engine::EngineOptions options;
  std::string precision = "fp32";
  double seconds = 10;
  options.threads = 2;
  bool demo = false;
  auto* weights_opt = app.add_option("--weights", weights, "safetensors or ONNX weights file");
  app.add_flag("--demo-weights", demo, "seeded random weights (meaningless embeddings)")
      ->excludes(weights_opt);
  app.add_option("--batch", batches, "batch sizes")->delimiter(',');
  app.add_option("--threads", options.threads, "intra-op threads");
  app.add_option("--device", options.device, "cpu, cuda, cuda:N, auto");
  app.add_option("--precision", precision, "fp32, fp16, bf16");
  app.add_option("--seconds", seconds, "measuring time per batch size (after warm-up)");
  app.add_flag("!--no-channels-last", options.channels_last, "use NCHW activations (torch backend)");
  app.add_option("--cpu-backend", options.cpu_backend, "onednn or torch");
  bool like_server = false;
  app.add_flag("--like-server", like_server,
               "build the engine on a thread that exits and run it on another, as the server does");
  app.add_flag("!--no-winograd", options.winograd, "onednn: direct 3x3 convolutions, not Winograd");
  CLI11_PARSE(app, argc, argv);

  auto parsed = arcface::engine::ParsePrecision(precision);
  if (!parsed.ok()) {
    std::fprintf(stderr, "%s\n", parsed.status().ToString().c_str());
    return 2;
  }
  options.precision = *parsed;
  options.warmup_batch_size = 0;
  if (!demo && weights.empty()) {
    std::fprintf(stderr, "--weights FILE or --demo-weights is required\n");
    return 2;
  }
  auto checkpoint = demo ? absl::StatusOr<arcface::model::Checkpoint>(arcface::model::MakeDemoCheckpoint())
                         : arcface::model::LoadCheckpoint(weights);
  if (!checkpoint.ok()) {
    std::fprintf(stderr, "%s\n", checkpoint.status().ToString().c_str());
    return 1;
  }
  // As the server does it (--like-server): built on a thread that exits, run on another one.
  absl::StatusOr<std::unique_ptr<arcface::engine::Engine>> engine = absl::UnknownError("not built");
  auto create = [&] { engine = arcface::engine::Engine::Create(*checkpoint, options); };
  if (like_server) {
    std::thread(create).join();
  } else {
    create();
  }
  if (!engine.ok()) {
    std::fprintf(stderr, "%s\n", engine.status().ToString().c_str());
    return 1;
  }
  std::mt19937 rng(1);
  int status = 0;
  auto measure = [&] {
  for (int batch : batches) {
    std::vector<uint8_t> crops(arcface::engine::kCropBytes * batch);
    for (auto& v : crops) v = static_cast<uint8_t>(rng());
    // Warm-up: oneDNN picks and caches kernels per shape on the first calls.
    for (int i = 0; i < 2; ++i) (void)(*engine)->Run(crops);
    using Clock = std::chrono::steady_clock;
    const double cpu_start = ProcessCpuSeconds();
    const auto start = Clock::now();
    int64_t faces = 0;
    double elapsed = 0;
    do {
      auto out = (*engine)->Run(crops);
      if (!out.ok()) {
        std::fprintf(stderr, "%s\n", out.status().ToString().c_str());
        status = 1;
        return;
      }
      faces += batch;
      elapsed = std::chrono::duration<double>(Clock::now() - start).count();
    } while (elapsed < seconds);
    // Faces per CPU-second of this process: on a machine other jobs load, a steadier figure
    // of the work per face than wall time (it still moves with cache and memory contention).
    const double cpu = ProcessCpuSeconds() - cpu_start;
    std::printf("{\"batch\": %d, \"faces_per_s\": %.3f, \"faces\": %lld, \"seconds\": %.3f, "
                "\"faces_per_cpu_s\": %.3f}\n",
                batch, faces / elapsed, static_cast<long long>(faces), elapsed, faces / cpu);
    std::fflush(stdout);
  }
  };
  if (like_server) {
    std::thread(measure).join();
  } else {
    measure();
  }
  if (status != 0) return status;
  if (demo) std::fprintf(stderr, "note: DEMO weights (seeded random): embeddings are not meaningful\n");
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  std::printf("{\"peak_rss_mib\": %.1f, \"device\": \"%s\", \"precision\": \"%s\", \"openmp\": \"%s\"}\n",
              usage.ru_maxrss / 1024.0, (*engine)->device().c_str(), precision.c_str(), openmp.c_str());
  return 0;
}
