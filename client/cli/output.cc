#include "client/cli/output.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>

#include <nlohmann/json.hpp>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"

namespace arcface::cli {
namespace fs = std::filesystem;
namespace {

std::string Lower(std::string s) {
  absl::AsciiStrToLower(&s);
  return s;
}

std::string Extension(const std::string& path) { return Lower(fs::path(path).extension().string()); }

// Writes `bytes` to `path` through a temporary file in the same folder and a rename.
absl::Status WriteWhole(const std::string& path, const std::string& bytes) {
  const std::string tmp = absl::StrCat(path, ".tmp.", ::getpid());
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    out.close();
    if (!out) {
      std::remove(tmp.c_str());
      return absl::PermissionDeniedError(absl::StrCat("cannot write ", path));
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    return absl::PermissionDeniedError(absl::StrCat("cannot write ", path));
  }
  return absl::OkStatus();
}

// Shortest text that reads back as the same float.
std::string FloatText(float v) { return absl::StrFormat("%.9g", v); }

absl::StatusOr<std::array<cv::Point2f, 5>> Points(const nlohmann::json& j, const std::string& what) {
  std::array<cv::Point2f, 5> out;
  if (!j.is_array() || j.size() != 5) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": expected 5 [x, y] points"));
  }
  for (size_t i = 0; i < 5; ++i) {
    const auto& p = j[i];
    if (!p.is_array() || p.size() != 2 || !p[0].is_number() || !p[1].is_number()) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": point ", i, " is not [x, y] with two numbers"));
    }
    out[i] = cv::Point2f(p[0].get<float>(), p[1].get<float>());
  }
  return out;
}

}  // namespace

std::string NpyBytes(const std::vector<float>& values, size_t rows, size_t dim) {
  std::string header = absl::StrCat("{'descr': '<f4', 'fortran_order': False, 'shape': (", rows,
                                    ", ", dim, "), }");
  // Magic (6) + version (2) + length (2) + header + '\n' is padded to a multiple of 64.
  const size_t unpadded = 10 + header.size() + 1;
  header.append((64 - unpadded % 64) % 64, ' ');
  header.push_back('\n');
  std::string out("\x93NUMPY\x01\x00", 8);
  out.push_back(static_cast<char>(header.size() & 0xff));
  out.push_back(static_cast<char>(header.size() >> 8));
  out += header;
  out.reserve(out.size() + values.size() * 4);
  for (float v : values) {
    uint32_t bits;
    std::memcpy(&bits, &v, 4);
    for (int b = 0; b < 4; ++b) out.push_back(static_cast<char>((bits >> (8 * b)) & 0xff));
  }
  return out;
}

std::string SidecarPath(const std::string& npy_path) {
  fs::path p(npy_path);
  return p.replace_extension(".files.txt").string();
}

bool IsKnownOutputExtension(const std::string& path) {
  const std::string ext = Extension(path);
  return ext == ".npy" || ext == ".json" || ext == ".csv";
}

std::string EmbeddingSummary(float norm, const std::vector<float>& values) {
  std::string out = absl::StrFormat("norm=%.4f\t[", norm);
  for (size_t j = 0; j < 4 && j < values.size(); ++j) {
    absl::StrAppendFormat(&out, "%s%.5f", j ? ", " : "", values[j]);
  }
  absl::StrAppend(&out, ", ... ", values.size(), " values]");
  return out;
}

std::string CsvField(const std::string& text) {
  if (text.find_first_of(",\"\r\n") == std::string::npos) return text;
  std::string out = "\"";
  for (char c : text) {
    if (c == '"') out += '"';
    out += c;
  }
  out += '"';
  return out;
}

std::string FormatThreshold(float threshold) {
  const bool two = std::abs(std::round(threshold * 100.0) / 100.0 - threshold) < 1e-6;
  return two ? absl::StrFormat("%.2f", threshold) : absl::StrFormat("%.4f", threshold);
}

std::string ThresholdNote(bool has_threshold, float threshold, bool asked) {
  if (!has_threshold) return "no threshold";
  return absl::StrCat("threshold ", FormatThreshold(threshold), asked ? "" : ", the model's");
}

std::string FormatTable(const std::vector<std::vector<std::string>>& rows) {
  // Code points: continuation bytes (10xxxxxx) do not count.
  auto width = [](const std::string& text) {
    size_t n = 0;
    for (unsigned char c : text) n += (c & 0xC0) != 0x80;
    return n;
  };
  std::vector<size_t> widths;
  for (const auto& row : rows) {
    if (widths.size() < row.size()) widths.resize(row.size(), 0);
    for (size_t j = 0; j < row.size(); ++j) widths[j] = std::max(widths[j], width(row[j]));
  }
  std::string out;
  for (const auto& row : rows) {
    std::string line;
    for (size_t j = 0; j < row.size(); ++j) {
      if (j > 0) line.append(widths[j - 1] - width(row[j - 1]) + 2, ' ');
      line += row[j];
    }
    absl::StrAppend(&out, absl::StripTrailingAsciiWhitespace(line), "\n");
  }
  return out;
}

absl::StatusOr<std::pair<std::string, std::string>> ParseLabel(const std::string& text) {
  const size_t eq = text.find('=');
  if (eq == std::string::npos || eq == 0) {
    return absl::InvalidArgumentError(absl::StrCat("'", text, "' is not key=value"));
  }
  return std::pair{text.substr(0, eq), text.substr(eq + 1)};
}

absl::Status WriteEmbeddings(const std::string& path, const std::vector<EmbeddingRow>& rows,
                             const std::vector<FailedInput>& failed, const std::string& model_id,
                             bool normalized) {
  const std::string ext = Extension(path);
  const size_t dim = rows.empty() ? 512 : rows.front().values.size();
  for (const EmbeddingRow& r : rows) {
    if (r.values.size() != dim) {
      return absl::InternalError(absl::StrCat(r.file, ": ", r.values.size(), " values, not ", dim));
    }
  }
  if (ext == ".npy") {
    std::vector<float> flat;
    flat.reserve(rows.size() * dim);
    std::string names;
    for (const EmbeddingRow& r : rows) {
      if (r.file.find('\n') != std::string::npos) {
        return absl::InvalidArgumentError(
            absl::StrCat("cannot list a file name with a line break in ", SidecarPath(path)));
      }
      flat.insert(flat.end(), r.values.begin(), r.values.end());
      absl::StrAppend(&names, r.file, "\n");
    }
    absl::Status s = WriteWhole(path, NpyBytes(flat, rows.size(), dim));
    if (s.ok()) s = WriteWhole(SidecarPath(path), names);
    return s;
  }
  if (ext == ".json") {
    nlohmann::json doc;
    doc["model_id"] = model_id;
    doc["normalized"] = normalized;
    doc["dim"] = dim;
    doc["embeddings"] = nlohmann::json::array();
    for (const EmbeddingRow& r : rows) {
      doc["embeddings"].push_back({{"file", r.file}, {"norm", r.norm}, {"embedding", r.values}});
    }
    doc["errors"] = nlohmann::json::array();
    for (const FailedInput& f : failed) {
      doc["errors"].push_back({{"file", f.file}, {"code", f.code}, {"message", f.message}});
    }
    // Invalid UTF-8 in a file name is replaced rather than failing the whole output.
    return WriteWhole(path, doc.dump(1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n");
  }
  if (ext == ".csv") {
    std::string out = "file,norm";
    for (size_t j = 0; j < dim; ++j) absl::StrAppend(&out, ",e", j);
    out += "\n";
    for (const EmbeddingRow& r : rows) {
      absl::StrAppend(&out, CsvField(r.file), ",", FloatText(r.norm));
      for (float v : r.values) absl::StrAppend(&out, ",", FloatText(v));
      out += "\n";
    }
    return WriteWhole(path, out);
  }
  return absl::InvalidArgumentError(
      absl::StrCat("--out ", path, ": unknown extension; use .npy, .json or .csv"));
}

std::vector<std::string> CollectInputFiles(const std::vector<std::string>& inputs,
                                           std::vector<std::string>* missing) {
  static const std::set<std::string> kImageExtensions = {".jpg", ".jpeg", ".png", ".bmp",
                                                         ".webp", ".tif", ".tiff"};
  std::vector<std::string> files;
  for (const std::string& input : inputs) {
    std::error_code ec;
    if (fs::is_directory(input, ec)) {
      std::vector<std::string> found;
      for (fs::recursive_directory_iterator it(input, fs::directory_options::skip_permission_denied,
                                               ec),
           end;
           !ec && it != end; it.increment(ec)) {
        if (it->is_regular_file(ec) && kImageExtensions.count(Extension(it->path().string()))) {
          found.push_back(it->path().string());
        }
      }
      std::sort(found.begin(), found.end());
      files.insert(files.end(), found.begin(), found.end());
    } else if (fs::exists(input, ec)) {
      files.push_back(input);  // named explicitly: taken whatever its extension
    } else {
      missing->push_back(input);
    }
  }
  return files;
}

std::optional<std::array<cv::Point2f, 5>> LandmarksFile::Find(const std::string& file) const {
  if (auto it = by_file.find(file); it != by_file.end()) return it->second;
  if (auto it = by_file.find(fs::path(file).filename().string()); it != by_file.end()) {
    return it->second;
  }
  return for_all;
}

absl::StatusOr<LandmarksFile> ParseLandmarksJson(const std::string& text) {
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::InvalidArgumentError("not valid JSON");
  LandmarksFile out;
  if (j.is_array()) {
    auto points = Points(j, "landmarks");
    if (!points.ok()) return points.status();
    out.for_all = *points;
    return out;
  }
  if (!j.is_object()) {
    return absl::InvalidArgumentError(
        "expected [[x, y] x 5] or {\"file\": [[x, y] x 5], ...}");
  }
  for (const auto& [file, value] : j.items()) {
    auto points = Points(value, absl::StrCat("\"", file, "\""));
    if (!points.ok()) return points.status();
    out.by_file[file] = *points;
  }
  return out;
}

absl::StatusOr<std::array<float, 4>> ParseBox(const std::string& text) {
  std::vector<std::string> parts = absl::StrSplit(text, ',');
  std::array<float, 4> box{};
  if (parts.size() != 4) {
    return absl::InvalidArgumentError(absl::StrCat("'", text, "' is not x0,y0,x1,y1"));
  }
  for (int i = 0; i < 4; ++i) {
    if (!absl::SimpleAtof(absl::StripAsciiWhitespace(parts[i]), &box[i]) || !std::isfinite(box[i])) {
      return absl::InvalidArgumentError(absl::StrCat("'", text, "': '", parts[i], "' is not a number"));
    }
  }
  if (!(box[0] < box[2] && box[1] < box[3])) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", text, "': need x0 < x1 and y0 < y1"));
  }
  return box;
}

}  // namespace arcface::cli
