// face-api's 68-point face landmark network in libtorch: four dense blocks of depthwise
// separable convolutions (ReLU), a 7×7 average pool and a fully connected layer giving 68 (x, y)
// pairs relative to its 112×112 input, from "face_landmark_68_model-weights_manifest.json".
// Also the choice of the five ArcFace points from the 68 (torch-free).
//
// Contract
// - Create() reads every tensor with its exact shape (errors name the tensor) and places the
//   network on `device`.
// - Forward() runs under the caller's c10::InferenceMode on the network's device, throws
//   c10::Error on torch failures, mutates nothing (concurrent calls are safe).
#ifndef ARCFACE_SERVER_DETECT_LANDMARK68_H_
#define ARCFACE_SERVER_DETECT_LANDMARK68_H_

#include <array>
#include <memory>

#include <torch/torch.h>

#include "absl/status/statusor.h"
#include "server/detect/tfjs_layers.h"
#include "server/model/tfjs_weights.h"
#include "server/image/image.h"

namespace arcface::detect {

class Landmark68Net {
 public:
  static constexpr int kInputSize = 112;
  static constexpr int kPoints = 68;

  static absl::StatusOr<std::unique_ptr<Landmark68Net>> Create(const model::TfjsWeights& weights,
                                                               torch::Device device);

  // `rgb`: [N, 112, 112, 3] float RGB in [0, 255] on the network's device. Returns [N, 136]:
  // x0, y0, x1, y1, ... as fractions of the input's side (0 = left/top edge, 1 = right/bottom).
  torch::Tensor Forward(const torch::Tensor& rgb) const;

 private:
  struct Separable {
    torch::Tensor depthwise, pointwise, bias;
  };
  struct DenseBlock {
    ConvWeights conv0;                   // dense0 only: a plain 3×3 convolution
    std::array<Separable, 4> separable;  // conv0 (dense1..3) .. conv3; [0] unused in dense0
  };

  Landmark68Net() = default;
  torch::Tensor Block(const torch::Tensor& x, const DenseBlock& block, bool first) const;

  std::array<DenseBlock, 4> dense_;
  torch::Tensor fc_weight_, fc_bias_;  // [256, 136], [136]
  torch::Tensor mean_rgb_;             // [3], on the device
};

// The five ArcFace points (left eye, right eye, nose tip, left and right mouth corners; "left"
// is the image's left, the subject's right) from 68 iBUG points: the eye centres are the means
// of points 36-41 and 42-47, the nose tip 30, the mouth corners 48 and 54 (0-based).
std::array<image::Point, 5> FivePointsFrom68(const std::array<image::Point, 68>& points);

}  // namespace arcface::detect

#endif  // ARCFACE_SERVER_DETECT_LANDMARK68_H_
