// face-api's Tiny Face Detector in libtorch: a Tiny-YOLOv2 with depthwise separable
// convolutions (leaky ReLU 0.1, max pooling) and one face class over five anchor boxes per cell
// of a (size/32)² grid, from "tiny_face_detector_model-weights_manifest.json" and its shard.
//
// Contract
// - Create() reads every tensor with its exact shape (errors name the tensor) and places the
//   network on `device`.
// - Forward() runs under the caller's c10::InferenceMode on the network's device, throws
//   c10::Error on torch failures, mutates nothing (concurrent calls are safe).
#ifndef ARCFACE_SERVER_DETECT_TINY_FACE_DETECTOR_H_
#define ARCFACE_SERVER_DETECT_TINY_FACE_DETECTOR_H_

#include <array>
#include <memory>

#include <torch/torch.h>

#include "absl/status/statusor.h"
#include "server/detect/tfjs_layers.h"
#include "server/model/tfjs_weights.h"

namespace arcface::detect {

class TinyFaceDetector {
 public:
  static constexpr int kDefaultInputSize = 416;  // any multiple of 32 works
  static constexpr int kAnchors = 5;
  static constexpr int kBoxEncoding = 5;  // tx, ty, tw, th, objectness

  static absl::StatusOr<std::unique_ptr<TinyFaceDetector>> Create(const model::TfjsWeights& weights,
                                                                  torch::Device device);

  // `rgb`: [B, S, S, 3] float RGB in [0, 255] on the network's device, S a multiple of 32.
  // Returns the raw grid [B, S/32, S/32, 25] (NHWC, face-api's layout: 5 anchors × 5 values).
  torch::Tensor Forward(const torch::Tensor& rgb) const;

 private:
  struct Separable {
    torch::Tensor depthwise, pointwise, bias;
  };

  TinyFaceDetector() = default;

  ConvWeights conv0_;
  std::array<Separable, 5> separable_;  // conv1 .. conv5
  ConvWeights conv8_;
  torch::Tensor mean_rgb_;  // [3], on the device
};

}  // namespace arcface::detect

#endif  // ARCFACE_SERVER_DETECT_TINY_FACE_DETECTOR_H_
