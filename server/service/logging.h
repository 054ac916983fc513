// Logging set-up for arcface-server: spdlog's default logger writes to stderr, as text or as
// one JSON object per line ({"time","level","msg"}, the message escaped by a JSON library, so
// any byte sequence yields valid JSON).
//
// Contract
// - ConfigureLogging() replaces the default logger; call it once at start-up, before other
//   threads log. `level`: trace, debug, info, warn, error, critical, off; `format`: text, json.
//   Unknown values are INVALID_ARGUMENT (the flag parser rejects them first).
// - Logging itself is thread-safe (spdlog's _mt sinks).
#ifndef ARCFACE_SERVER_SERVICE_LOGGING_H_
#define ARCFACE_SERVER_SERVICE_LOGGING_H_

#include <memory>
#include <string>

#include <spdlog/formatter.h>

#include "absl/status/status.h"

namespace arcface::service {

absl::Status ConfigureLogging(const std::string& level, const std::string& format);

// The JSON-lines formatter, exposed for tests.
std::unique_ptr<spdlog::formatter> MakeJsonFormatter();

}  // namespace arcface::service

#endif  // ARCFACE_SERVER_SERVICE_LOGGING_H_
