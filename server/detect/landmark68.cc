#include "server/detect/landmark68.h"

#include <string>

#include "absl/strings/str_cat.h"

namespace arcface::detect {

namespace {

// The mean RGB face-api's feature extractor subtracts before dividing by 255.
constexpr std::array<float, 3> kMeanRgb = {122.782, 117.001, 104.298};
// Output channels of dense0 .. dense3 (the input has 3).
constexpr std::array<int64_t, 5> kChannels = {3, 32, 64, 128, 256};

}  // namespace

absl::StatusOr<std::unique_ptr<Landmark68Net>> Landmark68Net::Create(
    const model::TfjsWeights& weights, torch::Device device) {
  std::unique_ptr<Landmark68Net> net(new Landmark68Net());
  KernelReader read(weights, "face_landmark_68");
  for (int b = 0; b < 4; ++b) {
    const int64_t in = kChannels[b], out = kChannels[b + 1];
    DenseBlock& block = net->dense_[b];
    for (int c = 0; c < 4; ++c) {
      const std::string prefix = absl::StrCat("dense", b, "/conv", c, "/");
      if (b == 0 && c == 0) {
        block.conv0 = {read.Conv(prefix + "filters", 3, in, out),
                       read.Plain(prefix + "bias", {out})};
        continue;
      }
      const int64_t conv_in = c == 0 ? in : out;
      block.separable[c] = {read.Depthwise(prefix + "depthwise_filter", 3, conv_in),
                            read.Conv(prefix + "pointwise_filter", 1, conv_in, out),
                            read.Plain(prefix + "bias", {out})};
    }
  }
  net->fc_weight_ = read.Plain("fc/weights", {kChannels[4], 2 * kPoints});
  net->fc_bias_ = read.Plain("fc/bias", {2 * kPoints});
  if (!read.status().ok()) return read.status();

  for (DenseBlock& block : net->dense_) {
    if (block.conv0.weight.defined()) block.conv0.To(device);
    for (Separable& s : block.separable) {
      if (!s.depthwise.defined()) continue;
      s.depthwise = ToDevice(s.depthwise, device);
      s.pointwise = ToDevice(s.pointwise, device);
      s.bias = ToDevice(s.bias, device);
    }
  }
  net->fc_weight_ = ToDevice(net->fc_weight_, device);
  net->fc_bias_ = ToDevice(net->fc_bias_, device);
  net->mean_rgb_ = torch::tensor(at::ArrayRef<float>(kMeanRgb.data(), kMeanRgb.size())).to(device);
  return net;
}

torch::Tensor Landmark68Net::Block(const torch::Tensor& x, const DenseBlock& block,
                                   bool first) const {
  auto separable = [](const torch::Tensor& in, const Separable& s, int64_t stride) {
    return torch::conv2d(DepthwiseSame(in, s.depthwise, {}, stride), s.pointwise, s.bias);
  };
  const torch::Tensor out1 =
      torch::relu(first ? ConvSame(x, block.conv0.weight, block.conv0.bias, 2)
                        : separable(x, block.separable[0], 2));
  const torch::Tensor out2 = separable(out1, block.separable[1], 1);
  const torch::Tensor out3 = separable(torch::relu(out1 + out2), block.separable[2], 1);
  const torch::Tensor out4 = separable(torch::relu(out1 + (out2 + out3)), block.separable[3], 1);
  return torch::relu(out1 + (out2 + (out3 + out4)));
}

torch::Tensor Landmark68Net::Forward(const torch::Tensor& rgb) const {
  // NHWC in memory is NCHW channels-last: a view, no copy.
  torch::Tensor x =
      ((rgb - mean_rgb_) / 255).permute({0, 3, 1, 2}).contiguous(at::MemoryFormat::ChannelsLast);
  for (size_t b = 0; b < dense_.size(); ++b) x = Block(x, dense_[b], b == 0);
  // A 7×7 "valid" average pool over the 7×7 map: the mean of each channel.
  x = torch::avg_pool2d(x, 7, 2).flatten(1);
  return torch::addmm(fc_bias_, x, fc_weight_);
}

std::array<image::Point, 5> FivePointsFrom68(const std::array<image::Point, 68>& p) {
  auto mean = [&](int first) {
    image::Point m{0, 0};
    for (int i = first; i < first + 6; ++i) {
      m.x += p[i].x;
      m.y += p[i].y;
    }
    return image::Point{m.x / 6, m.y / 6};
  };
  return {mean(36), mean(42), p[30], p[48], p[54]};
}

}  // namespace arcface::detect
