// IResNet: the fused-BN ArcFace backbone of docs/MODEL.md (py-feat / InsightFace ONNX form) as a
// libtorch module.
//
// Contract
// - Input [N,3,112,112] float RGB in [-1,1] (any floating dtype the module was moved to);
//   output [N,512] raw (not normalized) embeddings.
// - BuildIResNet creates the module for a checkpoint's block counts and copies every tensor of
//   the checkpoint into it; the set of checkpoint keys must equal the module's parameters and
//   buffers exactly (num_batches_tracked aside), else an error naming the key.
// - The module is in eval mode; callers run it under c10::InferenceMode. Forward is safe to
//   call from several threads at once (it has no mutable state in eval mode).
#ifndef ARCFACE_SERVER_MODEL_IRESNET_H_
#define ARCFACE_SERVER_MODEL_IRESNET_H_

#include <array>
#include <memory>

#include <torch/torch.h>

#include "absl/status/statusor.h"
#include "server/model/checkpoint.h"

namespace arcface::model {

// One residual block: bn1 → conv1 → prelu → conv2 (stride) → + shortcut(raw input).
class IBasicBlockImpl : public torch::nn::Module {
 public:
  IBasicBlockImpl(int64_t in_channels, int64_t channels, int64_t stride, bool downsample);
  torch::Tensor forward(const torch::Tensor& x);

 private:
  torch::nn::BatchNorm2d bn1_{nullptr};
  torch::nn::Conv2d conv1_{nullptr};
  torch::nn::PReLU prelu_{nullptr};
  torch::nn::Conv2d conv2_{nullptr};
  torch::nn::Conv2d downsample_{nullptr};  // null for identity shortcuts
};
TORCH_MODULE(IBasicBlock);

class IResNetImpl : public torch::nn::Module {
 public:
  explicit IResNetImpl(const std::array<int, 4>& blocks);
  torch::Tensor forward(const torch::Tensor& x);

  // Inference-only rewrites, each the same function up to float rounding; call after loading
  // the weights and before moving to another device or dtype.
  // FoldHead: bn2 → flatten → fc → features becomes one 7×7 convolution (both BNs folded into
  // fc's weights, computed in double). It runs on oneDNN like the other convolutions instead of
  // a BLAS GEMV (Debian's libtorch calls the reference BLAS there: 11 ms a face).
  void FoldHead();
  // Stores the convolution weights channels-last, matching channels-last activations, so
  // oneDNN does not reorder every weight on every call.
  void WeightsToChannelsLast();

 private:
  torch::Tensor head_weight_;  // [512, 512, 7, 7] once FoldHead() ran
  torch::Tensor head_bias_;    // [512]
  torch::nn::Conv2d conv1_{nullptr};
  torch::nn::PReLU prelu_{nullptr};
  std::array<torch::nn::Sequential, 4> layers_;
  torch::nn::BatchNorm2d bn2_{nullptr};
  torch::nn::Linear fc_{nullptr};
  torch::nn::BatchNorm1d features_{nullptr};
};
TORCH_MODULE(IResNet);

// Builds the network and loads `checkpoint` into it (float32, CPU, eval mode).
absl::StatusOr<IResNet> BuildIResNet(const Checkpoint& checkpoint);

}  // namespace arcface::model

#endif  // ARCFACE_SERVER_MODEL_IRESNET_H_
