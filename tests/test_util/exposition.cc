#include "tests/test_util/exposition.h"

#include <cmath>
#include <regex>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "gtest/gtest.h"

namespace arcface::test_util {

std::vector<Sample> ParseExposition(const std::string& text,
                                    std::map<std::string, std::string>* types) {
  std::vector<Sample> samples;
  const std::regex sample_re(R"(^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$)");
  const std::regex label_re(R"re(([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)")re");
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (line.empty()) continue;
    std::string l(line);
    if (absl::StartsWith(l, "# TYPE ")) {
      std::vector<std::string> parts = absl::StrSplit(l, ' ');
      EXPECT_EQ(parts.size(), 4u) << l;
      (*types)[parts[2]] = parts[3];
      continue;
    }
    if (absl::StartsWith(l, "# HELP ")) continue;
    std::smatch m;
    EXPECT_TRUE(std::regex_match(l, m, sample_re)) << "not a sample line: " << l;
    if (m.empty()) continue;
    Sample s;
    s.name = m[1];
    std::string labels = m[3];
    for (auto it = std::sregex_iterator(labels.begin(), labels.end(), label_re);
         it != std::sregex_iterator(); ++it) {
      s.labels[(*it)[1]] = (*it)[2];
    }
    std::string v = m[4];
    if (v == "+Inf") {
      s.value = INFINITY;
    } else {
      EXPECT_TRUE(absl::SimpleAtod(v, &s.value)) << l;
    }
    samples.push_back(s);
  }
  return samples;
}

}  // namespace arcface::test_util
