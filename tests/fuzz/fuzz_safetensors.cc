// Fuzz target: bytes → ParseSafetensors, checked against its contract; bytes it accepts then go
// through LoadCheckpoint as a file, the server's whole loader (format sniffing, the ONNX
// fallback, the IResNet key and shape validation). The file is a memfd: no disk, no clean-up.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "server/model/checkpoint.h"
#include "server/model/safetensors.h"

namespace {

void Fail(const std::string& what) {
  std::fprintf(stderr, "fuzz_safetensors: %s\n", what.c_str());
  std::abort();
}

void CheckError(const absl::Status& status) {
  if (status.code() != absl::StatusCode::kInvalidArgument || status.message().empty()) {
    Fail(absl::StrCat("not INVALID_ARGUMENT with a reason: ", status.ToString()));
  }
}

int g_file = -1;

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  g_file = memfd_create("fuzz_safetensors", 0);
  if (g_file < 0) Fail("memfd_create failed");
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const absl::string_view bytes(reinterpret_cast<const char*>(data), size);
  auto tensors = arcface::model::ParseSafetensors(bytes);
  if (!tensors.ok()) {
    CheckError(tensors.status());
    return 0;
  }
  for (const auto& [name, t] : *tensors) {
    uint64_t numel = 1;
    for (int64_t d : t.shape) {
      if (d < 0) Fail(absl::StrCat("'", name, "' has a negative dimension"));
      numel *= static_cast<uint64_t>(d);
    }
    if (numel != t.values.size()) Fail(absl::StrCat("'", name, "' has the wrong value count"));
    if (absl::EndsWith(name, ".num_batches_tracked")) Fail("a batch counter was kept");
  }

  if (ftruncate(g_file, 0) != 0 || pwrite(g_file, data, size, 0) != static_cast<ssize_t>(size)) {
    Fail("cannot write the memfd");
  }
  const std::string path = absl::StrCat("/proc/self/fd/", g_file);
  auto checkpoint = arcface::model::LoadCheckpoint(path);
  if (!checkpoint.ok()) {
    CheckError(checkpoint.status());
    // checkpoint.h: the message names the file.
    if (!absl::StartsWith(checkpoint.status().message(), path)) {
      Fail(absl::StrCat("the error does not name the file: ", checkpoint.status().ToString()));
    }
  } else if (checkpoint->format != "safetensors" || checkpoint->tensors.empty()) {
    Fail("LoadCheckpoint accepted the file as something else");
  }
  return 0;
}
