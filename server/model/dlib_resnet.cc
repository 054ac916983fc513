#include "server/model/dlib_resnet.h"

#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "server/model/dlib_weights.h"

namespace arcface::model {
namespace {

namespace F = torch::nn::functional;

torch::Tensor FromHost(const HostTensor& host) {
  return torch::from_blob(const_cast<float*>(host.values.data()), host.shape, torch::kFloat32)
      .to(torch::kFloat64);
}

torch::Tensor Conv2d(const torch::Tensor& x, const torch::Tensor& weight,
                     const torch::Tensor& bias, int64_t stride, int64_t padding) {
  return torch::conv2d(x, weight, bias, {stride, stride}, {padding, padding});
}

}  // namespace

torch::Tensor DlibNormalize(const torch::Tensor& rgb) {
  const torch::Tensor mean =
      torch::tensor({kDlibMeanRgb[0], kDlibMeanRgb[1], kDlibMeanRgb[2]}, rgb.options())
          .view({1, 3, 1, 1});
  return (rgb - mean) / kDlibInputScale;
}

DlibResNetImpl::Conv DlibResNetImpl::MakeConv(const Checkpoint& checkpoint,
                                              const std::string& name) {
  // (conv(x) + b) · s + t = conv_{W·s}(x) + (b · s + t), per output channel.
  const torch::Tensor filters = FromHost(checkpoint.tensors.at(name + "/conv/filters"));
  const torch::Tensor bias = FromHost(checkpoint.tensors.at(name + "/conv/bias"));
  const torch::Tensor scale = FromHost(checkpoint.tensors.at(name + "/scale/weights"));
  const torch::Tensor shift = FromHost(checkpoint.tensors.at(name + "/scale/biases"));
  Conv conv;
  conv.weight = filters.permute({3, 2, 0, 1}).mul(scale.view({-1, 1, 1, 1}))
                    .to(torch::kFloat32)
                    .contiguous();
  conv.bias = (bias * scale + shift).to(torch::kFloat32);
  const std::string key = absl::StrReplaceAll(name, {{"/", "_"}});
  conv.weight = register_buffer(key + "_weight", conv.weight);
  conv.bias = register_buffer(key + "_bias", conv.bias);
  return conv;
}

DlibResNetImpl::DlibResNetImpl(const Checkpoint& checkpoint) {
  stem_ = MakeConv(checkpoint, "conv32_down");
  for (const DlibBlock& block : DlibBlocks()) {
    blocks_.push_back(Block{MakeConv(checkpoint, block.name + "/conv1"),
                            MakeConv(checkpoint, block.name + "/conv2"), block.down});
  }
  fc_ = register_buffer("fc", FromHost(checkpoint.tensors.at("fc")).to(torch::kFloat32));
}

torch::Tensor DlibResNetImpl::forward(const torch::Tensor& input) {
  // TF's 'valid' convolutions and pools (no padding, sizes rounded down); its 'same' 3×3 at
  // stride 1 pads one on each side. 150 → 72 (stem) → 35 (max pool) → 17 → 8 → 4 → 2.
  torch::Tensor x = torch::relu(Conv2d(input, stem_.weight, stem_.bias, 2, 0));
  x = torch::max_pool2d(x, {3, 3}, {2, 2});
  // The tensors held in stem_, blocks_ and fc_ are the registered buffers themselves: to()
  // moves those in place (set_data), so a module moved to CUDA computes there.
  for (const Block& block : blocks_) {
    torch::Tensor out = torch::relu(
        Conv2d(x, block.conv1.weight, block.conv1.bias, block.down ? 2 : 1, block.down ? 0 : 1));
    out = Conv2d(out, block.conv2.weight, block.conv2.bias, 1, 1);
    torch::Tensor shortcut = x;
    if (block.down) {
      // face-api's residualDown: the shortcut is a 2×2 average pool, widened with zero channels;
      // where the strided 'valid' convolution came out smaller (8 → 3, 4 → 1), the main path
      // gets a row of zeros at the bottom and a column at the right.
      shortcut = torch::avg_pool2d(x, {2, 2}, {2, 2});
      out = F::pad(out, F::PadFuncOptions({0, shortcut.size(3) - out.size(3), 0,
                                           shortcut.size(2) - out.size(2)}));
      shortcut = F::pad(shortcut, F::PadFuncOptions({0, 0, 0, 0, 0, out.size(1) - x.size(1)}));
    }
    x = torch::relu(out + shortcut);
  }
  return x.mean({2, 3}).matmul(fc_);
}

absl::StatusOr<DlibResNet> BuildDlibResNet(const Checkpoint& checkpoint) {
  if (checkpoint.family != Family::kDlibResNet) {
    return absl::InvalidArgumentError(absl::StrCat(
        checkpoint.path, ": not a dlib ResNet checkpoint (arch ", checkpoint.arch, ")"));
  }
  for (const auto& [name, shape] : DlibExpectedShapes()) {
    const auto it = checkpoint.tensors.find(name);
    if (it == checkpoint.tensors.end() || it->second.shape != shape) {
      return absl::InvalidArgumentError(
          absl::StrCat(checkpoint.path, ": tensor '", name, "' missing or mis-shaped"));
    }
  }
  DlibResNet net(checkpoint);
  net->eval();
  return net;
}

}  // namespace arcface::model
