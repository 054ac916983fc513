#include "server/app/detector_model.h"

#include <exception>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace arcface::app {

absl::StatusOr<detect::PreparedFrame> DetectorModel::Prepare(
    const cv::Mat& rgb, const detect::DetectFilter& filter) const {
  try {
    return detector_->Prepare(rgb, filter);
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("the detector threw preparing a frame: ", e.what()));
  }
}

absl::StatusOr<std::vector<std::vector<detect::DetectedBox>>> DetectorModel::Run(
    absl::Span<const detect::PreparedFrame* const> frames) {
  try {
    return detector_->Detect(frames);
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("the detector threw: ", e.what()));
  }
}

}  // namespace arcface::app
