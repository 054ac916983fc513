// ReadFile: a whole file into memory, with an error that says which file and why. Used for
// weights, TLS keys and certificates, and images.
//
// Why common/: the server (weights, TLS files) and the clients (images, TLS files) both read
// files and never depend on each other; proto/ holds only the generated API. This library is
// the one place both may use, kept to what both need and free of gRPC, torch and OpenCV.
//
// Contract
// - Reads every byte of a regular file (allocating once, for its size) or of a pipe or device
//   (until its end).
// - Errors name the path: NOT_FOUND "PATH: no such file", PERMISSION_DENIED "PATH: cannot
//   open: Permission denied", INVALID_ARGUMENT "PATH: not a regular file (a directory)",
//   UNKNOWN for any other failure, with the system's reason.
// - Blocking (file I/O); thread-safe.
#ifndef ARCFACE_COMMON_FILES_H_
#define ARCFACE_COMMON_FILES_H_

#include <string>

#include "absl/status/statusor.h"

namespace arcface::common {

absl::StatusOr<std::string> ReadFile(const std::string& path);

}  // namespace arcface::common

#endif  // ARCFACE_COMMON_FILES_H_
