// Writes the seed corpora of the fuzz targets: fuzz_make_seeds <tests/fuzz/corpus>. The
// committed corpus/ was made with it; run it again only to change the seeds. Images are the
// test photos of tests/data, downscaled (a seed must stay small: libFuzzer's inputs grow no larger
// than the largest seed); checkpoints come from the checkpoint tests' own builders.
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "arcface/v1/face_embedding.pb.h"
#include "server/model/checkpoint.h"
#include "server/model/onnx_weights.pb.h"
#include "tests/model/test_checkpoints.h"

namespace {

namespace fs = std::filesystem;
namespace v1 = ::arcface::v1;
namespace tu = ::arcface::model::test_util;

fs::path g_root;

void Write(const std::string& target, const std::string& name, const std::string& bytes) {
  const fs::path dir = g_root / target;
  fs::create_directories(dir);
  std::ofstream out(dir / name, std::ios::binary);
  out << bytes;
  if (!out.good()) {
    std::fprintf(stderr, "cannot write %s\n", (dir / name).c_str());
    std::exit(1);
  }
}

// A test photo, downscaled to `side` pixels wide, encoded as `ext`.
std::string Photo(const std::string& file, int side, const std::string& ext,
                  std::vector<int> params = {}, int flags = cv::IMREAD_UNCHANGED) {
  cv::Mat image = cv::imread(std::string(ARCFACE_TEST_DATA) + "/" + file, flags);
  if (image.empty()) {
    std::fprintf(stderr, "cannot read %s from %s\n", file.c_str(), ARCFACE_TEST_DATA);
    std::exit(1);
  }
  cv::Mat small;
  cv::resize(image, small, cv::Size(side, side * image.rows / image.cols), 0, 0, cv::INTER_AREA);
  std::vector<uint8_t> buffer;
  if (!cv::imencode(ext, small, buffer, params)) {
    std::fprintf(stderr, "cannot encode %s\n", ext.c_str());
    std::exit(1);
  }
  return std::string(buffer.begin(), buffer.end());
}

v1::Face EncodedFace(const std::string& bytes) {
  v1::Face face;
  face.mutable_image()->set_encoded(bytes);
  return face;
}

v1::Face RawFace(int width, int height, v1::PixelFormat format) {
  v1::Face face;
  v1::RawImage* raw = face.mutable_image()->mutable_raw();
  raw->set_width(width);
  raw->set_height(height);
  raw->set_format(format);
  const int channels = format == v1::GRAY8 ? 1 : 3;
  std::string data(size_t(width) * height * channels, '\0');
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<char>(i * 37 % 251);
  raw->set_data(data);
  return face;
}

void SetBox(v1::Face* face, float x0, float y0, float x1, float y1) {
  face->mutable_box()->set_x_min(x0);
  face->mutable_box()->set_y_min(y0);
  face->mutable_box()->set_x_max(x1);
  face->mutable_box()->set_y_max(y1);
}

// The ArcFace template scaled into a `side`-pixel image.
void SetLandmarks(v1::Face* face, float side) {
  const float points[5][2] = {{38.29f, 51.70f}, {73.53f, 51.50f}, {56.03f, 71.74f},
                              {41.55f, 92.37f}, {70.73f, 92.20f}};
  for (const auto& p : points) {
    v1::Point* q = face->add_landmarks();
    q->set_x(p[0] * side / 112);
    q->set_y(p[1] * side / 112);
  }
}

std::map<std::string, v1::Face> Faces() {
  std::map<std::string, v1::Face> faces;
  faces["jpeg_whole"] = EncodedFace(Photo("single_face.jpg", 64, ".jpg", {cv::IMWRITE_JPEG_QUALITY, 60}));
  faces["jpeg_progressive_box"] = EncodedFace(Photo(
      "0-f1-su-ph.jpg", 48, ".jpg", {cv::IMWRITE_JPEG_QUALITY, 50, cv::IMWRITE_JPEG_PROGRESSIVE, 1}));
  SetBox(&faces["jpeg_progressive_box"], -4.5f, 2.0f, 40.0f, 50.0f);
  faces["jpeg_gray_landmarks"] = EncodedFace(
      Photo("BWPictureHuman.jpg", 56, ".jpg", {cv::IMWRITE_JPEG_QUALITY, 50}, cv::IMREAD_GRAYSCALE));
  SetLandmarks(&faces["jpeg_gray_landmarks"], 56);
  faces["png_alpha"] = EncodedFace(Photo("Image_with_alpha.png", 32, ".png"));
  faces["png_landmarks"] = EncodedFace(Photo("15-f13-anc-ph.jpg", 40, ".png"));
  SetLandmarks(&faces["png_landmarks"], 40);
  faces["bmp_box"] = EncodedFace(Photo("45-m7-di-ph.jpg", 24, ".bmp"));
  SetBox(&faces["bmp_box"], 2, 2, 20, 22);
  faces["webp"] = EncodedFace(Photo("0-f15-hao-ph.jpg", 48, ".webp", {cv::IMWRITE_WEBP_QUALITY, 40}));
  faces["tiff"] = EncodedFace(Photo("multi_face.jpg", 24, ".tiff"));
  faces["raw_rgb"] = RawFace(16, 12, v1::RGB8);
  faces["raw_bgr_box"] = RawFace(20, 16, v1::BGR8);
  SetBox(&faces["raw_bgr_box"], 1.5f, 0.5f, 18, 15);
  faces["raw_gray_landmarks"] = RawFace(24, 24, v1::GRAY8);
  SetLandmarks(&faces["raw_gray_landmarks"], 24);
  return faces;
}

void FaceSeeds(const std::map<std::string, v1::Face>& faces) {
  for (const auto& [name, face] : faces) Write("fuzz_face_crop", name, face.SerializeAsString());
}

void ServiceSeeds(const std::map<std::string, v1::Face>& faces) {
  const char kEmbed = 0, kCompare = 1, kStream = 2;
  auto seed = [](char rpc, const std::string& body) { return std::string(1, rpc) + body; };

  v1::EmbedRequest one;
  *one.add_faces() = faces.at("jpeg_whole");
  one.set_request_id("a");
  Write("fuzz_service", "embed_one", seed(kEmbed, one.SerializeAsString()));
  v1::EmbedRequest two;
  *two.add_faces() = faces.at("raw_bgr_box");
  *two.add_faces() = faces.at("png_landmarks");
  two.set_normalize(true);
  Write("fuzz_service", "embed_two", seed(kEmbed, two.SerializeAsString()));
  Write("fuzz_service", "embed_empty", seed(kEmbed, ""));

  v1::CompareRequest compare;
  v1::Embedding* e = compare.add_queries()->mutable_embedding();
  for (int j = 0; j < arcface::model::kEmbeddingDim; ++j) e->add_values(float(j % 7) - 3.0f);
  *compare.add_references()->mutable_face() = faces.at("raw_gray_landmarks");
  compare.set_threshold(0.3f);
  Write("fuzz_service", "compare_mixed", seed(kCompare, compare.SerializeAsString()));
  v1::CompareRequest faces_only;
  *faces_only.add_queries()->mutable_face() = faces.at("bmp_box");
  *faces_only.add_references()->mutable_face() = faces.at("jpeg_gray_landmarks");
  Write("fuzz_service", "compare_faces", seed(kCompare, faces_only.SerializeAsString()));

  v1::EmbedRequest bad;  // a message whose only face has no image: an in-stream error answer
  bad.add_faces();
  bad.set_request_id("bad");
  Write("fuzz_service", "stream_three",
        seed(kStream, one.SerializeAsString() + "#next#" + bad.SerializeAsString() + "#next#" +
                          two.SerializeAsString()));
  Write("fuzz_service", "stream_one", seed(kStream, one.SerializeAsString()));

  const char kDetect = 3, kDetectStream = 4;
  v1::DetectRequest frame;
  *frame.mutable_image() = faces.at("jpeg_whole").image();
  frame.set_embed(true);
  frame.set_request_id("d");
  Write("fuzz_service", "detect_embed", seed(kDetect, frame.SerializeAsString()));
  v1::DetectRequest raw_frame;
  *raw_frame.mutable_image() = faces.at("raw_rgb").image();
  raw_frame.set_min_score(0.3f);
  raw_frame.set_max_faces(2);
  v1::DetectRequest no_image;  // an in-stream error answer
  no_image.set_request_id("none");
  Write("fuzz_service", "detect_stream",
        seed(kDetectStream, frame.SerializeAsString() + "#next#" + no_image.SerializeAsString() +
                                "#next#" + raw_frame.SerializeAsString()));
}

void SafetensorsSeeds() {
  auto entry = [](const std::string& name, const std::string& dtype, std::vector<int64_t> shape,
                  size_t elem) {
    size_t n = 1;
    for (int64_t d : shape) n *= size_t(d);
    std::string data(n * elem, '\0');
    for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<char>(0x3c + i % 3);
    return tu::RawEntry{name, dtype, std::move(shape), data};
  };
  Write("fuzz_safetensors", "dtypes",
        tu::EncodeSafetensors({entry("a", "F32", {2, 3}, 4), entry("b", "F16", {4}, 2),
                               entry("c", "BF16", {1, 2, 2}, 2),
                               entry("bn.num_batches_tracked", "I64", {}, 8)},
                              {{"format", "pt"}}));
  Write("fuzz_safetensors", "empty_tensor", tu::EncodeSafetensors({entry("z", "F32", {0, 5}, 4)}));
  // The key layout of an IResNet with one block per stage, every tensor shrunk to [1]: it gets
  // through the parser and to the checkpoint's key and shape validation.
  std::vector<tu::RawEntry> keys;
  for (const auto& [key, shape] : arcface::model::ExpectedShapes({1, 1, 1, 1})) {
    const bool half = keys.size() % 2 == 1;
    keys.push_back(entry(key, half ? "F16" : "F32", {1}, half ? 2 : 4));
  }
  Write("fuzz_safetensors", "iresnet_keys", tu::EncodeSafetensors(keys, {{"arch", "r18"}}));
  Write("fuzz_safetensors", "header_only", tu::EncodeRaw("{\"__metadata__\":{\"k\":\"v\"}}", ""));
}

// A torch-like export of an IResNet with one block per stage, its initializers stripped of data
// except the first BatchNormalization's: the graph passes every structural check, and the
// conversion runs on that BN before it fails on the missing fc weights.
void OnnxSeeds() {
  const std::array<int, 4> blocks = {1, 1, 1, 1};
  const auto tensors = tu::MakeTensors(blocks, tu::Values::kExact16);
  struct Variant {
    const char* name;
    tu::OnnxOptions options;
  };
  tu::OnnxOptions float_data, float16, moved;
  float_data.float_data = true;
  float16.float16 = true;
  moved.downsample_before_conv1 = true;
  moved.flat_prelu = true;
  moved.transpose_fc = true;
  for (const Variant& v : {Variant{"torch_like", {}}, Variant{"float_data", float_data},
                           Variant{"float16", float16}, Variant{"reordered", moved}}) {
    arcface::onnx::ModelProto model = tu::BuildOnnx(tensors, blocks, v.options);
    for (auto& t : *model.mutable_graph()->mutable_initializer()) {
      if (t.name().rfind("layer1.0.bn1.", 0) == 0) continue;
      t.clear_raw_data();
      t.clear_float_data();
      t.clear_int32_data();
    }
    Write("fuzz_onnx", v.name, model.SerializeAsString());
  }
}

void FlagSeeds() {
  auto argv = [](std::vector<std::string> args) {
    std::string out;
    for (size_t i = 0; i < args.size(); ++i) out += (i ? std::string(1, '\0') : "") + args[i];
    return out;
  };
  Write("fuzz_server_flags", "demo", argv({"--demo-weights"}));
  Write("fuzz_server_flags", "addresses",
        argv({"--demo-weights", "--listen", "[::1]:0", "--http-listen", "127.0.0.1:8080"}));
  Write("fuzz_server_flags", "sizes",
        argv({"--demo-weights", "--max-batch-size", "8", "--max-queue-size=64",
              "--max-image-pixels", "1000000", "--drain-timeout", "1.5m", "--device", "cpu"}));
  Write("fuzz_server_flags", "bad", argv({"--weights", "/nonexistent", "--threads", "-1"}));
  Write(
      "fuzz_server_flags", "detector",
      argv({"--demo-weights", "--detector", "tiny_face_detector:/tmp", "--detector-max-batch-size",
            "4", "--detector-max-queue-size=16", "--detector-max-queue-delay-us", "500",
            "--detector-max-faces", "10", "--detector-min-score", "0.6"}));
  Write("fuzz_server_flags", "models",
        argv({"--model", "arcface=/tmp", "--model", "dlib.v1=/tmp", "--demo-weights"}));
  Write("fuzz_server_flags", "help", argv({"--help"}));
  Write("fuzz_server_flags", "address_only", "0.0.0.0:50051");
}

// TF.js manifests with their shards after "#shard#" (fuzz_tfjs_weights): a face-api manifest
// (float32, uint8-quantised float32 and int32, raw int32) and a graph model of two groups, the
// first in two shards, with float16 and uint16 quantisation.
void TfjsSeeds() {
  auto shard = [](size_t n, int seed) {
    std::string bytes(n, '\0');
    for (size_t i = 0; i < n; ++i) bytes[i] = static_cast<char>((i * 29 + seed) % 61);
    return bytes;
  };
  const nlohmann::json face_api = nlohmann::json::array(
      {{{"paths", {"net.bin"}},
        {"weights",
         {{{"name", "conv0/filters"}, {"shape", {1, 1, 3, 2}}, {"dtype", "float32"},
           {"quantization", {{"dtype", "uint8"}, {"scale", 0.0078125}, {"min", -1}}}},
          {{"name", "conv0/bias"}, {"shape", {2}}, {"dtype", "float32"}},
          {{"name", "stack/1"}, {"shape", nlohmann::json::array()}, {"dtype", "int32"},
           {"quantization", {{"dtype", "uint8"}, {"scale", 1}, {"min", 5118}}}},
          {{"name", "size"}, {"shape", {2}}, {"dtype", "int32"}}}}}});
  // float32 [2] = 1.5, -0.25; int32 [2] = 512, 512.
  const std::string bias("\x00\x00\xc0\x3f\x00\x00\x80\xbe", 8);
  const std::string size("\x00\x02\x00\x00\x00\x02\x00\x00", 8);
  Write("fuzz_tfjs_weights", "face_api",
        face_api.dump() + "#shard#" + shard(6, 1) + bias + shard(1, 0) + size);

  const nlohmann::json graph = {
      {"format", "graph-model"},
      {"modelTopology", nlohmann::json::object()},
      {"weightsManifest",
       {{{"paths", {"group1-shard1of2.bin", "group1-shard2of2.bin"}},
         {"weights",
          {{{"name", "h"}, {"shape", {3}}, {"dtype", "float32"},
            {"quantization", {{"dtype", "float16"}}}},
           {{"name", "u"}, {"shape", {2, 1}}, {"dtype", "float32"},
            {"quantization", {{"dtype", "uint16"}, {"scale", 0.001}, {"min", -2}}}}}}},
        {{"paths", {"group2-shard1of1.bin"}},
         {"weights", {{{"name", "e"}, {"shape", {0, 4}}, {"dtype", "float32"}},
                      {{"name", "i"}, {"shape", {1}}, {"dtype", "int32"},
                       {"quantization", {{"dtype", "uint16"}, {"scale", 2}, {"min", -7}}}}}}}}}};
  // float16 1, -2, 0.5, then uint16 [2]; split inside the second half.
  const std::string halves("\x00\x3c\x00\xc0\x00\x38", 6);
  Write("fuzz_tfjs_weights", "graph_model",
        graph.dump() + "#shard#" + halves.substr(0, 3) + "#shard#" + halves.substr(3) +
            shard(4, 2) + "#shard#" + shard(2, 3));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s tests/fuzz/corpus\n", argv[0]);
    return 2;
  }
  g_root = argv[1];
  const auto faces = Faces();
  FaceSeeds(faces);
  ServiceSeeds(faces);
  SafetensorsSeeds();
  OnnxSeeds();
  FlagSeeds();
  TfjsSeeds();
  return 0;
}
