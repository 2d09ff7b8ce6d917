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
  absl::StatusOr<moed::server::CommandLine> command_line =
      moed::server::ParseCommandLine(args, moed::server::ProcessEnvironment());
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

  // Block the stop signals before any thread starts, so that only sigwait() below sees them.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  auto logger = moed::server::MakeLogger("moed", config.log_level, config.log_format);
  if (!logger.ok()) {
    std::cerr << "moed: error: " << logger.status().message() << "\n";
    return 2;
  }
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

  int signal_number = 0;
  sigwait(&stop_signals, &signal_number);
  (*logger)->info("received {}, shutting down", signal_number == SIGTERM ? "SIGTERM" : "SIGINT");
  (*daemon)->Drain(std::chrono::seconds(config.drain_seconds));
  (*daemon)->Shutdown(std::chrono::seconds(1));
  return 0;
}

}  // namespace

int main(int argc, char** argv) { return Run(argc, argv); }
