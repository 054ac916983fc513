// The int8 calibration crops (crops.u8, written by tests/data/make_int8_calibration_crops.py),
// compiled into the binary so that --precision int8 needs no file beside the server.
#include "server/engine/int8_calibration/crops.h"

// ARCFACE_CALIBRATION_CROPS is the file's absolute path, set by CMake.
asm(".pushsection .rodata\n"
    ".balign 64\n"
    "arcface_int8_calibration_crops_begin:\n"
    ".incbin \"" ARCFACE_CALIBRATION_CROPS "\"\n"
    "arcface_int8_calibration_crops_end:\n"
    ".popsection\n");

extern "C" const uint8_t arcface_int8_calibration_crops_begin[];
extern "C" const uint8_t arcface_int8_calibration_crops_end[];

namespace arcface::engine {

absl::Span<const uint8_t> Int8CalibrationCrops() {
  return absl::Span<const uint8_t>(arcface_int8_calibration_crops_begin,
                                   static_cast<size_t>(arcface_int8_calibration_crops_end -
                                                       arcface_int8_calibration_crops_begin));
}

}  // namespace arcface::engine
