#include "server/gallery/ids.h"

#include <cstdint>

#include "absl/base/thread_annotations.h"
#include "absl/random/random.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"

namespace arcface::gallery {
namespace {

// The length of the UTF-8 sequence starting at s[i] (0 when it is not one), with the code
// point in *cp.
size_t Utf8Sequence(absl::string_view s, size_t i, uint32_t* cp) {
  const auto byte = [&](size_t j) { return static_cast<uint8_t>(s[j]); };
  const uint8_t b = byte(i);
  size_t len;
  uint32_t min;
  if (b < 0x80) {
    *cp = b;
    return 1;
  } else if ((b & 0xE0) == 0xC0) {
    len = 2, min = 0x80, *cp = b & 0x1F;
  } else if ((b & 0xF0) == 0xE0) {
    len = 3, min = 0x800, *cp = b & 0x0F;
  } else if ((b & 0xF8) == 0xF0) {
    len = 4, min = 0x10000, *cp = b & 0x07;
  } else {
    return 0;
  }
  if (i + len > s.size()) return 0;
  for (size_t j = 1; j < len; ++j) {
    if ((byte(i + j) & 0xC0) != 0x80) return 0;
    *cp = (*cp << 6) | (byte(i + j) & 0x3F);
  }
  // Overlong forms, surrogates and values past Unicode are not UTF-8.
  if (*cp < min || *cp > 0x10FFFF || (*cp >= 0xD800 && *cp <= 0xDFFF)) return 0;
  return len;
}

}  // namespace

absl::Status CheckId(absl::string_view what, absl::string_view id) {
  if (id.empty()) return absl::InvalidArgumentError(absl::StrCat(what, " is empty"));
  if (id.size() > kMaxIdBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": ", id.size(), " bytes, the limit is ", kMaxIdBytes));
  }
  for (size_t i = 0; i < id.size();) {
    uint32_t cp = 0;
    const size_t len = Utf8Sequence(id, i, &cp);
    if (len == 0) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": not valid UTF-8 at byte ", i));
    }
    if (cp < 0x20 || (cp >= 0x7F && cp <= 0x9F)) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: control character U+%04X at byte %d", what, cp, i));
    }
    i += len;
  }
  return absl::OkStatus();
}

std::string NewFaceId() {
  static absl::Mutex mu(absl::kConstInit);
  static absl::BitGen gen ABSL_GUARDED_BY(mu);
  absl::MutexLock lock(&mu);
  return absl::StrFormat("%016x%016x", absl::Uniform<uint64_t>(gen), absl::Uniform<uint64_t>(gen));
}

}  // namespace arcface::gallery
