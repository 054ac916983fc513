// Precision: the number formats the engine can run a network in, and their names on the command
// line, in GetModelInfo and on /metrics. Pure functions; thread-safe.
#ifndef ARCFACE_SERVER_ENGINE_PRECISION_H_
#define ARCFACE_SERVER_ENGINE_PRECISION_H_

#include <string>

#include "absl/status/statusor.h"

namespace arcface::engine {

// kInt8 is CPU-only (oneDNN, calibrated per-tensor activation scales); kFp16 is CUDA-only.
enum class Precision { kFp32, kFp16, kBf16, kInt8 };

absl::StatusOr<Precision> ParsePrecision(const std::string& name);  // "fp32", "fp16", "bf16", "int8"
const char* PrecisionName(Precision precision);

}  // namespace arcface::engine

#endif  // ARCFACE_SERVER_ENGINE_PRECISION_H_
