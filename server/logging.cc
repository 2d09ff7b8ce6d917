#include "server/logging.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "google/protobuf/stubs/logging.h"
#include "grpc/support/log.h"
#include "nlohmann/json.hpp"
#include "spdlog/details/fmt_helper.h"
#include "spdlog/formatter.h"
#include "spdlog/pattern_formatter.h"
#include "spdlog/sinks/stdout_sinks.h"
#include "spdlog/spdlog.h"

namespace moed::server {
namespace {

std::string Timestamp(const spdlog::log_clock::time_point& time) {
  auto seconds = std::chrono::time_point_cast<std::chrono::seconds>(time);
  auto millis = std::chrono::duration_cast<std::chrono::milliseconds>(time - seconds).count();
  std::time_t t = std::chrono::system_clock::to_time_t(seconds);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buffer[32];
  std::strftime(buffer, sizeof(buffer), "%Y-%m-%dT%H:%M:%S", &tm);
  char with_millis[48];
  std::snprintf(with_millis, sizeof(with_millis), "%s.%03lldZ", buffer,
                static_cast<long long>(millis));
  return with_millis;
}

class JsonFormatter final : public spdlog::formatter {
 public:
  void format(const spdlog::details::log_msg& msg, spdlog::memory_buf_t& dest) override {
    nlohmann::json line = {
        {"ts", Timestamp(msg.time)},
        {"level", std::string(spdlog::level::to_string_view(msg.level).data(),
                              spdlog::level::to_string_view(msg.level).size())},
        {"logger", std::string(msg.logger_name.data(), msg.logger_name.size())},
        {"msg", std::string(msg.payload.data(), msg.payload.size())},
    };
    std::string text = line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    text.push_back('\n');
    dest.append(text.data(), text.data() + text.size());
  }
  std::unique_ptr<spdlog::formatter> clone() const override {
    return std::make_unique<JsonFormatter>();
  }
};

constexpr char kGrpcLogger[] = "grpc";
constexpr char kProtobufLogger[] = "protobuf";

const char* BaseName(const char* path) {
  if (path == nullptr) return "";
  const char* slash = std::strrchr(path, '/');
  return slash == nullptr ? path : slash + 1;
}

void LogGrpc(gpr_log_func_args* args) {
  std::shared_ptr<spdlog::logger> log = spdlog::get(kGrpcLogger);
  if (log == nullptr) return;
  const spdlog::level::level_enum level =
      args->severity == GPR_LOG_SEVERITY_ERROR  ? spdlog::level::err
      : args->severity == GPR_LOG_SEVERITY_INFO ? spdlog::level::info
                                                : spdlog::level::debug;
  log->log(level, "{} ({}:{})", args->message, BaseName(args->file), args->line);
}

void LogProtobuf(google::protobuf::LogLevel level, const char* filename, int line,
                 const std::string& message) {
  std::shared_ptr<spdlog::logger> log = spdlog::get(kProtobufLogger);
  if (log == nullptr) return;
  spdlog::level::level_enum to = spdlog::level::info;
  if (level == google::protobuf::LOGLEVEL_WARNING) to = spdlog::level::warn;
  if (level >= google::protobuf::LOGLEVEL_ERROR) to = spdlog::level::err;
  log->log(to, "{} ({}:{})", message, BaseName(filename), line);
}

}  // namespace

void RouteLibraryLogs(const std::shared_ptr<spdlog::logger>& logger) {
  for (const char* name : {kGrpcLogger, kProtobufLogger}) {
    spdlog::drop(name);
    spdlog::register_logger(logger->clone(name));
  }
  gpr_set_log_function(&LogGrpc);
  google::protobuf::SetLogHandler(&LogProtobuf);
}

absl::StatusOr<std::shared_ptr<spdlog::logger>> MakeLogger(const std::string& name,
                                                           const std::string& level,
                                                           const std::string& format) {
  auto sink = std::make_shared<spdlog::sinks::stderr_sink_mt>();
  if (format == "json") {
    sink->set_formatter(std::make_unique<JsonFormatter>());
  } else if (format == "text") {
    sink->set_formatter(std::make_unique<spdlog::pattern_formatter>(
        "%Y-%m-%dT%H:%M:%S.%eZ %l %v", spdlog::pattern_time_type::utc));
  } else {
    return absl::InvalidArgumentError(absl::StrCat("unknown log format '", format, "'"));
  }
  auto logger = std::make_shared<spdlog::logger>(name, std::move(sink));
  spdlog::level::level_enum parsed = spdlog::level::from_str(level);
  if (parsed == spdlog::level::off && level != "off") {
    return absl::InvalidArgumentError(absl::StrCat("unknown log level '", level, "'"));
  }
  logger->set_level(parsed);
  logger->flush_on(spdlog::level::trace);
  return logger;
}

}  // namespace moed::server
