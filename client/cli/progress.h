// A one-line progress display on stderr for long CLI commands (embed, bench).
//
// Contract
// - Draws only when `enabled` (the CLI passes: stdout and stderr are both terminals), so output
//   that is piped or redirected never contains control characters or partial lines.
// - Redraws at most ten times a second; Print() writes a whole line above the bar; Finish()
//   ends the line, leaving the last state on screen. Thread-safe (one mutex).
#ifndef ARCFACE_CLIENT_CLI_PROGRESS_H_
#define ARCFACE_CLIENT_CLI_PROGRESS_H_

#include <cstdint>
#include <string>

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace arcface::cli {

// Whether progress should be drawn: both stdout and stderr are terminals.
bool ProgressWanted();

// "[#########...........]  12/40 files  3.1/s  ETA 0:09" (width: bar characters).
std::string FormatProgress(int64_t done, int64_t total, absl::Duration elapsed, int width = 30);

class ProgressBar {
 public:
  ProgressBar(int64_t total, bool enabled);
  ~ProgressBar();
  // `done` items so far.
  void Update(int64_t done);
  // A free-form status line (bench), redrawn like the bar.
  void Status(const std::string& line);
  // A message line; the bar is redrawn under it.
  void Print(const std::string& line);
  void Finish();
  bool enabled() const { return enabled_; }

 private:
  void DrawLocked(const std::string& text, bool force) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const int64_t total_;
  const bool enabled_;
  const absl::Time start_;
  absl::Mutex mu_;
  absl::Time last_draw_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
  std::string shown_ ABSL_GUARDED_BY(mu_);
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace arcface::cli

#endif  // ARCFACE_CLIENT_CLI_PROGRESS_H_
