#include "tests/bench/dlib_baseline.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <utility>

#include <dlib/image_processing.h>
#include <dlib/image_processing/frontal_face_detector.h>
#include <dlib/image_transforms.h>
#include <dlib/opencv.h>
#include <dlib/xml_parser.h>

#include "absl/strings/str_cat.h"

namespace arcface::bench {

namespace {

constexpr std::array<const char*, 5> kNamedParts = {"left_eye", "right_eye", "nose_tip",
                                                    "mouth_left", "mouth_right"};

// SAX handler: fills `images` until the first error, which it keeps (the parser has no way to
// stop early; later events are ignored).
class ImglabHandler : public dlib::document_handler, public dlib::error_handler {
 public:
  explicit ImglabHandler(std::string xml_path) : xml_path_(std::move(xml_path)) {}

  absl::StatusOr<std::vector<LabelledImage>> Result() && {
    if (!status_.ok()) return status_;
    return std::move(images_);
  }

  void start_document() override {}
  void end_document() override {}
  void characters(const std::string&) override {}
  void processing_instruction(unsigned long, const std::string&, const std::string&) override {}

  void start_element(const unsigned long line, const std::string& name,
                     const dlib::attribute_list& atts) override {
    if (!status_.ok()) return;
    if (name == "image") {
      LabelledImage image;
      image.path =
          (std::filesystem::path(xml_path_).parent_path() / Attr(line, atts, "file")).string();
      if (atts.is_in_list("width")) image.width = static_cast<int>(Number(line, atts, "width"));
      if (atts.is_in_list("height")) image.height = static_cast<int>(Number(line, atts, "height"));
      images_.push_back(std::move(image));
    } else if (name == "box") {
      if (images_.empty()) return Fail(line, "<box> outside an <image>");
      const double top = Number(line, atts, "top"), left = Number(line, atts, "left");
      const double width = Number(line, atts, "width"), height = Number(line, atts, "height");
      box_ = image::Box{static_cast<float>(left), static_cast<float>(top),
                        static_cast<float>(left + width), static_cast<float>(top + height)};
      box_line_ = line;
      ignore_ = atts.is_in_list("ignore") && atts["ignore"] != "0";
      parts_.clear();
      in_box_ = true;
    } else if (name == "part") {
      if (!in_box_) return Fail(line, "<part> outside a <box>");
      parts_[Attr(line, atts, "name")] = image::Point{static_cast<float>(Number(line, atts, "x")),
                                                      static_cast<float>(Number(line, atts, "y"))};
    }
  }

  void end_element(const unsigned long, const std::string& name) override {
    if (!status_.ok() || name != "box") return;
    in_box_ = false;
    if (ignore_) return;
    LabelledFace face{box_, {}};
    if (Has68()) {
      const auto mean = [&](int from, int to) {
        image::Point m{0, 0};
        for (int i = from; i <= to; ++i) {
          m.x += parts_[PartName(i)].x / (to - from + 1);
          m.y += parts_[PartName(i)].y / (to - from + 1);
        }
        return m;
      };
      face.landmarks = {mean(36, 41), mean(42, 47), parts_[PartName(30)], parts_[PartName(48)],
                        parts_[PartName(54)]};
    } else if (std::all_of(kNamedParts.begin(), kNamedParts.end(),
                           [&](const char* p) { return parts_.count(p) > 0; })) {
      for (size_t i = 0; i < kNamedParts.size(); ++i) face.landmarks[i] = parts_[kNamedParts[i]];
    } else {
      return Fail(box_line_,
                  absl::StrCat("a <box> with ", parts_.size(),
                               " parts: neither the 68 parts \"00\"..\"67\" nor "
                               "left_eye, right_eye, nose_tip, mouth_left, mouth_right"));
    }
    images_.back().faces.push_back(face);
  }

  void error(const unsigned long line) override { Fail(line, "malformed XML"); }
  void fatal_error(const unsigned long line) override { Fail(line, "malformed XML"); }

 private:
  static std::string PartName(int i) { return absl::StrCat(i < 10 ? "0" : "", i); }
  bool Has68() {
    for (int i = 0; i < 68; ++i) {
      if (!parts_.count(PartName(i))) return false;
    }
    return true;
  }

  std::string Attr(unsigned long line, const dlib::attribute_list& atts, const std::string& key) {
    if (atts.is_in_list(key)) return atts[key];
    Fail(line, absl::StrCat("attribute '", key, "' missing"));
    return "";
  }
  double Number(unsigned long line, const dlib::attribute_list& atts, const std::string& key) {
    const std::string text = Attr(line, atts, key);
    char* end = nullptr;
    errno = 0;
    const double value = std::strtod(text.c_str(), &end);
    if (text.empty() || *end != '\0' || errno != 0 || !std::isfinite(value)) {
      Fail(line, absl::StrCat("attribute ", key, "='", text, "' is not a number"));
      return 0;
    }
    return value;
  }
  void Fail(unsigned long line, const std::string& what) {
    if (status_.ok()) {
      status_ = absl::InvalidArgumentError(absl::StrCat(xml_path_, ":", line, ": ", what));
    }
  }

  const std::string xml_path_;
  absl::Status status_;
  std::vector<LabelledImage> images_;
  std::map<std::string, image::Point> parts_;
  image::Box box_{};
  unsigned long box_line_ = 0;
  bool in_box_ = false;
  bool ignore_ = false;
};

class DlibHogImpl : public DlibHogDetector {
 public:
  DlibHogImpl(dlib::shape_predictor predictor, int upsample)
      : detector_(dlib::get_frontal_face_detector()),
        predictor_(std::move(predictor)),
        upsample_(upsample) {}

  std::vector<detect::DetectedBox> Detect(const cv::Mat& rgb, double adjust_threshold) override {
    dlib::array2d<dlib::rgb_pixel> image;
    dlib::assign_image(image, dlib::cv_image<dlib::rgb_pixel>(rgb));
    dlib::pyramid_down<2> pyramid;
    for (int i = 0; i < upsample_; ++i) dlib::pyramid_up(image, pyramid);
    std::vector<dlib::rect_detection> found;
    detector_(image, found, adjust_threshold);
    std::vector<detect::DetectedBox> out;
    for (const dlib::rect_detection& d : found) {
      const dlib::full_object_detection shape = predictor_(image, d.rect);
      const auto down = [&](const dlib::dpoint& p) {
        const dlib::dpoint q = pyramid.point_down(p, upsample_);
        return image::Point{static_cast<float>(q.x()), static_cast<float>(q.y())};
      };
      const auto mean = [&](int from, int to) {
        dlib::dpoint m(0, 0);
        for (int i = from; i <= to; ++i) m += dlib::dpoint(shape.part(i));
        return down(m / (to - from + 1));
      };
      // dlib's rectangles include their right and bottom pixels.
      const image::Point tl = down(dlib::dpoint(d.rect.left(), d.rect.top()));
      const image::Point br = down(dlib::dpoint(d.rect.right() + 1, d.rect.bottom() + 1));
      detect::DetectedBox box;
      box.box = image::Box{tl.x, tl.y, br.x, br.y};
      box.score = static_cast<float>(d.detection_confidence);
      box.landmarks = {mean(36, 41), mean(42, 47), down(dlib::dpoint(shape.part(30))),
                       down(dlib::dpoint(shape.part(48))), down(dlib::dpoint(shape.part(54)))};
      out.push_back(box);
    }
    std::sort(out.begin(), out.end(),
              [](const detect::DetectedBox& a, const detect::DetectedBox& b) {
                return a.score > b.score;
              });
    return out;
  }

 private:
  dlib::frontal_face_detector detector_;
  dlib::shape_predictor predictor_;
  const int upsample_;
};

}  // namespace

absl::StatusOr<std::vector<LabelledImage>> ReadImglabXml(const std::string& xml_path) {
  std::ifstream in(xml_path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", xml_path));
  ImglabHandler handler(xml_path);
  dlib::parse_xml(in, static_cast<dlib::document_handler&>(handler),
                  static_cast<dlib::error_handler&>(handler));
  return std::move(handler).Result();
}

absl::StatusOr<std::unique_ptr<DlibHogDetector>> DlibHogDetector::Create(
    const std::string& shape_predictor_path, int upsample) {
  if (!std::filesystem::exists(shape_predictor_path)) {
    return absl::NotFoundError(
        absl::StrCat("dlib's shape predictor ", shape_predictor_path,
                     " does not exist (Debian: apt-get install libdlib-data)"));
  }
  dlib::shape_predictor predictor;
  try {
    dlib::deserialize(shape_predictor_path) >> predictor;
  } catch (const dlib::serialization_error& e) {
    return absl::InvalidArgumentError(absl::StrCat("dlib cannot read the shape predictor ",
                                                   shape_predictor_path, ": ", e.what()));
  }
  if (predictor.num_parts() != 68) {
    return absl::InvalidArgumentError(
        absl::StrCat(shape_predictor_path, " predicts ", predictor.num_parts(), " parts, not 68"));
  }
  return std::make_unique<DlibHogImpl>(std::move(predictor), upsample);
}

}  // namespace arcface::bench
