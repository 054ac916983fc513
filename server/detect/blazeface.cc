#include "server/detect/blazeface.h"

#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace arcface::detect {

namespace {

constexpr char kPrefix[] = "StatefulPartitionedCall/functional_1/";

struct BlockSpec {
  int64_t in, out, stride;
};

// The graph's node order: the blocks feeding the 16×16 head, then those feeding the 8×8 head.
struct Architecture {
  int input_size;
  std::vector<BlockSpec> to16, to8;
  bool last_plain;  // the last block has no residual sum (full range)
};

Architecture ArchitectureOf(BlazeFace::Range range) {
  Architecture a;
  if (range == BlazeFace::Range::kFull) {
    a.input_size = BlazeFace::kFullRangeInput;
    // Four stages of seven blocks at one width, each after the first opened by a stride-2
    // block (widening after the second).
    for (const auto& [in, out] : std::vector<std::pair<int64_t, int64_t>>{
             {24, 24}, {24, 24}, {24, 48}, {48, 96}}) {
      if (!a.to16.empty()) a.to16.push_back({in, out, 2});
      for (int i = 0; i < 7; ++i) a.to16.push_back({out, out, 1});
    }
    a.to8 = {{96, 96, 2}};
    a.last_plain = true;
  } else {
    a.input_size = BlazeFace::kShortRangeInput;
    a.to16 = {{24, 24, 1}, {24, 28, 1}, {28, 32, 2}, {32, 36, 1}, {36, 42, 1}, {42, 48, 2},
              {48, 56, 1}, {56, 64, 1}, {64, 72, 1}, {72, 80, 1}, {80, 88, 1}};
    a.to8 = {{88, 96, 2}, {96, 96, 1}, {96, 96, 1}, {96, 96, 1}, {96, 96, 1}};
    a.last_plain = false;
  }
  return a;
}

// The converter numbers the anonymous constants in node order, skipping one after each
// depthwise kernel: "unknown", "unknown_0", then unknown_{4b+1} (block b's depthwise kernel),
// unknown_{4b+3}, unknown_{4b+4} (its pointwise kernel and bias).
std::string Unknown(int64_t n) { return absl::StrCat("unknown_", n); }

// The int32 constants: a Pad's paddings or a Reshape's shape must hold exactly `want`.
absl::Status CheckInts(const model::TfjsWeights& weights, const std::string& name,
                       const std::vector<int32_t>& want) {
  auto it = weights.tensors().find(name);
  if (it == weights.tensors().end() || !it->second.is_int) {
    return absl::InvalidArgumentError(
        absl::StrCat("blazeface: ", weights.source(), ": no int32 tensor ", name));
  }
  if (it->second.ints != want) {
    return absl::InvalidArgumentError(
        absl::StrCat("blazeface: ", weights.source(), ": ", name, " holds [",
                     absl::StrJoin(it->second.ints, ","), "], this network needs [",
                     absl::StrJoin(want, ","), "]"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<BlazeFace>> BlazeFace::Create(const model::TfjsWeights& weights,
                                                             Range range, torch::Device device) {
  const Architecture arch = ArchitectureOf(range);
  std::unique_ptr<BlazeFace> net(new BlazeFace());
  net->input_size_ = arch.input_size;
  net->last_plain_ = arch.last_plain;
  KernelReader read(weights, "blazeface");
  net->conv0_ = {read.Conv("unknown", 5, 3, 24), read.Plain("unknown_0", {24})};
  int64_t b = 0;
  int pads = 0;
  size_t expected = 2;
  std::vector<absl::Status> int_checks;
  auto make = [&](const BlockSpec& s) {
    Block block{s.in, s.out, s.stride, read.Depthwise(Unknown(4 * b + 1), 3, s.in),
                {read.Conv(Unknown(4 * b + 3), 1, s.in, s.out),
                 read.Plain(Unknown(4 * b + 4), {s.out})}};
    ++b;
    expected += 3;
    if (s.out > s.in) {
      const std::string suffix = pads == 0 ? "" : absl::StrCat("_", pads);
      int_checks.push_back(CheckInts(
          weights, absl::StrCat(kPrefix, "tf_op_layer_Pad", suffix, "/Pad", suffix, "/paddings"),
          {0, 0, 0, 0, 0, 0, 0, static_cast<int32_t>(s.out - s.in)}));
      ++pads;
      ++expected;
    }
    return block;
  };
  for (const BlockSpec& s : arch.to16) net->blocks_.push_back(make(s));
  for (const BlockSpec& s : arch.to8) net->blocks8_.push_back(make(s));
  const int64_t c16 = arch.to16.back().out, c8 = arch.to8.back().out, h = 4 * b + 1;
  net->head8_.regressor = {read.Conv(Unknown(h), 1, c8, 6 * kRegressors),
                           read.Plain(Unknown(h + 1), {6 * kRegressors})};
  net->head16_.regressor = {read.Conv(Unknown(h + 2), 1, c16, 2 * kRegressors),
                            read.Plain(Unknown(h + 3), {2 * kRegressors})};
  net->head8_.classifier = {read.Conv(Unknown(h + 4), 1, c8, 6), read.Plain(Unknown(h + 5), {6})};
  net->head16_.classifier = {read.Conv(Unknown(h + 6), 1, c16, 2),
                             read.Plain(Unknown(h + 7), {2})};
  expected += 8;
  if (!read.status().ok()) return read.status();
  for (const absl::Status& s : int_checks) {
    if (!s.ok()) return s;
  }
  for (const auto& [layer, shape] : std::vector<std::pair<std::string, std::vector<int32_t>>>{
           {"classificators_1", {1, 512, 1}},
           {"classificators_2", {1, 384, 1}},
           {"regressors_1", {1, 512, kRegressors}},
           {"regressors_2", {1, 384, kRegressors}}}) {
    absl::Status s = CheckInts(
        weights, absl::StrCat(kPrefix, "tf_op_layer_", layer, "/", layer, "/shape"), shape);
    if (!s.ok()) return s;
    ++expected;
  }
  if (weights.tensors().size() != expected) {
    return absl::InvalidArgumentError(absl::StrCat(
        "blazeface: ", weights.source(), " holds ", weights.tensors().size(),
        " tensors, this network reads ", expected, " (another model's file?)"));
  }

  net->conv0_.To(device);
  for (std::vector<Block>* blocks : {&net->blocks_, &net->blocks8_}) {
    for (Block& block : *blocks) {
      block.depthwise = ToDevice(block.depthwise, device);
      block.pointwise.To(device);
    }
  }
  for (Head* head : {&net->head16_, &net->head8_}) {
    head->classifier.To(device);
    head->regressor.To(device);
  }
  // MediaPipe's SSD anchors for BlazeFace, as human generates them: strides S/16 and S/8 with
  // 2 and 6 anchors per cell, centred in the cell.
  for (const auto& [stride, per_cell] :
       std::vector<std::pair<int, int>>{{arch.input_size / 16, 2}, {arch.input_size / 8, 6}}) {
    const int cells = (arch.input_size + stride - 1) / stride;
    for (int y = 0; y < cells; ++y) {
      for (int x = 0; x < cells; ++x) {
        for (int a = 0; a < per_cell; ++a) {
          net->anchors_.push_back(stride * (x + 0.5f));
          net->anchors_.push_back(stride * (y + 0.5f));
        }
      }
    }
  }
  return net;
}

torch::Tensor BlazeFace::RunBlock(const Block& b, const torch::Tensor& x) {
  torch::Tensor h = DepthwiseSame(x, b.depthwise, {}, b.stride);
  h = torch::conv2d(h, b.pointwise.weight, b.pointwise.bias);
  torch::Tensor residual = b.stride == 2 ? MaxPoolSame(x, 2, 2) : x;
  if (b.out > b.in) {
    // Zeros after the input's channels (the graph's Pad on NHWC's last axis).
    residual = torch::constant_pad_nd(residual, {0, 0, 0, 0, 0, b.out - b.in});
  }
  return torch::relu(h + residual);
}

torch::Tensor BlazeFace::Flatten(const torch::Tensor& nchw, int64_t per_anchor) {
  return nchw.permute({0, 2, 3, 1}).reshape({nchw.size(0), -1, per_anchor});
}

BlazeFace::Output BlazeFace::Forward(const torch::Tensor& rgb) const {
  torch::Tensor x =
      (rgb / 127.5 - 1).permute({0, 3, 1, 2}).contiguous(at::MemoryFormat::ChannelsLast);
  x = torch::relu(ConvSame(x, conv0_.weight, conv0_.bias, 2));
  for (const Block& b : blocks_) x = RunBlock(b, x);
  const torch::Tensor map16 = x;
  for (size_t i = 0; i < blocks8_.size(); ++i) {
    const Block& b = blocks8_[i];
    if (last_plain_ && i + 1 == blocks8_.size()) {
      x = torch::relu(torch::conv2d(DepthwiseSame(x, b.depthwise, {}, b.stride),
                                    b.pointwise.weight, b.pointwise.bias));
    } else {
      x = RunBlock(b, x);
    }
  }
  auto conv = [](const torch::Tensor& in, const ConvWeights& w) {
    return torch::conv2d(in, w.weight, w.bias);
  };
  Output out;
  out.logits = torch::cat({Flatten(conv(map16, head16_.classifier), 1),
                           Flatten(conv(x, head8_.classifier), 1)},
                          1)
                   .squeeze(2);
  out.regressors = torch::cat({Flatten(conv(map16, head16_.regressor), kRegressors),
                               Flatten(conv(x, head8_.regressor), kRegressors)},
                              1);
  return out;
}

}  // namespace arcface::detect
