// The TensorFlow(.js) layers face-api's networks are made of, in libtorch: kernels moved from
// TF's layouts to torch's, and convolutions with TF's "same" padding.
//
// Contract
// - KernelReader copies tensors out of a TfjsWeights (which may be dropped afterwards) into CPU
//   tensors (networks fold and then move them to their device). Each read checks the name and
//   the exact TF shape; the first failure is kept, later reads return undefined tensors, and
//   status() names the network and the tensor.
// - The functions are pure torch ops on NCHW float tensors (any memory format, kept); callers
//   run them under c10::InferenceMode and catch torch's exceptions (c10::Error).
#ifndef ARCFACE_SERVER_DETECT_TFJS_LAYERS_H_
#define ARCFACE_SERVER_DETECT_TFJS_LAYERS_H_

#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include "absl/status/status.h"
#include "server/model/tfjs_weights.h"

namespace arcface::detect {

// The networks run channels-last (NHWC in memory, as their input arrives and as oneDNN and
// cuDNN convolve fastest): kernels too, so that no call reorders them.
inline torch::Tensor ToDevice(const torch::Tensor& t, torch::Device device) {
  torch::Tensor moved = t.to(device);
  return moved.dim() == 4 ? moved.contiguous(at::MemoryFormat::ChannelsLast) : moved;
}

// A convolution's kernel (torch layout) and bias.
struct ConvWeights {
  torch::Tensor weight, bias;
  void To(torch::Device device) {
    weight = ToDevice(weight, device);
    bias = ToDevice(bias, device);
  }
};

class KernelReader {
 public:
  // `network` prefixes every error ("ssd_mobilenetv1: ...").
  KernelReader(const model::TfjsWeights& weights, std::string network)
      : weights_(weights), network_(std::move(network)) {}

  // A conv kernel stored HWIO [k, k, in, out], returned OIHW [out, in, k, k].
  torch::Tensor Conv(const std::string& name, int64_t k, int64_t in, int64_t out);
  // A depthwise kernel stored [k, k, channels, 1], returned [channels, 1, k, k].
  torch::Tensor Depthwise(const std::string& name, int64_t k, int64_t channels);
  // A tensor of `shape` as stored (vectors, matrices, prior boxes).
  torch::Tensor Plain(const std::string& name, std::vector<int64_t> shape);

  absl::Status status() const { return status_; }

 private:
  torch::Tensor Read(const std::string& name, const std::vector<int64_t>& shape);

  const model::TfjsWeights& weights_;
  const std::string network_;
  absl::Status status_;
};

// TF's "same" padding: output ceil(in / stride); the padding that takes goes mostly after
// (bottom, right), which differs from torch's symmetric padding when the stride is 2.
// Returns {before, after} for one axis.
std::pair<int64_t, int64_t> SamePadding(int64_t in, int64_t kernel, int64_t stride);

// conv2d with TF "same" padding (`bias` may be undefined).
torch::Tensor ConvSame(const torch::Tensor& x, const torch::Tensor& weight,
                       const torch::Tensor& bias, int64_t stride);
// Depthwise conv2d (a [C,1,k,k] kernel) with TF "same" padding (`bias` may be undefined).
torch::Tensor DepthwiseSame(const torch::Tensor& x, const torch::Tensor& weight,
                            const torch::Tensor& bias, int64_t stride);

// max_pool2d with TF "same" padding (the padding never wins the max).
torch::Tensor MaxPoolSame(const torch::Tensor& x, int64_t kernel, int64_t stride);

}  // namespace arcface::detect

#endif  // ARCFACE_SERVER_DETECT_TFJS_LAYERS_H_
