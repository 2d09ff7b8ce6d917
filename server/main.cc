#include <csignal>
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include "server/config.h"
#include "server/daemon.h"
#include "server/logging.h"
#include "util/fmt_absl.h"

namespace {

int Run(int argc, char** argv) {
  using moed::server::Action;
  std::vector<std::string> args(argv + 1, argv + argc);
  absl::StatusOr<moed::server::CommandLine> command_line = moed::server::ParseCommandLine(
      args, moed::server::ProcessEnvironment(), moed::server::ProcessEnvironmentNames());
  if (!command_line.ok()) {
    std::cerr << "moed: error: " << command_line.status().message() << "\n";
    return 2;
  }
  switch (command_line->action) {
    case Action::kHelp:
      std::cout << moed::server::HelpText();
      return 0;
    case Action::kVersion:
      std::cout << "moed " << MOED_VERSION << "\n";
      return 0;
    case Action::kHelpMarkdown:
      std::cout << moed::server::OptionsMarkdown();
      return 0;
    case Action::kRun:
      break;
  }
  const moed::server::DaemonConfig& config = command_line->config;

  // Block the signals moed handles before any thread starts, so that only this thread sees
  // them (through sigwait below).
  sigset_t handled;
  sigemptyset(&handled);
  sigaddset(&handled, SIGINT);
  sigaddset(&handled, SIGTERM);
  sigaddset(&handled, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &handled, nullptr);

  auto logger = moed::server::MakeLogger("moed", config.log_level, config.log_format);
  if (!logger.ok()) {
    std::cerr << "moed: error: " << logger.status().message() << "\n";
    return 2;
  }
  moed::server::RouteLibraryLogs(*logger);
  for (const std::string& warning : command_line->warnings) (*logger)->warn("{}", warning);
  auto daemon = moed::server::Daemon::Create(config, *logger);
  if (!daemon.ok()) {
    (*logger)->error("cannot start: {}", daemon.status().message());
    std::cerr << "moed: error: " << daemon.status().message() << "\n";
    return 1;
  }
  absl::StatusOr<moed::server::Daemon::Addresses> addresses = (*daemon)->Start();
  if (!addresses.ok()) {
    (*logger)->error("cannot start: {}", addresses.status().message());
    std::cerr << "moed: error: " << addresses.status().message() << "\n";
    return 1;
  }
  std::cout << "listening on " << addresses->grpc << "\n";
  if (!addresses->http.empty()) std::cout << "http listening on " << addresses->http << "\n";
  std::cout << std::flush;

  auto name = [](int signal_number) {
    return signal_number == SIGTERM ? "SIGTERM" : signal_number == SIGINT ? "SIGINT" : "SIGHUP";
  };
  // SIGHUP (a closed terminal, or an operator's "reload") does not stop the daemon: it logs to
  // stderr, so there is nothing to reopen, and its configuration is read only at start.
  auto ignore_hangup = [&] {
    (*logger)->info("received SIGHUP: ignored (restart the daemon to change its configuration)");
  };
  int signal_number = 0;
  while (sigwait(&handled, &signal_number) == 0 && signal_number == SIGHUP) ignore_hangup();
  (*logger)->info("received {}: draining for up to {} s (send it again to stop now)",
                  name(signal_number), config.drain_seconds);
  // A second SIGTERM or SIGINT during the drain ends it at once.
  auto stop_now = [&] {
    const timespec no_wait{0, 0};
    const int again = sigtimedwait(&handled, nullptr, &no_wait);
    if (again == SIGHUP) ignore_hangup();
    if (again != SIGTERM && again != SIGINT) return false;
    (*logger)->warn("received {} again: ending the drain now", name(again));
    return true;
  };
  (*daemon)->Drain(std::chrono::seconds(config.drain_seconds), stop_now);
  (*daemon)->Shutdown(std::chrono::seconds(1));
  return 0;
}

}  // namespace

int main(int argc, char** argv) { return Run(argc, argv); }
