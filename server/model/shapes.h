// The networks' fixed shapes (docs/MODEL.md): ArcFace's 112×112×3 uint8 RGB crops in (row-major
// HWC), 512 float values out; dlib's 150×150 chips, 128 values out; and the crop geometry of each
// model family (CropGeometry). The one definition
// of the crop size: the image code, which makes crops, and the model and engine, which consume
// them, may not depend on each other (OpenCV on one side, torch on the other), so both see this
// header-only, dependency-free target instead.
#ifndef ARCFACE_SERVER_MODEL_SHAPES_H_
#define ARCFACE_SERVER_MODEL_SHAPES_H_

#include <array>
#include <cstddef>

namespace arcface::model {

inline constexpr int kCropSize = 112;
inline constexpr size_t kCropBytes = size_t{kCropSize} * kCropSize * 3;
inline constexpr int kEmbeddingDim = 512;

// The crop a model family consumes: a square of `size` × `size` RGB pixels (HWC, row-major), and
// where alignment puts the five landmarks (left eye, right eye, nose tip, left and right mouth
// corner), in that square's pixels. A whole image or a box is resized to the square; five
// landmarks are mapped onto `landmarks` by a similarity transform (image::AlignFace).
struct CropGeometry {
  int size;
  std::array<std::array<float, 2>, 5> landmarks;

  constexpr size_t bytes() const { return size_t(size) * size * 3; }
};

// ArcFace's: InsightFace's arcface_dst (face_align.py) in 112×112.
inline constexpr CropGeometry kArcFaceCrop = {kCropSize,
                                              {{{38.2946f, 51.6963f},
                                                {73.5318f, 51.5014f},
                                                {56.0252f, 71.7366f},
                                                {41.5493f, 92.3655f},
                                                {70.7299f, 92.2041f}}}};

// dlib's face chip (get_face_chip_details(det, 150, 0.25), the chip dlib_face_recognition's
// descriptor was trained on), for five points: dlib fits a similarity transform from its mean
// face shape (points 17..67 of the 68, in [0, 1]; the header's mean_face_shape_x/y), placed at
// q = (0.25 + m) / 1.5 · 150, to the 68 landmarks, then extracts the chip from a rectangle whose
// corners map to pixels 0 and 149, not 0 and 150: a point q lands on 74.5 + 149s / (150s − 1) ·
// (q − 75), with s the image's pixels per chip pixel. At s = 1 that is q − 0.5 = 100·m + 24.5,
// the numbers below; at the five points other scales move it by under 0.2 px for s ≥ 1 (a face
// larger in the image than in the chip) and 0.35 px at s = 0.36 (the mean of dlib's upsampled
// example faces). The five points are the mean shape's eye centres (mean of points 36–41 and
// 42–47), nose tip (30) and mouth corners (48, 54). tests/reference/test_dlib_ref.py recomputes
// them from dlib's header, and dlib_chip_test has dlib's own chip of an exact mean face put them
// there (and at the formula's places for other s); docs/MODEL.md: how close real chips come.
inline constexpr int kDlibChipSize = 150;
inline constexpr int kDlibEmbeddingDim = 128;
inline constexpr CropGeometry kDlibChip = {kDlibChipSize,
                                           {{{47.0492f, 46.0990f},
                                             {99.9761f, 46.0990f},
                                             {73.5127f, 76.0625f},
                                             {49.9149f, 102.5233f},
                                             {97.1104f, 102.5233f}}}};

}  // namespace arcface::model

#endif  // ARCFACE_SERVER_MODEL_SHAPES_H_
