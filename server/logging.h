#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "spdlog/logger.h"

namespace moed::server {

// A logger writing to stderr. format "text": "2026-11-22T10:51:14.123Z info message";
// "json": {"ts":"...","level":"info","logger":"moed","msg":"..."} per line, properly escaped.
absl::StatusOr<std::shared_ptr<spdlog::logger>> MakeLogger(const std::string& name,
                                                           const std::string& level,
                                                           const std::string& format);

// Sends the gRPC and protobuf libraries' own log lines through `logger`'s sink, as loggers
// named "grpc" and "protobuf", so that they take the daemon's format and level instead of
// writing raw lines to stderr. The libraries accept only plain function pointers, so those two
// loggers are kept in spdlog's registry, where the callbacks find them.
void RouteLibraryLogs(const std::shared_ptr<spdlog::logger>& logger);

}  // namespace moed::server
