// Safetensors reader: parses a whole safetensors file held in memory into float32 tensors.
//
// Contract
// - Validates before trusting anything: the 8-byte little-endian header length (inside the
//   file, at most 100 MB), the JSON header (an object, no duplicate names, `__metadata__` a
//   string map), every entry (known dtype, shape of non-negative integers, data_offsets
//   [begin, end] inside the data region, byte size == numel × dtype size), and that no two
//   tensors share bytes. Only then is data copied out.
// - F32, F16 and BF16 are converted to float32 exactly. Tensors named `*.num_batches_tracked`
//   (PyTorch BatchNorm step counters) are checked like the others and then dropped; they are
//   the only ones allowed to be I64. Any other dtype is an error.
// - Knows nothing of the network: key names and shapes are checked by the caller.
// - Errors: INVALID_ARGUMENT, the message naming the tensor (when there is one) and the reason;
//   it does not name the file (the caller adds that). Never throws.
// - Thread-safe (no shared state); the result owns its memory and does not refer to `bytes`.
#ifndef ARCFACE_SERVER_MODEL_SAFETENSORS_H_
#define ARCFACE_SERVER_MODEL_SAFETENSORS_H_

#include <cstdint>
#include <map>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/model/checkpoint.h"

namespace arcface::model {

// Whether `bytes` start like a safetensors file (a header length, then '{'). A cheap sniff for
// format detection; it does not mean the file is valid.
bool LooksLikeSafetensors(absl::string_view bytes);

absl::StatusOr<std::map<std::string, HostTensor>> ParseSafetensors(absl::string_view bytes);

// IEEE 754 binary16 and bfloat16 bit patterns to float32; exact for every input, NaN and
// infinities included.
float HalfToFloat(uint16_t bits);
float BFloat16ToFloat(uint16_t bits);

}  // namespace arcface::model

#endif  // ARCFACE_SERVER_MODEL_SAFETENSORS_H_
