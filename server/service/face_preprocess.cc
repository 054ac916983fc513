#include "server/service/face_preprocess.h"

#include <limits>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "server/service/fault_injection.h"

namespace arcface::service {

absl::StatusOr<cv::Mat> DecodeFaceImage(const arcface::v1::Image& img,
                                        const image::Limits& limits) {
  switch (img.data_case()) {
    case arcface::v1::Image::kEncoded:
      return image::DecodeImage(img.encoded(), limits);
    case arcface::v1::Image::kRaw: {
      const arcface::v1::RawImage& raw = img.raw();
      image::PixelFormat format;
      switch (raw.format()) {
        case arcface::v1::RGB8:
          format = image::PixelFormat::kRgb8;
          break;
        case arcface::v1::BGR8:
          format = image::PixelFormat::kBgr8;
          break;
        case arcface::v1::GRAY8:
          format = image::PixelFormat::kGray8;
          break;
        default:
          return absl::InvalidArgumentError(
              absl::StrCat("raw image has unknown pixel format ", static_cast<int>(raw.format())));
      }
      constexpr uint32_t kMaxSide = std::numeric_limits<int>::max();
      if (raw.width() > kMaxSide || raw.height() > kMaxSide) {
        return absl::InvalidArgumentError(absl::StrCat("raw image is ", raw.width(), "x",
                                                       raw.height(), ", too large"));
      }
      return image::RawToRgb(raw.data(), static_cast<int>(raw.width()),
                             static_cast<int>(raw.height()), format, limits);
    }
    case arcface::v1::Image::DATA_NOT_SET:
      break;
  }
  return absl::InvalidArgumentError("no image (set image.encoded or image.raw)");
}

absl::Status WithContext(const absl::Status& status, absl::string_view context) {
  if (status.ok()) return status;
  return absl::Status(status.code(), absl::StrCat(context, ": ", status.message()));
}

absl::Status AppendFaceCrop(const arcface::v1::Face& face, const image::Limits& limits,
                            std::vector<uint8_t>* out, const model::CropGeometry& geometry) {
  if (absl::Status injected = FaultInjector::BeforeFace(); !injected.ok()) return injected;
  const int num_landmarks = face.landmarks_size();
  if (num_landmarks != 0 && num_landmarks != 5) {
    return absl::InvalidArgumentError(
        absl::StrCat("expected 5 landmarks, got ", num_landmarks));
  }
  absl::StatusOr<cv::Mat> rgb = DecodeFaceImage(face.image(), limits);
  if (!rgb.ok()) return rgb.status();

  absl::StatusOr<image::Crop> crop;
  if (num_landmarks == 5) {
    std::vector<image::Point> points;
    points.reserve(5);
    for (const arcface::v1::Point& p : face.landmarks()) points.push_back({p.x(), p.y()});
    crop = image::AlignFace(*rgb, points, geometry);
  } else if (face.has_box()) {
    const arcface::v1::Box& b = face.box();
    crop = image::CropBox(*rgb, image::Box{b.x_min(), b.y_min(), b.x_max(), b.y_max()}, limits,
                          geometry);
  } else {
    crop = image::ResizeWhole(*rgb, geometry);
  }
  if (!crop.ok()) return crop.status();
  if (crop->size() != geometry.bytes()) {
    return absl::InternalError(absl::StrCat("crop has ", crop->size(), " bytes"));
  }
  out->insert(out->end(), crop->begin(), crop->end());
  return absl::OkStatus();
}

}  // namespace arcface::service
