// The device names of --device as a torch::Device, for every part that places a network beside
// the embedding model (the engine, the face detector), so that one flag means the same device
// everywhere.
//
// Contract
// - "auto": cuda:0 when this build has CUDA and a device is visible, else the CPU; "cpu";
//   "cuda" (= cuda:0) and "cuda:N".
// - Errors: INVALID_ARGUMENT for an unknown name or a bad index; FAILED_PRECONDITION for CUDA
//   on a build without it, or an index past the visible devices (the message says how many).
// - Thread safety: pure; may run from any thread.
#ifndef ARCFACE_SERVER_ENGINE_DEVICE_H_
#define ARCFACE_SERVER_ENGINE_DEVICE_H_

#include <torch/torch.h>

#include <string>

#include "absl/status/statusor.h"

namespace arcface::engine {

absl::StatusOr<torch::Device> ResolveDevice(const std::string& name);

}  // namespace arcface::engine

#endif  // ARCFACE_SERVER_ENGINE_DEVICE_H_
