#include "server/detect/tfjs_layers.h"

#include <algorithm>
#include <limits>

#include "absl/strings/str_cat.h"

namespace arcface::detect {

torch::Tensor KernelReader::Read(const std::string& name, const std::vector<int64_t>& shape) {
  if (!status_.ok()) return {};
  absl::StatusOr<const TfjsTensor*> tensor = weights_.Get(name, shape);
  if (!tensor.ok()) {
    status_ = absl::Status(tensor.status().code(),
                           absl::StrCat(network_, ": ", tensor.status().message()));
    return {};
  }
  // A copy: the network owns its tensors, the loader may go.
  return torch::tensor(at::ArrayRef<float>((*tensor)->values), torch::kFloat32).reshape(shape);
}

torch::Tensor KernelReader::Conv(const std::string& name, int64_t k, int64_t in, int64_t out) {
  torch::Tensor t = Read(name, {k, k, in, out});
  if (!t.defined()) return t;
  return t.permute({3, 2, 0, 1}).contiguous();
}

torch::Tensor KernelReader::Depthwise(const std::string& name, int64_t k, int64_t channels) {
  torch::Tensor t = Read(name, {k, k, channels, 1});
  if (!t.defined()) return t;
  return t.permute({2, 3, 0, 1}).contiguous();
}

torch::Tensor KernelReader::Plain(const std::string& name, std::vector<int64_t> shape) {
  return Read(name, shape);
}

std::pair<int64_t, int64_t> SamePadding(int64_t in, int64_t kernel, int64_t stride) {
  const int64_t out = (in + stride - 1) / stride;
  const int64_t total = std::max<int64_t>((out - 1) * stride + kernel - in, 0);
  return {total / 2, total - total / 2};
}

namespace {

// Pads x (NCHW) with `value` for a "same" window of `kernel` with `stride`.
torch::Tensor PadSame(const torch::Tensor& x, int64_t kernel, int64_t stride, double value = 0) {
  const auto [top, bottom] = SamePadding(x.size(2), kernel, stride);
  const auto [left, right] = SamePadding(x.size(3), kernel, stride);
  if (top == 0 && bottom == 0 && left == 0 && right == 0) return x;
  return torch::constant_pad_nd(x, {left, right, top, bottom}, value);
}

}  // namespace

torch::Tensor ConvSame(const torch::Tensor& x, const torch::Tensor& weight,
                       const torch::Tensor& bias, int64_t stride) {
  return torch::conv2d(PadSame(x, weight.size(2), stride), weight, bias, stride);
}

torch::Tensor DepthwiseSame(const torch::Tensor& x, const torch::Tensor& weight,
                            const torch::Tensor& bias, int64_t stride) {
  return torch::conv2d(PadSame(x, weight.size(2), stride), weight, bias, stride,
                       /*padding=*/at::IntArrayRef{0}, /*dilation=*/1, /*groups=*/weight.size(0));
}

torch::Tensor MaxPoolSame(const torch::Tensor& x, int64_t kernel, int64_t stride) {
  return torch::max_pool2d(PadSame(x, kernel, stride, -std::numeric_limits<double>::infinity()),
                           kernel, stride);
}

}  // namespace arcface::detect
