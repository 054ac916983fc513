#include "server/app/stop_signals.h"

#include <pthread.h>
#include <signal.h>

#include <cstdlib>
#include <thread>

#include <spdlog/spdlog.h>

namespace arcface::app {
namespace {

sigset_t StopSet() {
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  return signals;
}

}  // namespace

void BlockStopSignals() {
  signal(SIGTERM, SIG_DFL);
  signal(SIGINT, SIG_DFL);
  const sigset_t signals = StopSet();
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  signal(SIGPIPE, SIG_IGN);
}

const absl::Notification& WatchStopSignals() {
  // Never destroyed: the detached thread may notify it while the process exits.
  static absl::Notification* const stop = new absl::Notification();
  std::thread([] {
    const sigset_t signals = StopSet();
    int count = 0;
    while (true) {
      int sig = 0;
      if (sigwait(&signals, &sig) != 0) continue;
      if (count++ == 0) {
        spdlog::info("received {}: draining", sig == SIGTERM ? "SIGTERM" : "SIGINT");
        stop->Notify();
      } else {
        spdlog::error("received a second signal during the drain: exiting now");
        spdlog::default_logger()->flush();
        std::_Exit(1);
      }
    }
  }).detach();
  return *stop;
}

}  // namespace arcface::app
