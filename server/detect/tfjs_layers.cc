#include "server/detect/tfjs_layers.h"

#include <algorithm>
#include <limits>

#include "absl/strings/str_cat.h"

namespace arcface::detect {

torch::Tensor KernelReader::Read(const std::string& name, const std::vector<int64_t>& shape) {
  if (!status_.ok()) return {};
  absl::StatusOr<const model::TfjsTensor*> tensor = weights_.Get(name, shape);
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

// A "same" window over x (NCHW, any memory format): the padding that conv2d or max_pool2d can
// add itself when it is symmetric, else x padded explicitly with `value` (padding 0 left).
struct Padded {
  torch::Tensor x;
  std::vector<int64_t> padding;
};

Padded PadSame(const torch::Tensor& x, int64_t kernel, int64_t stride, double value) {
  const auto [top, bottom] = SamePadding(x.size(2), kernel, stride);
  const auto [left, right] = SamePadding(x.size(3), kernel, stride);
  if (top == bottom && left == right) return {x, {top, left}};
  // constant_pad_nd returns NCHW-contiguous: back to x's layout (channels-last stays so).
  torch::Tensor padded = torch::constant_pad_nd(x, {left, right, top, bottom}, value)
                             .contiguous(x.suggest_memory_format());
  return {padded, {0, 0}};
}

}  // namespace

torch::Tensor ConvSame(const torch::Tensor& x, const torch::Tensor& weight,
                       const torch::Tensor& bias, int64_t stride) {
  const Padded p = PadSame(x, weight.size(2), stride, 0);
  return torch::conv2d(p.x, weight, bias, stride, p.padding);
}

torch::Tensor DepthwiseSame(const torch::Tensor& x, const torch::Tensor& weight,
                            const torch::Tensor& bias, int64_t stride) {
  const Padded p = PadSame(x, weight.size(2), stride, 0);
  return torch::conv2d(p.x, weight, bias, stride, p.padding, /*dilation=*/1,
                       /*groups=*/weight.size(0));
}

torch::Tensor MaxPoolSame(const torch::Tensor& x, int64_t kernel, int64_t stride) {
  // max_pool2d's own padding is implicit -inf, as TF's "same" pooling.
  const Padded p = PadSame(x, kernel, stride, -std::numeric_limits<double>::infinity());
  return torch::max_pool2d(p.x, kernel, stride, p.padding);
}

}  // namespace arcface::detect
