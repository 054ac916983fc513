// The network's fixed shapes (docs/MODEL.md): 112×112×3 uint8 RGB crops in (row-major HWC), 512
// float values out; and the crop geometry of each model family (CropGeometry). The one definition
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

}  // namespace arcface::model

#endif  // ARCFACE_SERVER_MODEL_SHAPES_H_
