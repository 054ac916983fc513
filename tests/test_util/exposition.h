// ParseExposition: reads a Prometheus text exposition back into samples, for tests that check
// what /metrics renders. Lines that do not parse fail the current test (gtest EXPECT).
#ifndef ARCFACE_TESTS_TEST_UTIL_EXPOSITION_H_
#define ARCFACE_TESTS_TEST_UTIL_EXPOSITION_H_

#include <map>
#include <string>
#include <vector>

namespace arcface::test_util {

struct Sample {
  std::string name;
  std::map<std::string, std::string> labels;
  double value;
};

// "# TYPE" lines into `types` (name → type), every sample line into a Sample, in order.
std::vector<Sample> ParseExposition(const std::string& text,
                                    std::map<std::string, std::string>* types);

}  // namespace arcface::test_util

#endif  // ARCFACE_TESTS_TEST_UTIL_EXPOSITION_H_
