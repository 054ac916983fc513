// Process signals: how SIGTERM, SIGINT and SIGHUP reach the Server, without signal handlers.
//
// Contract
// - BlockProcessSignals() blocks SIGTERM, SIGINT and SIGHUP in the calling thread. Call it first
//   in main(), before any thread exists: every later thread inherits the mask, so only
//   sigwait() ever sees the signals and nothing has to be async-signal-safe. It also restores
//   their default disposition (a process started in the background by a shell inherits SIGINT
//   ignored, one started by nohup SIGHUP, and an ignored signal is discarded even while
//   blocked) and ignores SIGPIPE (a client that disconnects mid-write must not end the
//   process).
// - WatchProcessSignals() starts the one thread that waits for them and returns the stop
//   notification: the first SIGTERM or SIGINT notifies it (the Server drains); a second one
//   ends the process at once with status 1, whatever it is doing. SIGHUP calls the reload
//   handler (SetReloadHandler()) on that thread, or, before there is one (the models are still
//   loading: they read their files now anyway), is logged and ignored. The notification lives
//   as long as the process. Call it once, after BlockProcessSignals() and once logging is
//   configured (the thread logs what it received).
// - SetReloadHandler(): the handler must return quickly (queue the reload, not do it); an
//   empty one clears it. Any thread; the handler may run until SetReloadHandler() returns.
#ifndef ARCFACE_SERVER_APP_PROCESS_SIGNALS_H_
#define ARCFACE_SERVER_APP_PROCESS_SIGNALS_H_

#include <functional>

#include "absl/synchronization/notification.h"

namespace arcface::app {

void BlockProcessSignals();

const absl::Notification& WatchProcessSignals();

void SetReloadHandler(std::function<void()> handler);

}  // namespace arcface::app

#endif  // ARCFACE_SERVER_APP_PROCESS_SIGNALS_H_
