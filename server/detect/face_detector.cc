#include "server/detect/face_detector.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <opencv2/imgproc.hpp>
#include <utility>

#include "absl/strings/str_cat.h"
#include "server/detect/blazeface.h"
#include "server/detect/box_decoding.h"
#include "server/detect/landmark68.h"
#include "server/detect/ssd_mobilenet.h"
#include "server/model/tfjs_weights.h"
#include "server/detect/tiny_face_detector.h"
#include "server/engine/device.h"
#include "server/model/sha256.h"

namespace arcface::detect {

namespace {

constexpr char kSsdName[] = "ssd_mobilenetv1";
constexpr char kTinyName[] = "tiny_face_detector";
constexpr char kBlazeName[] = "blazeface";  // human-models' blazeface-back: full range
constexpr char kBlazeFrontName[] = "blazeface_front";
constexpr char kLandmarkName[] = "face_landmark_68";
constexpr int kCropSide = Landmark68Net::kInputSize;
constexpr int kMaxTinyInput = 2048;

// Shrinking averages (no aliasing from large frames); enlarging interpolates.
int Interpolation(int from, int to) { return to < from ? cv::INTER_AREA : cv::INTER_LINEAR; }

// Where a landmark crop lies in its frame: the top-left corner of the square (edge
// coordinates: 0 is the left edge of pixel 0) and its side, in frame pixels.
struct Placement {
  float x0, y0, side;
};

// The face's box rounded to whole pixels inside the frame, padded to a square (centred, black,
// as face-api pads its landmark input) and resized to 112×112 into `out`.
Placement CropForLandmarks(const cv::Mat& rgb, const image::Box& box, uint8_t* out) {
  auto to_pixel = [](float v, int limit) {
    return std::clamp(static_cast<int>(std::lround(v)), 0, limit);
  };
  int x0 = to_pixel(box.x_min, rgb.cols - 1), y0 = to_pixel(box.y_min, rgb.rows - 1);
  const int x1 = std::max(x0 + 1, to_pixel(box.x_max, rgb.cols));
  const int y1 = std::max(y0 + 1, to_pixel(box.y_max, rgb.rows));
  const int w = x1 - x0, h = y1 - y0, side = std::max(w, h);
  const int pad_left = (side - w) / 2, pad_top = (side - h) / 2;
  cv::Mat square(side, side, CV_8UC3, cv::Scalar::all(0));
  rgb(cv::Rect(x0, y0, w, h)).copyTo(square(cv::Rect(pad_left, pad_top, w, h)));
  cv::Mat dst(kCropSide, kCropSide, CV_8UC3, out);
  cv::resize(square, dst, dst.size(), 0, 0, Interpolation(side, kCropSide));
  return {static_cast<float>(x0 - pad_left), static_cast<float>(y0 - pad_top),
          static_cast<float>(side)};
}

class FaceDetectorImpl final : public FaceDetector {
 public:
  FaceDetectorImpl(std::unique_ptr<SsdMobilenetV1> ssd, std::unique_ptr<TinyFaceDetector> tiny,
                   std::unique_ptr<BlazeFace> blaze, std::unique_ptr<Landmark68Net> landmarks,
                   torch::Device device, int input_size, int max_faces,
                   DetectorDescription description)
      : ssd_(std::move(ssd)),
        tiny_(std::move(tiny)),
        blaze_(std::move(blaze)),
        landmarks_(std::move(landmarks)),
        device_(device),
        input_size_(input_size),
        max_faces_(max_faces),
        description_(std::move(description)) {}

  absl::StatusOr<PreparedFrame> Prepare(const cv::Mat& frame,
                                        const DetectFilter& filter) const override;
  absl::StatusOr<std::vector<std::vector<DetectedBox>>> Detect(
      absl::Span<const PreparedFrame* const> frames) override;
  const DetectorDescription& description() const override { return description_; }

  // One batch of one black frame through both networks (first-call allocations, kernels).
  absl::Status WarmUp();

 private:
  // The box network on the batch; per frame, the boxes in frame pixels that pass its filter,
  // after NMS, by score descending.
  std::vector<std::vector<DetectedBox>> FindBoxes(
      absl::Span<const PreparedFrame* const> frames) const;
  // The landmark network on every face of every frame as one batch.
  void FindLandmarks(absl::Span<const PreparedFrame* const> frames,
                     std::vector<std::vector<DetectedBox>>& faces) const;

  const std::unique_ptr<SsdMobilenetV1> ssd_;  // exactly one of ssd_, tiny_ and blaze_
  const std::unique_ptr<TinyFaceDetector> tiny_;
  const std::unique_ptr<BlazeFace> blaze_;
  const std::unique_ptr<Landmark68Net> landmarks_;
  const torch::Device device_;
  const int input_size_;
  const int max_faces_;
  const DetectorDescription description_;
};

absl::StatusOr<PreparedFrame> FaceDetectorImpl::Prepare(const cv::Mat& frame,
                                                        const DetectFilter& filter) const {
  if (frame.empty()) return absl::InvalidArgumentError("empty frame (no pixels)");
  if (frame.type() != CV_8UC3 && frame.type() != CV_8UC1) {
    return absl::InvalidArgumentError(
        absl::StrCat("frame must be 8-bit RGB or grayscale, got OpenCV type ", frame.type()));
  }
  if (!(filter.min_score >= 0 && filter.min_score <= 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("min_score ", filter.min_score, " is outside [0, 1]"));
  }
  if (!(filter.min_face_size >= 0) || std::isinf(filter.min_face_size)) {
    return absl::InvalidArgumentError(
        absl::StrCat("min_face_size ", filter.min_face_size, " must be finite and >= 0"));
  }
  try {
    PreparedFrame prepared;
    prepared.filter = filter;
    if (frame.type() == CV_8UC1) {
      cv::cvtColor(frame, prepared.rgb, cv::COLOR_GRAY2RGB);
    } else {
      prepared.rgb = frame;
    }
    // face-api pads to a square at the bottom and right, then resizes: the same as resizing
    // the frame so that its longer side fills the input and leaving the rest black.
    const int size = input_size_;
    const double scale = static_cast<double>(size) / std::max(frame.cols, frame.rows);
    const int w = std::clamp(static_cast<int>(std::lround(frame.cols * scale)), 1, size);
    const int h = std::clamp(static_cast<int>(std::lround(frame.rows * scale)), 1, size);
    prepared.input.assign(static_cast<size_t>(size) * size * 3, 0);
    cv::Mat canvas(size, size, CV_8UC3, prepared.input.data());
    cv::Mat region = canvas(cv::Rect(0, 0, w, h));
    cv::resize(prepared.rgb, region, region.size(), 0, 0,
               Interpolation(std::max(frame.cols, frame.rows), size));
    prepared.scale_x = static_cast<float>(frame.cols) / w;
    prepared.scale_y = static_cast<float>(frame.rows) / h;
    return prepared;
  } catch (const cv::Exception& e) {
    return absl::InternalError(absl::StrCat("preparing a frame for detection: ", e.what()));
  }
}

std::vector<std::vector<DetectedBox>> FaceDetectorImpl::FindBoxes(
    absl::Span<const PreparedFrame* const> frames) const {
  const int64_t n = static_cast<int64_t>(frames.size());
  const int64_t size = input_size_;
  torch::Tensor batch = torch::empty({n, size, size, 3}, torch::kUInt8);
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(batch[i].data_ptr<uint8_t>(), frames[i]->input.data(), frames[i]->input.size());
  }
  torch::Tensor x = batch.to(device_).to(torch::kFloat32);

  // The raw outputs come to the host in one copy each; decoding reads only what passes.
  torch::Tensor encodings, logits, grid;
  if (ssd_) {
    SsdMobilenetV1::Output out = ssd_->Forward(x);
    encodings = out.box_encodings.to(torch::kCPU).contiguous();
    logits = out.class_logits.to(torch::kCPU).contiguous();
  } else if (blaze_) {
    BlazeFace::Output out = blaze_->Forward(x);
    encodings = out.regressors.to(torch::kCPU).contiguous();
    logits = out.logits.to(torch::kCPU).contiguous();
  } else {
    grid = tiny_->Forward(x).to(torch::kCPU).contiguous();
  }

  std::vector<std::vector<DetectedBox>> faces(frames.size());
  for (int64_t i = 0; i < n; ++i) {
    const PreparedFrame& frame = *frames[i];
    std::vector<ScoredBox> boxes;
    if (ssd_) {
      constexpr size_t kAnchors = SsdMobilenetV1::kNumAnchors;
      boxes = DecodeSsd({encodings[i].data_ptr<float>(), kAnchors * 4},
                        {logits[i].data_ptr<float>(), kAnchors * 3}, ssd_->priors(),
                        frame.filter.min_score);
    } else if (blaze_) {
      constexpr size_t kAnchors = BlazeFace::kNumAnchors;
      boxes = DecodeBlazeFace({logits[i].data_ptr<float>(), kAnchors},
                              {encodings[i].data_ptr<float>(), kAnchors * BlazeFace::kRegressors},
                              blaze_->anchors(), input_size_, frame.filter.min_score);
    } else {
      const int cells = input_size_ / 32;
      boxes = DecodeTiny({grid[i].data_ptr<float>(), static_cast<size_t>(grid[i].numel())}, cells,
                         frame.filter.min_score);
    }
    // To frame pixels, clipped to the frame; then the size filter and NMS, so that NMS returns
    // up to max_faces boxes of the size asked for.
    const float to_x = size * frame.scale_x, to_y = size * frame.scale_y;
    const float width = frame.rgb.cols, height = frame.rgb.rows;
    std::vector<ScoredBox> in_frame;
    for (const ScoredBox& b : boxes) {
      ScoredBox p{std::clamp(b.x_min * to_x, 0.0f, width), std::clamp(b.y_min * to_y, 0.0f, height),
                  std::clamp(b.x_max * to_x, 0.0f, width), std::clamp(b.y_max * to_y, 0.0f, height),
                  b.score};
      const float shorter = std::min(p.x_max - p.x_min, p.y_max - p.y_min);
      if (shorter > 0 && shorter >= frame.filter.min_face_size) in_frame.push_back(p);
    }
    const uint32_t limit = frame.filter.max_faces == 0
                               ? max_faces_
                               : std::min<uint32_t>(frame.filter.max_faces, max_faces_);
    const float iou = ssd_ ? kSsdIouThreshold : blaze_ ? kBlazeFaceIouThreshold : kTinyIouThreshold;
    for (const ScoredBox& b : NonMaxSuppression(std::move(in_frame), iou, limit)) {
      DetectedBox face;
      face.box = {b.x_min, b.y_min, b.x_max, b.y_max};
      face.score = b.score;
      faces[i].push_back(face);
    }
  }
  return faces;
}

void FaceDetectorImpl::FindLandmarks(absl::Span<const PreparedFrame* const> frames,
                                     std::vector<std::vector<DetectedBox>>& faces) const {
  size_t total = 0;
  for (const auto& f : faces) total += f.size();
  if (total == 0) return;
  constexpr size_t kCropBytes = static_cast<size_t>(kCropSide) * kCropSide * 3;
  torch::Tensor crops =
      torch::empty({static_cast<int64_t>(total), kCropSide, kCropSide, 3}, torch::kUInt8);
  std::vector<Placement> placements;
  placements.reserve(total);
  uint8_t* out = crops.data_ptr<uint8_t>();
  for (size_t i = 0; i < frames.size(); ++i) {
    for (const DetectedBox& face : faces[i]) {
      placements.push_back(CropForLandmarks(frames[i]->rgb, face.box, out));
      out += kCropBytes;
    }
  }
  torch::Tensor points =
      landmarks_->Forward(crops.to(device_).to(torch::kFloat32)).to(torch::kCPU).contiguous();
  const float* p = points.data_ptr<float>();
  size_t k = 0;
  for (auto& frame_faces : faces) {
    for (DetectedBox& face : frame_faces) {
      const Placement& at = placements[k];
      const float* xy = p + k * 2 * Landmark68Net::kPoints;
      std::array<image::Point, 68> points68;
      for (int j = 0; j < Landmark68Net::kPoints; ++j) {
        // Fractions of the square to frame pixels; -0.5 turns edge coordinates into the
        // pixel-centre coordinates that image::AlignFace takes.
        points68[j] = {at.x0 + xy[2 * j] * at.side - 0.5f, at.y0 + xy[2 * j + 1] * at.side - 0.5f};
      }
      face.landmarks = FivePointsFrom68(points68);
      ++k;
    }
  }
}

absl::StatusOr<std::vector<std::vector<DetectedBox>>> FaceDetectorImpl::Detect(
    absl::Span<const PreparedFrame* const> frames) {
  const size_t input_bytes = static_cast<size_t>(input_size_) * input_size_ * 3;
  for (size_t i = 0; i < frames.size(); ++i) {
    const PreparedFrame* f = frames[i];
    if (f == nullptr || f->input.size() != input_bytes || f->rgb.empty() ||
        f->rgb.type() != CV_8UC3 || !(f->scale_x > 0) || !(f->scale_y > 0) ||
        std::isinf(f->scale_x) || std::isinf(f->scale_y)) {
      return absl::InvalidArgumentError(
          absl::StrCat("frame ", i, " of the batch was not made by this detector's Prepare()"));
    }
  }
  if (frames.empty()) return std::vector<std::vector<DetectedBox>>();
  try {
    c10::InferenceMode inference;
    std::vector<std::vector<DetectedBox>> faces = FindBoxes(frames);
    FindLandmarks(frames, faces);
    return faces;
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("face detection on ", description_.device,
                                            " failed: ", e.what_without_backtrace()));
  } catch (const cv::Exception& e) {
    return absl::InternalError(absl::StrCat("face detection: cropping faces failed: ", e.what()));
  }
}

absl::Status FaceDetectorImpl::WarmUp() {
  absl::StatusOr<PreparedFrame> frame =
      Prepare(cv::Mat(input_size_, input_size_, CV_8UC3, cv::Scalar::all(0)), DetectFilter());
  if (!frame.ok()) return frame.status();
  const PreparedFrame* batch[] = {&*frame};
  absl::StatusOr<std::vector<std::vector<DetectedBox>>> faces = Detect(batch);
  if (!faces.ok()) return faces.status();
  try {
    c10::InferenceMode inference;
    landmarks_->Forward(torch::zeros({1, kCropSide, kCropSide, 3}, torch::kFloat32).to(device_));
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("landmark network warm-up on ", description_.device,
                                            " failed: ", e.what_without_backtrace()));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<FaceDetector>> FaceDetector::Create(const DetectorConfig& config) {
  const bool ssd = config.detector == kSsdName;
  const bool blaze = config.detector == kBlazeName || config.detector == kBlazeFrontName;
  if (!ssd && !blaze && config.detector != kTinyName) {
    return absl::InvalidArgumentError(absl::StrCat("unknown detector '", config.detector,
                                                   "': expected ", kSsdName, ", ", kTinyName, ", ",
                                                   kBlazeName, " or ", kBlazeFrontName));
  }
  const BlazeFace::Range range =
      config.detector == kBlazeName ? BlazeFace::Range::kFull : BlazeFace::Range::kShort;
  const int blaze_size =
      range == BlazeFace::Range::kFull ? BlazeFace::kFullRangeInput : BlazeFace::kShortRangeInput;
  int input_size = config.input_size;
  if (ssd && input_size != 0 && input_size != SsdMobilenetV1::kInputSize) {
    return absl::InvalidArgumentError(
        absl::StrCat(kSsdName, " takes only ", SsdMobilenetV1::kInputSize,
                     "-pixel input (its prior boxes), not ", input_size));
  }
  if (blaze && input_size != 0 && input_size != blaze_size) {
    return absl::InvalidArgumentError(absl::StrCat(config.detector, " takes only ", blaze_size,
                                                   "-pixel input (its anchors), not ", input_size));
  }
  if (!ssd && !blaze && input_size != 0 &&
      (input_size < 32 || input_size > kMaxTinyInput || input_size % 32 != 0)) {
    return absl::InvalidArgumentError(absl::StrCat(kTinyName, " input size ", input_size,
                                                   " must be a multiple of 32 in [32, ",
                                                   kMaxTinyInput, "]"));
  }
  if (input_size == 0) {
    input_size = ssd     ? SsdMobilenetV1::kInputSize
                 : blaze ? blaze_size
                         : TinyFaceDetector::kDefaultInputSize;
  }
  if (config.max_faces_per_frame < 1 || config.max_faces_per_frame > SsdMobilenetV1::kNumAnchors) {
    return absl::InvalidArgumentError(absl::StrCat("max_faces_per_frame ",
                                                   config.max_faces_per_frame, " is outside [1, ",
                                                   SsdMobilenetV1::kNumAnchors, "]"));
  }
  absl::StatusOr<torch::Device> device = engine::ResolveDevice(config.device);
  if (!device.ok()) return device.status();

  const std::string box_name = config.detector;
  const std::string box_file =
      !blaze ? absl::StrCat(config.model_dir, "/", box_name, "_model-weights_manifest.json")
             : absl::StrCat(config.candidate_model_dir.empty() ? config.model_dir
                                                               : config.candidate_model_dir,
                            range == BlazeFace::Range::kFull ? "/blazeface-back.json"
                                                             : "/blazeface-front.json");
  absl::StatusOr<model::TfjsWeights> box_weights = model::TfjsWeights::Load(box_file);
  if (!box_weights.ok()) return box_weights.status();
  absl::StatusOr<model::TfjsWeights> landmark_weights = model::TfjsWeights::Load(
      absl::StrCat(config.model_dir, "/", kLandmarkName, "_model-weights_manifest.json"));
  if (!landmark_weights.ok()) return landmark_weights.status();
  absl::StatusOr<std::string> sha256 =
      model::Sha256Hex(box_weights->sha256() + landmark_weights->sha256());
  if (!sha256.ok()) return sha256.status();

  DetectorDescription description;
  description.detector_id = absl::StrCat(box_name, "+landmark68@", sha256->substr(0, 12));
  description.detector = box_name;
  description.landmarks = kLandmarkName;
  description.weights_sha256 = *sha256;
  description.device = device->str();
  description.input_size = input_size;
  description.default_min_score = DetectFilter().min_score;
  description.max_faces_per_frame = config.max_faces_per_frame;

  std::unique_ptr<FaceDetectorImpl> detector;
  try {
    c10::InferenceMode inference;
    std::unique_ptr<SsdMobilenetV1> ssd_net;
    std::unique_ptr<TinyFaceDetector> tiny_net;
    std::unique_ptr<BlazeFace> blaze_net;
    if (blaze) {
      absl::StatusOr<std::unique_ptr<BlazeFace>> net =
          BlazeFace::Create(*box_weights, range, *device);
      if (!net.ok()) return net.status();
      blaze_net = std::move(*net);
    } else if (ssd) {
      absl::StatusOr<std::unique_ptr<SsdMobilenetV1>> net =
          SsdMobilenetV1::Create(*box_weights, *device);
      if (!net.ok()) return net.status();
      ssd_net = std::move(*net);
    } else {
      absl::StatusOr<std::unique_ptr<TinyFaceDetector>> net =
          TinyFaceDetector::Create(*box_weights, *device);
      if (!net.ok()) return net.status();
      tiny_net = std::move(*net);
    }
    absl::StatusOr<std::unique_ptr<Landmark68Net>> landmarks =
        Landmark68Net::Create(*landmark_weights, *device);
    if (!landmarks.ok()) return landmarks.status();
    detector = std::make_unique<FaceDetectorImpl>(
        std::move(ssd_net), std::move(tiny_net), std::move(blaze_net), std::move(*landmarks),
        *device, input_size, config.max_faces_per_frame, std::move(description));
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("building the face detector on ", config.device,
                                            " failed: ", e.what_without_backtrace()));
  }
  if (absl::Status warm = detector->WarmUp(); !warm.ok()) return warm;
  return detector;
}

}  // namespace arcface::detect
