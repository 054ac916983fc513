// face-api's SSD-MobileNetV1 face detector in libtorch: a MobileNetV1 backbone (depthwise and
// pointwise convolutions, ReLU6), the SSD feature layers and six box predictors over 5118 prior
// boxes, from the TF.js files "ssd_mobilenetv1_model-weights_manifest.json" and its shard.
//
// Contract
// - Create() reads every tensor it needs with its exact shape (errors name the tensor), folds
//   the depthwise batch norms into their kernels and places the network on `device`.
// - Forward() runs under the caller's c10::InferenceMode, on the network's device, and throws
//   c10::Error on torch failures (callers catch). It mutates nothing: concurrent calls are safe.
// - Outputs are the raw predictions, before decoding (box_decoding.h), in face-api's order:
//   anchors by predictor, then row, column and anchor of the feature map.
#ifndef ARCFACE_SERVER_DETECT_SSD_MOBILENET_H_
#define ARCFACE_SERVER_DETECT_SSD_MOBILENET_H_

#include <array>
#include <memory>
#include <vector>

#include <torch/torch.h>

#include "absl/status/statusor.h"
#include "server/detect/tfjs_layers.h"
#include "server/model/tfjs_weights.h"

namespace arcface::detect {

class SsdMobilenetV1 {
 public:
  static constexpr int kInputSize = 512;  // fixed: the priors are for this size
  static constexpr int kNumAnchors = 5118;

  struct Output {
    torch::Tensor box_encodings;  // [B, 5118, 4]: (ty, tx, th, tw) against the priors
    torch::Tensor class_logits;   // [B, 5118, 3]: background, face, (unused); face-api uses [1]
  };

  static absl::StatusOr<std::unique_ptr<SsdMobilenetV1>> Create(const model::TfjsWeights& weights,
                                                                torch::Device device);

  // `rgb`: [B, 512, 512, 3] float RGB in [0, 255] on the network's device (NHWC, as stored).
  Output Forward(const torch::Tensor& rgb) const;

  // The prior boxes, kNumAnchors × (y_min, x_min, y_max, x_max) relative to the input; host.
  const std::vector<float>& priors() const { return priors_; }

 private:
  struct Predictor {
    ConvWeights box, cls;
  };

  SsdMobilenetV1() = default;

  ConvWeights conv0_;
  std::array<ConvWeights, 13> depthwise_;  // conv_1 .. conv_13, batch norm folded in
  std::array<ConvWeights, 13> pointwise_;
  std::array<ConvWeights, 8> extra_;       // the SSD feature layers (Prediction/Conv2d_0..7)
  std::array<Predictor, 6> predictors_;
  std::vector<float> priors_;
};

}  // namespace arcface::detect

#endif  // ARCFACE_SERVER_DETECT_SSD_MOBILENET_H_
