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

}  // namespace moed::server
