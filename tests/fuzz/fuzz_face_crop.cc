// Fuzz target: the bytes of one arcface.v1.Face message → AppendFaceCrop, the server's own
// preprocessing of every face (encoded or raw image; five landmarks, a box, or the whole image).
//
// The pixel cap is 4 MP instead of the server's 40 MP default: DecodeImage refuses an image from
// its header when width × height is over the cap, before any pixel is decoded, so the cap only
// bounds how much work one input may cost (a few hundred bytes can declare 40 MP, a second of
// libjpeg or libtiff work natively and several under ASan), not which of our paths run. At 40 MP
// such inputs would dominate the run and trip -timeout on a loaded machine; the cost of a
// decode at the real cap belongs to the deadline tests, not to the fuzzer.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include <opencv2/core.hpp>

#include "absl/status/status.h"
#include "arcface/v1/face_embedding.pb.h"
#include "server/image/image.h"
#include "server/service/face_preprocess.h"

namespace {

void Fail(const char* what, const absl::Status& status) {
  std::fprintf(stderr, "fuzz_face_crop: %s: %s\n", what, status.ToString().c_str());
  std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // OpenCV is not instrumented: its worker threads would add nothing but scheduling noise.
  cv::setNumThreads(1);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  arcface::v1::Face face;
  if (!face.ParseFromArray(data, static_cast<int>(size))) return -1;  // not a Face: not kept

  arcface::image::Limits limits;
  limits.max_pixels = 4'000'000;
  std::vector<uint8_t> crops = {1, 2, 3};  // what a caller appended before this face
  const absl::Status status = arcface::service::AppendFaceCrop(face, limits, &crops);
  // face_preprocess.h: an error leaves *out unchanged; success appends exactly one crop.
  if (status.ok()) {
    if (crops.size() != 3 + arcface::image::kCropBytes) Fail("wrong crop size", status);
  } else {
    if (crops.size() != 3) Fail("an error changed the output", status);
    // INTERNAL means OpenCV failed on input the library had validated: a validation gap.
    if (status.code() != absl::StatusCode::kInvalidArgument || status.message().empty()) {
      Fail("not INVALID_ARGUMENT with a reason", status);
    }
  }
  return 0;
}
