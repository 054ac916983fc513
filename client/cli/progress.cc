#include "client/cli/progress.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>

#include "absl/strings/str_format.h"
#include "absl/time/clock.h"

namespace arcface::cli {

bool ProgressWanted() { return ::isatty(STDOUT_FILENO) == 1 && ::isatty(STDERR_FILENO) == 1; }

std::string FormatProgress(int64_t done, int64_t total, absl::Duration elapsed, int width) {
  const double seconds = absl::ToDoubleSeconds(elapsed);
  const double rate = seconds > 0 ? double(done) / seconds : 0.0;
  const double fraction = total > 0 ? std::clamp(double(done) / double(total), 0.0, 1.0) : 0.0;
  const int filled = static_cast<int>(fraction * width);
  std::string bar = "[" + std::string(filled, '#') + std::string(width - filled, '.') + "]";
  std::string eta = "--:--";
  if (rate > 0 && total >= done) {
    const int64_t left = static_cast<int64_t>(double(total - done) / rate + 0.5);
    eta = left >= 3600 ? absl::StrFormat("%d:%02d:%02d", left / 3600, left / 60 % 60, left % 60)
                       : absl::StrFormat("%d:%02d", left / 60, left % 60);
  }
  return absl::StrFormat("%s %*d/%d files  %.1f/s  ETA %s", bar,
                         static_cast<int>(std::to_string(total).size()), done, total, rate, eta);
}

ProgressBar::ProgressBar(int64_t total, bool enabled)
    : total_(total), enabled_(enabled), start_(absl::Now()) {}

ProgressBar::~ProgressBar() { Finish(); }

void ProgressBar::DrawLocked(const std::string& text, bool force) {
  const absl::Time now = absl::Now();
  if (!force && now - last_draw_ < absl::Milliseconds(100)) return;
  last_draw_ = now;
  shown_ = text;
  std::fprintf(stderr, "\r\033[K%s", text.c_str());
  std::fflush(stderr);
}

void ProgressBar::Update(int64_t done) {
  if (!enabled_) return;
  absl::MutexLock lock(&mu_);
  if (finished_) return;
  DrawLocked(FormatProgress(done, total_, absl::Now() - start_), done >= total_);
}

void ProgressBar::Status(const std::string& line) {
  if (!enabled_) return;
  absl::MutexLock lock(&mu_);
  if (!finished_) DrawLocked(line, false);
}

void ProgressBar::Print(const std::string& line) {
  absl::MutexLock lock(&mu_);
  if (enabled_ && !finished_ && !shown_.empty()) {
    std::fprintf(stderr, "\r\033[K%s\n%s", line.c_str(), shown_.c_str());
  } else {
    std::fprintf(stderr, "%s\n", line.c_str());
  }
  std::fflush(stderr);
}

void ProgressBar::Finish() {
  absl::MutexLock lock(&mu_);
  if (finished_) return;
  finished_ = true;
  if (enabled_ && !shown_.empty()) {  // the last state stays on screen
    std::fprintf(stderr, "\r\033[K%s\n", shown_.c_str());
    std::fflush(stderr);
  }
}

}  // namespace arcface::cli
