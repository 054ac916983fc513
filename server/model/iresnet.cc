#include "server/model/iresnet.h"

#include <set>
#include <utility>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/match.h"

namespace arcface::model {
namespace {

constexpr double kBatchNormEps = 1e-5;
constexpr std::array<int64_t, 4> kStageWidths = {64, 128, 256, 512};

torch::nn::Conv2d Conv(int64_t in, int64_t out, int64_t kernel, int64_t stride) {
  return torch::nn::Conv2d(torch::nn::Conv2dOptions(in, out, kernel)
                               .stride(stride)
                               .padding(kernel / 2)
                               .bias(true));
}

std::string ShapeString(at::IntArrayRef shape) { return absl::StrCat("[", absl::StrJoin(shape, ","), "]"); }

}  // namespace

IBasicBlockImpl::IBasicBlockImpl(int64_t in_channels, int64_t channels, int64_t stride,
                                 bool downsample) {
  bn1_ = register_module(
      "bn1", torch::nn::BatchNorm2d(torch::nn::BatchNorm2dOptions(in_channels).eps(kBatchNormEps)));
  conv1_ = register_module("conv1", Conv(in_channels, channels, 3, 1));
  prelu_ = register_module("prelu", torch::nn::PReLU(torch::nn::PReLUOptions().num_parameters(channels)));
  conv2_ = register_module("conv2", Conv(channels, channels, 3, stride));
  if (downsample) downsample_ = register_module("downsample", Conv(in_channels, channels, 1, stride));
}

torch::Tensor IBasicBlockImpl::forward(const torch::Tensor& x) {
  torch::Tensor out = conv2_(prelu_(conv1_(bn1_(x))));
  return out.add_(downsample_ ? downsample_(x) : x);
}

IResNetImpl::IResNetImpl(const std::array<int, 4>& blocks) {
  conv1_ = register_module("conv1", Conv(3, kStageWidths[0], 3, 1));
  prelu_ = register_module("prelu", torch::nn::PReLU(torch::nn::PReLUOptions().num_parameters(kStageWidths[0])));
  int64_t in_channels = kStageWidths[0];
  for (size_t stage = 0; stage < 4; ++stage) {
    torch::nn::Sequential layer;
    for (int i = 0; i < blocks[stage]; ++i) {
      // Block 0 of every stage halves the resolution (layer1 too: 112 → 56).
      layer->push_back(IBasicBlock(i == 0 ? in_channels : kStageWidths[stage], kStageWidths[stage],
                                   i == 0 ? 2 : 1, i == 0));
    }
    in_channels = kStageWidths[stage];
    layers_[stage] = register_module(absl::StrCat("layer", stage + 1), layer);
  }
  bn2_ = register_module("bn2", torch::nn::BatchNorm2d(torch::nn::BatchNorm2dOptions(512).eps(kBatchNormEps)));
  fc_ = register_module("fc", torch::nn::Linear(512 * 7 * 7, kEmbeddingDim));
  features_ = register_module(
      "features", torch::nn::BatchNorm1d(torch::nn::BatchNorm1dOptions(kEmbeddingDim).eps(kBatchNormEps)));
}

torch::Tensor IResNetImpl::forward(const torch::Tensor& x) {
  torch::Tensor h = prelu_(conv1_(x));
  for (auto& layer : layers_) h = layer->forward(h);
  if (head_weight_.defined()) return torch::conv2d(h, head_weight_, head_bias_).flatten(1);
  // Flatten must be channel-major (NCHW order) whatever the memory format was.
  h = bn2_(h).contiguous().flatten(1);
  return features_(fc_(h));
}

namespace {

// Inference BatchNorm as y = x * scale + shift, in double.
std::pair<torch::Tensor, torch::Tensor> BatchNormAffine(const torch::Tensor& weight,
                                                        const torch::Tensor& bias,
                                                        const torch::Tensor& mean,
                                                        const torch::Tensor& var) {
  torch::Tensor scale = weight.to(torch::kFloat64) / (var.to(torch::kFloat64) + kBatchNormEps).sqrt();
  return {scale, bias.to(torch::kFloat64) - mean.to(torch::kFloat64) * scale};
}

}  // namespace

void IResNetImpl::FoldHead() {
  torch::NoGradGuard no_grad;
  auto [s1, t1] = BatchNormAffine(bn2_->weight, bn2_->bias, bn2_->running_mean, bn2_->running_var);
  auto [s2, t2] = BatchNormAffine(features_->weight, features_->bias, features_->running_mean,
                                  features_->running_var);
  // fc's input index is c·49 + h·7 + w (channel-major flatten), i.e. a [512, 512, 7, 7] kernel.
  torch::Tensor w = fc_->weight.to(torch::kFloat64).view({kEmbeddingDim, 512, 7, 7});
  torch::Tensor b = fc_->bias.to(torch::kFloat64) + (w * t1.view({1, 512, 1, 1})).sum({1, 2, 3});
  head_weight_ = (w * s1.view({1, 512, 1, 1}) * s2.view({kEmbeddingDim, 1, 1, 1})).to(torch::kFloat32);
  head_bias_ = (b * s2 + t2).to(torch::kFloat32);
  head_weight_ = register_buffer("head_weight", head_weight_);
  head_bias_ = register_buffer("head_bias", head_bias_);
  // The unfolded head is dead weight now (51 MB for fc alone).
  fc_->weight.set_data(torch::empty({0}));
}

void IResNetImpl::WeightsToChannelsLast() {
  torch::NoGradGuard no_grad;
  for (auto& p : parameters()) {
    if (p.dim() == 4) p.set_data(p.contiguous(at::MemoryFormat::ChannelsLast));
  }
  for (auto& b : buffers()) {
    if (b.dim() == 4) b.set_data(b.contiguous(at::MemoryFormat::ChannelsLast));
  }
}

absl::StatusOr<IResNet> BuildIResNet(const Checkpoint& checkpoint) {
  IResNet net(checkpoint.blocks);
  net->eval();
  std::set<std::string> loaded;
  torch::NoGradGuard no_grad;
  auto load = [&](const std::string& name, torch::Tensor& target) -> absl::Status {
    auto it = checkpoint.tensors.find(name);
    if (it == checkpoint.tensors.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat(checkpoint.path, ": missing tensor '", name, "' for arch ", checkpoint.arch));
    }
    const HostTensor& src = it->second;
    if (at::IntArrayRef(src.shape) != target.sizes()) {
      return absl::InvalidArgumentError(absl::StrCat(checkpoint.path, ": tensor '", name, "' has shape ",
                                                     ShapeString(src.shape), ", expected ",
                                                     ShapeString(target.sizes())));
    }
    target.copy_(torch::from_blob(const_cast<float*>(src.values.data()), target.sizes(), torch::kFloat32));
    loaded.insert(name);
    return absl::OkStatus();
  };
  for (auto& p : net->named_parameters()) {
    if (absl::Status s = load(p.key(), p.value()); !s.ok()) return s;
  }
  for (auto& b : net->named_buffers()) {
    if (absl::EndsWith(b.key(), "num_batches_tracked")) continue;
    if (absl::Status s = load(b.key(), b.value()); !s.ok()) return s;
  }
  for (const auto& [name, tensor] : checkpoint.tensors) {
    if (!loaded.count(name)) {
      return absl::InvalidArgumentError(
          absl::StrCat(checkpoint.path, ": unexpected tensor '", name, "' for arch ", checkpoint.arch));
    }
  }
  return net;
}

}  // namespace arcface::model
