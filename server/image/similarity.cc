#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <opencv2/core.hpp>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "server/image/image.h"

namespace arcface::image {

std::array<Point, 5> Template(const model::CropGeometry& geometry) {
  std::array<Point, 5> points;
  for (size_t i = 0; i < points.size(); ++i) {
    points[i] = {geometry.landmarks[i][0], geometry.landmarks[i][1]};
  }
  return points;
}

const std::array<Point, 5>& ArcFaceTemplate() {
  static const std::array<Point, 5> kTemplate = Template(model::kArcFaceCrop);
  return kTemplate;
}

absl::StatusOr<cv::Matx23d> EstimateSimilarity(absl::Span<const Point> src,
                                               absl::Span<const Point> dst) {
  if (src.size() != dst.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("similarity needs as many source as destination points, got ", src.size(),
                     " and ", dst.size()));
  }
  const size_t n = src.size();
  if (n < 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("similarity needs at least 2 point pairs, got ", n));
  }
  for (size_t i = 0; i < n; ++i) {
    if (!std::isfinite(src[i].x) || !std::isfinite(src[i].y) || !std::isfinite(dst[i].x) ||
        !std::isfinite(dst[i].y)) {
      return absl::InvalidArgumentError(absl::StrCat("point pair ", i, " is not finite"));
    }
  }

  double src_mean_x = 0, src_mean_y = 0, dst_mean_x = 0, dst_mean_y = 0;
  for (size_t i = 0; i < n; ++i) {
    src_mean_x += src[i].x;
    src_mean_y += src[i].y;
    dst_mean_x += dst[i].x;
    dst_mean_y += dst[i].y;
  }
  src_mean_x /= n;
  src_mean_y /= n;
  dst_mean_x /= n;
  dst_mean_y /= n;

  // Umeyama's SVD of the 2×2 cross-covariance reduces, for a proper rotation in the plane, to a
  // closed form: the rotation maximizing trace(Rᵀ·Σ) has cos ∝ a and sin ∝ b below, and the
  // maximum, sqrt(a² + b²), is Umeyama's trace(D·S). So s·R = [a −b; b a] / Σ|p'|². This also
  // covers the cases Umeyama special-cases (rank-deficient Σ, det Σ < 0): the result is still
  // the best proper rotation, never a reflection.
  double src_spread = 0, dst_spread = 0, a = 0, b = 0;
  double max_abs = 0;
  for (size_t i = 0; i < n; ++i) {
    const double px = src[i].x - src_mean_x, py = src[i].y - src_mean_y;
    const double qx = dst[i].x - dst_mean_x, qy = dst[i].y - dst_mean_y;
    src_spread += px * px + py * py;
    dst_spread += qx * qx + qy * qy;
    a += px * qx + py * qy;
    b += px * qy - py * qx;
    max_abs = std::max({max_abs, std::fabs(double{src[i].x}), std::fabs(double{src[i].y})});
  }
  // Coincident points have no orientation or scale to match. The threshold is relative to the
  // coordinates' magnitude (float landmarks carry ~1e-7 relative precision) so points that are
  // equal up to rounding count as coincident wherever they lie.
  const double src_rms = std::sqrt(src_spread / n);
  const double dst_rms = std::sqrt(dst_spread / n);
  if (!(src_rms > 1e-6 * (1.0 + max_abs))) {
    return absl::InvalidArgumentError("degenerate landmarks: the source points (nearly) coincide");
  }
  if (!(dst_rms > 0)) {
    return absl::InvalidArgumentError("degenerate landmarks: the destination points coincide");
  }
  // a = b = 0 (every rotation fits equally badly) would give scale 0, a non-invertible warp.
  const double fit = std::hypot(a, b);
  if (!(fit > 1e-12 * std::sqrt(src_spread * dst_spread))) {
    return absl::InvalidArgumentError(
        "degenerate landmarks: no rotation and scale relates source and destination points");
  }
  const double sc = a / src_spread;  // s·cos θ
  const double ss = b / src_spread;  // s·sin θ
  const double tx = dst_mean_x - (sc * src_mean_x - ss * src_mean_y);
  const double ty = dst_mean_y - (ss * src_mean_x + sc * src_mean_y);
  const cv::Matx23d m(sc, -ss, tx, ss, sc, ty);
  for (int i = 0; i < 6; ++i) {
    if (!std::isfinite(m.val[i])) {
      return absl::InvalidArgumentError("degenerate landmarks: the transform is not finite");
    }
  }
  return m;
}

}  // namespace arcface::image
