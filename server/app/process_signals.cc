#include "server/app/process_signals.h"

#include <pthread.h>
#include <signal.h>
#include <spdlog/spdlog.h>

#include <cstdlib>
#include <thread>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace arcface::app {
namespace {

sigset_t WatchedSet() {
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGHUP);
  return signals;
}

// The reload handler, held under its mutex while it runs so that clearing it waits for a call
// in progress.
struct ReloadHandler {
  absl::Mutex mu;
  std::function<void()> handler ABSL_GUARDED_BY(mu);
};

// Never destroyed, as the stop notification below.
ReloadHandler& Reload() {
  static ReloadHandler* const reload = new ReloadHandler();
  return *reload;
}

void OnHangUp() {
  ReloadHandler& reload = Reload();
  absl::MutexLock lock(&reload.mu);
  if (reload.handler) {
    spdlog::info("received SIGHUP: reloading the models");
    reload.handler();
  } else {
    spdlog::warn("received SIGHUP before serving: ignored (the models are being loaded now)");
  }
}

}  // namespace

void BlockProcessSignals() {
  signal(SIGTERM, SIG_DFL);
  signal(SIGINT, SIG_DFL);
  signal(SIGHUP, SIG_DFL);
  const sigset_t signals = WatchedSet();
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  signal(SIGPIPE, SIG_IGN);
}

const absl::Notification& WatchProcessSignals() {
  // Never destroyed: the detached thread may notify it while the process exits.
  static absl::Notification* const stop = new absl::Notification();
  std::thread([] {
    const sigset_t signals = WatchedSet();
    int count = 0;
    while (true) {
      int sig = 0;
      if (sigwait(&signals, &sig) != 0) continue;
      if (sig == SIGHUP) {
        OnHangUp();
      } else if (count++ == 0) {
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

void SetReloadHandler(std::function<void()> handler) {
  ReloadHandler& reload = Reload();
  absl::MutexLock lock(&reload.mu);
  reload.handler = std::move(handler);
}

}  // namespace arcface::app
