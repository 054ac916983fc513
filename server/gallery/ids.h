// The gallery's ids (gallery names, subject ids, face ids, request ids): what is accepted, and
// how new face ids are made.
//
// Contract
// - CheckId(): OK for 1..kMaxIdBytes bytes of valid UTF-8 with no control character (C0, DEL,
//   C1); else INVALID_ARGUMENT naming `what` and the reason ("face_ids 2: 300 bytes, the limit
//   is 256"). Pure, thread-safe.
// - NewFaceId(): 32 lowercase hex digits of a random 128-bit number (unique across replicas
//   without coordination). Thread-safe.
#ifndef ARCFACE_SERVER_GALLERY_IDS_H_
#define ARCFACE_SERVER_GALLERY_IDS_H_

#include <cstddef>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace arcface::gallery {

inline constexpr size_t kMaxIdBytes = 256;
// What an empty gallery name means.
inline constexpr char kDefaultGallery[] = "default";

absl::Status CheckId(absl::string_view what, absl::string_view id);

std::string NewFaceId();

}  // namespace arcface::gallery

#endif  // ARCFACE_SERVER_GALLERY_IDS_H_
