// arcface-server: serves arcface.v1.FaceEmbedding over gRPC, plus /metrics, /healthz and
// /readyz over HTTP. `arcface-server --help` lists the flags (each with an ARCFACE_* variable).
// Exit status: 0 after a drain (or --help/--version), 2 for a bad flag or a value that cannot be
// served, 1 when the machine failed; the life cycle and its rules are server/app/server.h's.
#include <spdlog/spdlog.h>

#include <iostream>
#include <string>

#include "absl/status/status.h"
#include "server/app/process_signals.h"
#include "server/app/server.h"
#include "server/engine/openmp_env.h"
#include "server/service/logging.h"
#include "server/service/server_config.h"

int main(int argc, char** argv) {
  // May re-execute the program (openmp_env.h), so before anything else.
  const std::string openmp = arcface::engine::ApplyOpenMpDefaults(argv);
  arcface::app::BlockProcessSignals();  // before any thread exists (process_signals.h)
  arcface::service::ParsedFlags parsed =
      arcface::service::ParseServerFlags(argc, argv, std::cout, std::cerr);
  if (parsed.exit_code >= 0) return parsed.exit_code;
  if (absl::Status s = arcface::service::ConfigureLogging(parsed.config.log_level,
                                                          parsed.config.log_format);
      !s.ok()) {
    std::cerr << "arcface-server: " << s.message() << "\n";
    return 2;
  }
  spdlog::info("{}", openmp);
  arcface::app::Server server(parsed.config);
  const int code = server.Run(arcface::app::WatchProcessSignals());
  spdlog::default_logger()->flush();
  return code;
}
