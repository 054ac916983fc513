// DlibResNet: dlib's ResNet face descriptor (dlib_face_recognition_resnet_model_v1, as face-api's
// face_recognition_model ships it; docs/MODEL.md, "The dlib family") as a libtorch module.
//
// Contract
// - Input [N, 3, 150, 150] float32 RGB, already normalised as dlib's input layer does it:
//   (x − mean) / 256 per channel, mean kDlibMeanRgb (DlibNormalize); output [N, 128], the raw
//   descriptor (dlib's own; close to unit length, not normalised).
// - BuildDlibResNet copies a kDlibResNet Checkpoint (dlib_weights.h) into the module, folding
//   each convolution's per-channel scale into its kernel and bias (in double); the layout is
//   converted from TF's HWIO to OIHW. A checkpoint of another family is INVALID_ARGUMENT.
// - The module is float32 on the CPU until moved; callers run it under c10::InferenceMode.
//   Forward has no mutable state and may run on several threads at once.
#ifndef ARCFACE_SERVER_MODEL_DLIB_RESNET_H_
#define ARCFACE_SERVER_MODEL_DLIB_RESNET_H_

#include <array>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "absl/status/statusor.h"
#include "server/model/checkpoint.h"

namespace arcface::model {

// dlib's input_rgb_image_sized<150> (dlib/dnn/input.h): these means per channel, then / 256.
// (face-api divides by 255 instead; docs/MODEL.md says why this server follows dlib.)
inline constexpr std::array<float, 3> kDlibMeanRgb = {122.782f, 117.001f, 104.298f};
inline constexpr float kDlibInputScale = 256.0f;

// [N, 3, H, W] float RGB in 0..255 → the network's input.
torch::Tensor DlibNormalize(const torch::Tensor& rgb);

class DlibResNetImpl : public torch::nn::Module {
 public:
  explicit DlibResNetImpl(const Checkpoint& checkpoint);
  torch::Tensor forward(const torch::Tensor& x);

 private:
  struct Conv {
    torch::Tensor weight;  // [out, in, k, k], the scale folded in
    torch::Tensor bias;    // [out]
  };
  struct Block {
    Conv conv1, conv2;
    bool down;
  };
  Conv MakeConv(const Checkpoint& checkpoint, const std::string& name);

  Conv stem_;
  std::vector<Block> blocks_;
  torch::Tensor fc_;  // [256, 128]
};
TORCH_MODULE(DlibResNet);

// Builds the network from a validated kDlibResNet checkpoint (float32, CPU, eval mode).
absl::StatusOr<DlibResNet> BuildDlibResNet(const Checkpoint& checkpoint);

}  // namespace arcface::model

#endif  // ARCFACE_SERVER_MODEL_DLIB_RESNET_H_
