// Face preprocessing: turns an API Face (encoded or raw image, plus optional box or five
// landmarks) into the crop a model consumes (its model::CropGeometry: ArcFace's 112×112×3 RGB),
// per docs/MODEL.md: 5 landmarks → aligned to the geometry's template; else a box → that
// region, cropped and resized; else the whole image.
//
// Contract
// - Errors are INVALID_ARGUMENT with the reason (never naming the face index: callers prefix
//   it with WithContext, e.g. "face 3: undecodable image: ..."); INTERNAL only when OpenCV
//   fails on input already validated, or when the fault-injection test hook says so
//   (fault_injection.h). Cheap checks (landmark count, pixel format, sizes) come
//   before any decoding.
// - CPU-bound and synchronous; pure (thread-safe, no state). The Face is borrowed for the call.
#ifndef ARCFACE_SERVER_SERVICE_FACE_PREPROCESS_H_
#define ARCFACE_SERVER_SERVICE_FACE_PREPROCESS_H_

#include <cstdint>
#include "absl/strings/string_view.h"
#include <vector>

#include "absl/status/status.h"
#include "arcface/v1/face_embedding.pb.h"
#include "server/image/image.h"

namespace arcface::service {

// The image as sent (encoded, or raw pixels of a known format) decoded into RGB (CV_8UC3), within
// `limits`; the frame of a Detect, the image of a face.
absl::StatusOr<cv::Mat> DecodeFaceImage(const arcface::v1::Image& image,
                                        const image::Limits& limits);

// Appends the face's crop (geometry.bytes()) to *out; on error *out is unchanged.
absl::Status AppendFaceCrop(const arcface::v1::Face& face, const image::Limits& limits,
                            std::vector<uint8_t>* out,
                            const model::CropGeometry& geometry = model::kArcFaceCrop);

// The same status with "<context>: " before its message (OK stays OK).
absl::Status WithContext(const absl::Status& status, absl::string_view context);

}  // namespace arcface::service

#endif  // ARCFACE_SERVER_SERVICE_FACE_PREPROCESS_H_
