// The network's fixed shapes (docs/MODEL.md): 112×112×3 uint8 RGB crops in (row-major HWC), 512
// float values out. The one definition of the crop size: the image code, which makes crops,
// and the model and engine, which consume them, may not depend on each other (OpenCV on one
// side, torch on the other), so both see this header-only, dependency-free target instead.
#ifndef ARCFACE_SERVER_MODEL_SHAPES_H_
#define ARCFACE_SERVER_MODEL_SHAPES_H_

#include <cstddef>

namespace arcface::model {

inline constexpr int kCropSize = 112;
inline constexpr size_t kCropBytes = size_t{kCropSize} * kCropSize * 3;
inline constexpr int kEmbeddingDim = 512;

}  // namespace arcface::model

#endif  // ARCFACE_SERVER_MODEL_SHAPES_H_
