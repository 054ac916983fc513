// What `arcface-client embed` reads and writes: the input file list, the landmarks file, and
// the embeddings as .npy (with a sidecar list of file names), .json or .csv; the text tables
// and labels of `arcface-client gallery`.
//
// Contract
// - Writers take rows in the order they are to appear; they write the whole file or return a
//   status naming the path (nothing is left half-written under the final name: they write a
//   temporary file and rename it).
// - .npy: NumPy format 1.0, '<f4' (float32 little-endian), C order, shape (rows, dim); the
//   sidecar `<stem>.files.txt` (see SidecarPath) has one file name per row, in row order.
// - Pure apart from the files they are told to write; thread-compatible.
#ifndef ARCFACE_CLIENT_CLI_OUTPUT_H_
#define ARCFACE_CLIENT_CLI_OUTPUT_H_

#include <array>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <opencv2/core.hpp>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace arcface::cli {

struct EmbeddingRow {
  std::string file;
  float norm = 0;
  std::vector<float> values;
};

struct FailedInput {
  std::string file;
  std::string code;  // "INVALID_ARGUMENT", ...
  std::string message;
};

// The bytes of a .npy file holding `rows` x `dim` float32 values (row-major).
std::string NpyBytes(const std::vector<float>& values, size_t rows, size_t dim);

// "out.npy" → "out.files.txt".
std::string SidecarPath(const std::string& npy_path);

// Writes by the extension of `path`: .npy (+ sidecar), .json or .csv. `model_id` and
// `normalized` are recorded in .json. INVALID_ARGUMENT for another extension.
absl::Status WriteEmbeddings(const std::string& path, const std::vector<EmbeddingRow>& rows,
                             const std::vector<FailedInput>& failed, const std::string& model_id,
                             bool normalized);
// The extensions WriteEmbeddings knows; a usage check before any work is done.
bool IsKnownOutputExtension(const std::string& path);

// Expands files and directories (recursively, image extensions only, sorted) into files, in
// argument order. A path that does not exist is reported in `missing` and left out.
std::vector<std::string> CollectInputFiles(const std::vector<std::string>& inputs,
                                           std::vector<std::string>* missing);

// A landmarks file: either one list of 5 [x, y] points for every input, or an object mapping
// a file (as listed, or its base name) to its 5 points. INVALID_ARGUMENT naming what is wrong.
struct LandmarksFile {
  std::optional<std::array<cv::Point2f, 5>> for_all;
  std::map<std::string, std::array<cv::Point2f, 5>> by_file;
  // The landmarks for `file`, if any.
  std::optional<std::array<cv::Point2f, 5>> Find(const std::string& file) const;
};
absl::StatusOr<LandmarksFile> ParseLandmarksJson(const std::string& text);

// "x0,y0,x1,y1" → the four numbers (x0 < x1, y0 < y1). INVALID_ARGUMENT otherwise.
absl::StatusOr<std::array<float, 4>> ParseBox(const std::string& text);

// "norm=12.3456\t[0.01234, -0.05678, 0.00012, 0.04321, ... 512 values]": an embedding in one
// line, as `embed` and `detect --embed` print it.
std::string EmbeddingSummary(float norm, const std::vector<float>& values);

// A CSV field, quoted when it holds a comma, quote, CR or LF (RFC 4180).
std::string CsvField(const std::string& text);

// Rows as aligned text columns (the first row is the header), each padded to its widest cell
// (counted in UTF-8 code points) and two spaces apart; no trailing spaces; one line per row.
std::string FormatTable(const std::vector<std::vector<std::string>>& rows);

// A threshold in two decimals when they say it all (ArcFace's 0.40), else four (dlib's 0.9144).
std::string FormatThreshold(float threshold);

// What a gallery search's candidates were cut at: "threshold 0.99", "threshold 0.40, the
// model's" (the server's default, when none was `asked`), or "no threshold" (a model of a
// family the server does not know).
std::string ThresholdNote(bool has_threshold, float threshold, bool asked);

// "key=value" (a --label) → the pair. INVALID_ARGUMENT without '=' or with an empty key.
absl::StatusOr<std::pair<std::string, std::string>> ParseLabel(const std::string& text);

}  // namespace arcface::cli

#endif  // ARCFACE_CLIENT_CLI_OUTPUT_H_
