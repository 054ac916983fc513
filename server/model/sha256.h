// SHA-256 of a byte string, as the lowercase hex digest that `sha256sum` prints.
//
// Contract
// - Pure function of its input; thread-safe; blocks for the time of the hash (≈0.1–0.5 s for a
//   170 MB weights file).
// - Errors: only if OpenSSL itself fails (allocation), as an INTERNAL status.
#ifndef ARCFACE_SERVER_MODEL_SHA256_H_
#define ARCFACE_SERVER_MODEL_SHA256_H_

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace arcface::model {

// 64 lowercase hex digits.
absl::StatusOr<std::string> Sha256Hex(absl::string_view bytes);

}  // namespace arcface::model

#endif  // ARCFACE_SERVER_MODEL_SHA256_H_
