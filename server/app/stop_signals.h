// Stop signals: how SIGTERM and SIGINT reach the Server, without signal handlers.
//
// Contract
// - BlockStopSignals() blocks SIGTERM and SIGINT in the calling thread. Call it first in
//   main(), before any thread exists: every later thread inherits the mask, so only sigwait()
//   ever sees the signals and nothing has to be async-signal-safe. It also restores their
//   default disposition (a process started in the background by a shell inherits SIGINT
//   ignored, and an ignored signal is discarded even while blocked) and ignores SIGPIPE (a
//   client that disconnects mid-write must not end the process).
// - WatchStopSignals() starts the one thread that waits for them and returns the notification
//   it gives: the first signal notifies it (the Server drains); a second one ends the process
//   at once with status 1, whatever it is doing. The notification lives as long as the
//   process. Call it once, after BlockStopSignals() and once logging is configured (the
//   thread logs what it received).
#ifndef ARCFACE_SERVER_APP_STOP_SIGNALS_H_
#define ARCFACE_SERVER_APP_STOP_SIGNALS_H_

#include "absl/synchronization/notification.h"

namespace arcface::app {

void BlockStopSignals();

const absl::Notification& WatchStopSignals();

}  // namespace arcface::app

#endif  // ARCFACE_SERVER_APP_STOP_SIGNALS_H_
