#include "server/detect/tiny_face_detector.h"

#include <string>

#include "absl/strings/str_cat.h"

namespace arcface::detect {

namespace {

// The mean RGB face-api subtracts before dividing by 255.
constexpr std::array<float, 3> kMeanRgb = {117.001, 114.697, 97.404};
constexpr std::array<int64_t, 6> kChannels = {16, 32, 64, 128, 256, 512};

torch::Tensor Leaky(const torch::Tensor& x) { return torch::leaky_relu(x, 0.1); }

}  // namespace

absl::StatusOr<std::unique_ptr<TinyFaceDetector>> TinyFaceDetector::Create(
    const model::TfjsWeights& weights, torch::Device device) {
  std::unique_ptr<TinyFaceDetector> net(new TinyFaceDetector());
  KernelReader read(weights, "tiny_face_detector");
  net->conv0_ = {read.Conv("conv0/filters", 3, 3, kChannels[0]),
                 read.Plain("conv0/bias", {kChannels[0]})};
  for (size_t i = 0; i < net->separable_.size(); ++i) {
    const std::string prefix = absl::StrCat("conv", i + 1, "/");
    const int64_t in = kChannels[i], out = kChannels[i + 1];
    net->separable_[i] = {read.Depthwise(prefix + "depthwise_filter", 3, in),
                          read.Conv(prefix + "pointwise_filter", 1, in, out),
                          read.Plain(prefix + "bias", {out})};
  }
  net->conv8_ = {read.Conv("conv8/filters", 1, kChannels[5], kAnchors * kBoxEncoding),
                 read.Plain("conv8/bias", {kAnchors * kBoxEncoding})};
  if (!read.status().ok()) return read.status();

  net->conv0_.To(device);
  for (Separable& s : net->separable_) {
    s.depthwise = ToDevice(s.depthwise, device);
    s.pointwise = ToDevice(s.pointwise, device);
    s.bias = ToDevice(s.bias, device);
  }
  net->conv8_.To(device);
  net->mean_rgb_ = torch::tensor(at::ArrayRef<float>(kMeanRgb.data(), kMeanRgb.size())).to(device);
  return net;
}

torch::Tensor TinyFaceDetector::Forward(const torch::Tensor& rgb) const {
  // NHWC in memory is NCHW channels-last: a view, no copy.
  torch::Tensor x =
      ((rgb - mean_rgb_) / 255).permute({0, 3, 1, 2}).contiguous(at::MemoryFormat::ChannelsLast);
  // face-api's first layer is a plain 3×3 convolution without padding ("valid").
  x = Leaky(torch::conv2d(x, conv0_.weight, conv0_.bias));
  for (const Separable& s : separable_) {
    x = MaxPoolSame(x, 2, 2);
    // face-api pads by one on every side and convolves "valid": "same" at stride 1.
    x = DepthwiseSame(x, s.depthwise, {}, 1);
    x = Leaky(torch::conv2d(x, s.pointwise, s.bias));
  }
  x = MaxPoolSame(x, 2, 1);
  x = torch::conv2d(x, conv8_.weight, conv8_.bias);
  return x.permute({0, 2, 3, 1}).contiguous();
}

}  // namespace arcface::detect
