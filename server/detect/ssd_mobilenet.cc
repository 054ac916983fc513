#include "server/detect/ssd_mobilenet.h"

#include <string>

#include "absl/strings/str_cat.h"

namespace arcface::detect {

namespace {

// TF's BatchNorm epsilon in the exported graph (float32 0.001).
constexpr double kBatchNormEpsilon = 0.0010000000474974513;

// MobileNetV1's channels: the input of conv_1 and the outputs of conv_1 .. conv_13.
constexpr std::array<int64_t, 14> kChannels = {32,  64,  128, 128, 256, 256, 512,
                                               512, 512, 512, 512, 512, 1024, 1024};
int64_t DepthwiseStride(int layer) {
  return layer == 2 || layer == 4 || layer == 6 || layer == 12 ? 2 : 1;
}

// Prediction/Conv2d_i_pointwise: kernel, in, out; the 3×3 ones (odd i) have stride 2.
struct ExtraLayer {
  int64_t kernel, in, out;
};
constexpr std::array<ExtraLayer, 8> kExtra = {{{1, 1024, 256},
                                               {3, 256, 512},
                                               {1, 512, 128},
                                               {3, 128, 256},
                                               {1, 256, 128},
                                               {3, 128, 256},
                                               {1, 256, 64},
                                               {3, 64, 128}}};

// Box predictor i reads a feature map with this many channels and has this many anchors per
// cell: 0 reads conv_11, 1 the backbone's output, 2..5 the odd extra layers.
constexpr std::array<int64_t, 6> kPredictorChannels = {512, 1024, 512, 256, 256, 128};
constexpr std::array<int64_t, 6> kPredictorAnchors = {3, 6, 6, 6, 6, 6};

torch::Tensor Relu6(const torch::Tensor& x) { return torch::clamp(x, 0, 6); }

// [B, A*k, H, W] -> [B, H*W*A, k]: TF's NHWC reshape order.
torch::Tensor PerAnchor(const torch::Tensor& x, int64_t k) {
  return x.permute({0, 2, 3, 1}).reshape({x.size(0), -1, k});
}

}  // namespace

absl::StatusOr<std::unique_ptr<SsdMobilenetV1>> SsdMobilenetV1::Create(
    const model::TfjsWeights& weights, torch::Device device) {
  std::unique_ptr<SsdMobilenetV1> net(new SsdMobilenetV1());
  KernelReader read(weights, "ssd_mobilenetv1");

  net->conv0_ = {read.Conv("MobilenetV1/Conv2d_0_pointwise/weights", 3, 3, 32),
                 read.Plain("MobilenetV1/Conv2d_0_pointwise/convolution_bn_offset", {32})};
  for (int layer = 1; layer <= 13; ++layer) {
    const int64_t in = kChannels[layer - 1], out = kChannels[layer];
    const std::string dw = absl::StrCat("MobilenetV1/Conv2d_", layer, "_depthwise/");
    torch::Tensor kernel = read.Depthwise(dw + "depthwise_weights", 3, in);
    torch::Tensor gamma = read.Plain(dw + "BatchNorm/gamma", {in});
    torch::Tensor beta = read.Plain(dw + "BatchNorm/beta", {in});
    torch::Tensor mean = read.Plain(dw + "BatchNorm/moving_mean", {in});
    torch::Tensor variance = read.Plain(dw + "BatchNorm/moving_variance", {in});
    if (read.status().ok()) {
      // (conv(x) - mean) * gamma / sqrt(variance + eps) + beta, folded in double.
      torch::Tensor scale = gamma.to(torch::kFloat64) /
                            torch::sqrt(variance.to(torch::kFloat64) + kBatchNormEpsilon);
      net->depthwise_[layer - 1] = {
          (kernel.to(torch::kFloat64) * scale.view({in, 1, 1, 1})).to(torch::kFloat32),
          (beta.to(torch::kFloat64) - mean.to(torch::kFloat64) * scale).to(torch::kFloat32)};
    }
    const std::string pw = absl::StrCat("MobilenetV1/Conv2d_", layer, "_pointwise/");
    net->pointwise_[layer - 1] = {read.Conv(pw + "weights", 1, in, out),
                                  read.Plain(pw + "convolution_bn_offset", {out})};
  }
  for (size_t i = 0; i < kExtra.size(); ++i) {
    const std::string prefix = absl::StrCat("Prediction/Conv2d_", i, "_pointwise/");
    net->extra_[i] = {read.Conv(prefix + "weights", kExtra[i].kernel, kExtra[i].in, kExtra[i].out),
                      read.Plain(prefix + "convolution_bn_offset", {kExtra[i].out})};
  }
  for (size_t i = 0; i < net->predictors_.size(); ++i) {
    const std::string prefix = absl::StrCat("Prediction/BoxPredictor_", i, "/");
    const int64_t in = kPredictorChannels[i], anchors = kPredictorAnchors[i];
    net->predictors_[i] = {
        {read.Conv(prefix + "BoxEncodingPredictor/weights", 1, in, anchors * 4),
         read.Plain(prefix + "BoxEncodingPredictor/biases", {anchors * 4})},
        {read.Conv(prefix + "ClassPredictor/weights", 1, in, anchors * 3),
         read.Plain(prefix + "ClassPredictor/biases", {anchors * 3})}};
  }
  torch::Tensor priors = read.Plain("Output/extra_dim", {1, kNumAnchors, 4});
  if (!read.status().ok()) return read.status();

  net->priors_.assign(priors.data_ptr<float>(), priors.data_ptr<float>() + priors.numel());
  net->conv0_.To(device);
  for (ConvWeights& conv : net->depthwise_) conv.To(device);
  for (ConvWeights& conv : net->pointwise_) conv.To(device);
  for (ConvWeights& conv : net->extra_) conv.To(device);
  for (Predictor& predictor : net->predictors_) {
    predictor.box.To(device);
    predictor.cls.To(device);
  }
  return net;
}

SsdMobilenetV1::Output SsdMobilenetV1::Forward(const torch::Tensor& rgb) const {
  // NHWC in memory is NCHW channels-last: a view, no copy.
  torch::Tensor x =
      (rgb.permute({0, 3, 1, 2}) / 127.5 - 1).contiguous(at::MemoryFormat::ChannelsLast);
  x = Relu6(ConvSame(x, conv0_.weight, conv0_.bias, 2));
  torch::Tensor conv11;
  for (int layer = 1; layer <= 13; ++layer) {
    const ConvWeights& dw = depthwise_[layer - 1];
    const ConvWeights& pw = pointwise_[layer - 1];
    x = Relu6(DepthwiseSame(x, dw.weight, dw.bias, DepthwiseStride(layer)));
    x = Relu6(torch::conv2d(x, pw.weight, pw.bias));
    if (layer == 11) conv11 = x;
  }
  std::array<torch::Tensor, 6> features = {conv11, x};
  torch::Tensor extra = x;
  for (size_t i = 0; i < extra_.size(); ++i) {
    const int64_t stride = i % 2 == 1 ? 2 : 1;
    extra = Relu6(ConvSame(extra, extra_[i].weight, extra_[i].bias, stride));
    if (i % 2 == 1) features[2 + i / 2] = extra;
  }
  std::vector<torch::Tensor> boxes, classes;
  for (size_t i = 0; i < predictors_.size(); ++i) {
    const Predictor& p = predictors_[i];
    boxes.push_back(PerAnchor(torch::conv2d(features[i], p.box.weight, p.box.bias), 4));
    classes.push_back(PerAnchor(torch::conv2d(features[i], p.cls.weight, p.cls.bias), 3));
  }
  return {torch::cat(boxes, 1), torch::cat(classes, 1)};
}

}  // namespace arcface::detect
