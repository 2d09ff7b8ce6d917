#include "server/config.h"

#include <catch2/catch.hpp>
#include <cstdio>
#include <fstream>
#include <map>

namespace moed::server {
namespace {

EnvLookup FakeEnv(std::map<std::string, std::string> vars) {
  return [vars = std::move(vars)](const std::string& name) -> std::optional<std::string> {
    auto it = vars.find(name);
    if (it == vars.end()) return std::nullopt;
    return it->second;
  };
}

std::string ErrorOf(const std::vector<std::string>& args,
                    std::map<std::string, std::string> env = {}) {
  absl::StatusOr<CommandLine> parsed = ParseCommandLine(args, FakeEnv(std::move(env)));
  REQUIRE_FALSE(parsed.ok());
  std::string message(parsed.status().message());
  CHECK(message.find('\n') == std::string::npos);  // errors are one line
  return message;
}

std::string WriteTempFile(const std::string& text) {
  char name[] = "/tmp/moed_config_testXXXXXX";
  int fd = mkstemp(name);
  REQUIRE(fd >= 0);
  close(fd);
  std::ofstream(name) << text;
  return name;
}

TEST_CASE("defaults: loopback and a model from the flags") {
  absl::StatusOr<CommandLine> parsed = ParseCommandLine({"--model", "/m"}, FakeEnv({}));
  REQUIRE(parsed.ok());
  CHECK(parsed->action == Action::kRun);
  CHECK(parsed->config.model == "/m");
  CHECK(parsed->config.listen == "127.0.0.1:50051");
  CHECK(parsed->config.backend == "auto");
  CHECK(parsed->config.log_format == "text");
}

TEST_CASE("flags accept --name value and --name=value") {
  absl::StatusOr<CommandLine> parsed = ParseCommandLine(
      {"--model=/m", "--listen", "[::1]:0", "--cuda-device=2", "--log-format", "json"},
      FakeEnv({}));
  REQUIRE(parsed.ok());
  CHECK(parsed->config.listen == "[::1]:0");
  CHECK(parsed->config.cuda_device == 2);
  CHECK(parsed->config.log_format == "json");
}

TEST_CASE("boolean flags: alone for true, or followed by true or false") {
  auto aware = [](std::vector<std::string> args) {
    args.insert(args.begin(), {"--model", "/m"});
    absl::StatusOr<CommandLine> parsed = ParseCommandLine(args, FakeEnv({}));
    REQUIRE(parsed.ok());
    return parsed->config.expert_aware_batching;
  };
  CHECK_FALSE(aware({"--expert-aware-batching", "false"}));
  CHECK_FALSE(aware({"--expert-aware-batching=false"}));
  CHECK(aware({"--expert-aware-batching", "true"}));
  CHECK(aware({"--expert-aware-batching=false", "--expert-aware-batching"}));
  // A following flag is not taken as the value.
  absl::StatusOr<CommandLine> parsed =
      ParseCommandLine({"--expert-aware-batching", "--model", "/m"}, FakeEnv({}));
  REQUIRE(parsed.ok());
  CHECK(parsed->config.expert_aware_batching);
  CHECK(parsed->config.model == "/m");
}

TEST_CASE("precedence: flags over environment over file over defaults") {
  std::string file =
      WriteTempFile(R"({"model": "/from-file", "log-level": "debug", "backend": "cpu"})");
  absl::StatusOr<CommandLine> parsed =
      ParseCommandLine({"--config", file, "--log-level", "warn"},
                       FakeEnv({{"MOED_LOG_LEVEL", "error"}, {"MOED_BACKEND", "cuda"}}));
  REQUIRE(parsed.ok());
  CHECK(parsed->config.model == "/from-file");
  CHECK(parsed->config.log_level == "warn");  // flag beats variable and file
  CHECK(parsed->config.backend == "cuda");    // variable beats file
  CHECK(parsed->config.config == file);
  std::remove(file.c_str());

  std::string via_env = WriteTempFile(R"({"model": "/env-file"})");
  parsed = ParseCommandLine({}, FakeEnv({{"MOED_CONFIG", via_env}}));
  REQUIRE(parsed.ok());
  CHECK(parsed->config.model == "/env-file");
  std::remove(via_env.c_str());
}

TEST_CASE("bad flags give one-line errors naming the problem") {
  CHECK(ErrorOf({"--model", "/m", "--bogus", "1"}) == "unknown flag --bogus (see --help)");
  CHECK(ErrorOf({"--model"}) == "--model needs a value (DIR)");
  CHECK(ErrorOf({"--model", "/m", "--cuda-device", "x"}) ==
        "--cuda-device: expected an integer, got 'x'");
  CHECK(ErrorOf({"--model", "/m", "--cuda-device", "-1"})
            .rfind("--cuda-device: -1 is out of range", 0) == 0);
  CHECK(ErrorOf({"--model", "/m", "--backend", "tpu"}) ==
        "--backend: 'tpu' is not one of auto, cpu, cuda");
  CHECK(ErrorOf({"--model", "/m", "--listen", "localhost"}) ==
        "--listen: 'localhost' is not HOST:PORT");
  CHECK(ErrorOf({"--model", "/m", "--listen", "h:70000"}).find("no valid port") !=
        std::string::npos);
  CHECK(ErrorOf({"--model", "/m", "--listen", "::1:5"}).find("brackets") != std::string::npos);
  CHECK(ErrorOf({"stray"}).rfind("unexpected argument 'stray'", 0) == 0);
  CHECK(ErrorOf({}) == "no model to serve: pass --model DIR or --store DIR (or set MOED_MODEL)");
  CHECK(ErrorOf({"--model", "/m", "--store", "/s"}) ==
        "--model and --store are exclusive: serve a checkpoint or a store");
  CHECK(ErrorOf({"--store", "/s", "--device-cache-bytes", "lots"}) ==
        "--device-cache-bytes: 'lots' is not a byte count (plain bytes or with K, M, G, T)");
  CHECK(ErrorOf({"--model", "/m"}, {{"MOED_CUDA_DEVICE", "many"}}) ==
        "MOED_CUDA_DEVICE: expected an integer, got 'many'");
  CHECK(ErrorOf({"--store", "/s", "--gpu-memory-fraction", "0.8", "--device-cache-bytes", "1G"}) ==
        "--gpu-memory-fraction and --device-cache-bytes are exclusive: give the device tier one "
        "budget");
  CHECK(ErrorOf({"--store", "/s", "--gpu-memory-fraction", "1.5"}) ==
        "--gpu-memory-fraction: 1.5 is not between 0 and 1");
  CHECK(ErrorOf({"--store", "/s", "--host-compute", "always"}) ==
        "--host-compute: 'always' is not one of auto, off");
  CHECK(ErrorOf({"--store", "/s", "--staging-buffers", "0"})
            .rfind("--staging-buffers: 0 is out of range", 0) == 0);
}

TEST_CASE("byte-size options take suffixes on flags and in files") {
  absl::StatusOr<CommandLine> parsed = ParseCommandLine(
      {"--store", "/s", "--device-cache-bytes", "2G", "--host-cache-bytes=512M"}, FakeEnv({}));
  REQUIRE(parsed.ok());
  CHECK(parsed->config.device_cache_bytes == (int64_t{2} << 30));
  CHECK(parsed->config.host_cache_bytes == (int64_t{512} << 20));
  DaemonConfig config;
  REQUIRE(ApplyConfigJson(R"({"device-cache-bytes": "64K", "host-cache-bytes": 4096})", "f.json",
                          &config)
              .ok());
  CHECK(config.device_cache_bytes == 65536);
  CHECK(config.host_cache_bytes == 4096);
  CHECK(
      ApplyConfigJson(R"({"device-cache-bytes": true})", "f.json", &config).message() ==
      "f.json: \"device-cache-bytes\": must be a byte count (an integer or a string like \"4G\")");
}

TEST_CASE("bad config files are refused whole, naming the key") {
  DaemonConfig config;
  config.model = "/kept";
  CHECK(ApplyConfigJson(R"({"model": "/new", "listen": 5})", "f.json", &config).message() ==
        "f.json: \"listen\": must be a string");
  CHECK(config.model == "/kept");  // nothing changed
  CHECK(ApplyConfigJson(R"({"modle": "/x"})", "f.json", &config).message() ==
        "f.json: unknown key \"modle\"");
  CHECK(ApplyConfigJson(R"({"config": "/x"})", "f.json", &config).message() ==
        "f.json: unknown key \"config\"");
  CHECK(ApplyConfigJson(R"({"cuda-device": 1.5})", "f.json", &config).message() ==
        "f.json: \"cuda-device\": must be an integer");
  CHECK(ApplyConfigJson(R"({"cuda-device": 18446744073709551615})", "f.json", &config).message() ==
        "f.json: \"cuda-device\": is out of range");
  CHECK(ApplyConfigJson("{\"model\": ", "f.json", &config).message() == "f.json: not valid JSON");
  CHECK(ApplyConfigJson("[]", "f.json", &config).message() == "f.json: must be a JSON object");
  CHECK(ErrorOf({"--config", "/nonexistent/moed.json"}) ==
        "config file /nonexistent/moed.json: cannot open");
}

TEST_CASE("help, version and the docs table come from the option table") {
  CHECK(ParseCommandLine({"--help"}, FakeEnv({}))->action == Action::kHelp);
  CHECK(ParseCommandLine({"--model", "/m", "--version"}, FakeEnv({}))->action == Action::kVersion);
  std::string help = HelpText();
  std::string markdown = OptionsMarkdown();
  for (const OptionSpec& spec : DaemonOptions()) {
    CHECK(help.find("--" + spec.name + " ") != std::string::npos);
    CHECK(help.find(spec.EnvVar()) != std::string::npos);
    CHECK(markdown.find("`--" + spec.name + " ") != std::string::npos);
  }
  CHECK(help.find("default: 127.0.0.1:50051") != std::string::npos);
  CHECK(DaemonOptions().front().EnvVar() == "MOED_MODEL");
}

TEST_CASE("host and port split, IPv6 in brackets") {
  std::string host;
  int port = -1;
  REQUIRE(SplitHostPort("127.0.0.1:0", &host, &port).ok());
  CHECK(host == "127.0.0.1");
  CHECK(port == 0);
  REQUIRE(SplitHostPort("[::1]:8080", &host, &port).ok());
  CHECK(host == "[::1]");
  CHECK(port == 8080);
  CHECK_FALSE(SplitHostPort(":80", &host, &port).ok());
  CHECK_FALSE(SplitHostPort("[::1:80", &host, &port).ok());
}

TEST_CASE("a config file that gives a key twice is refused, naming the key") {
  std::string path = WriteTempFile(R"({"model": "/a", "max-batch": 4, "model": "/b"})");
  std::string message = ErrorOf({"--config", path});
  CHECK(message.find("\"model\" is given more than once") != std::string::npos);
  std::remove(path.c_str());
}

TEST_CASE("a MOED_ variable that names no option is a warning, once, and changes nothing") {
  std::map<std::string, std::string> vars = {{"MOED_MAX_BATCH", "4"},
                                             {"MOED_MAX_BATCHES", "9"},
                                             {"MOED_SERVICE_HOST", "10.0.0.1"},
                                             {"MOED_SERVER", "127.0.0.1:50051"},
                                             {"PATH", "/bin"}};
  std::vector<std::string> names = {
      "MOED_MAX_BATCH", "MOED_MAX_BATCHES", "MOED_SERVICE_HOST", "MOED_SERVER",
      "PATH",           "MOED_MAX_BATCHES"};
  absl::StatusOr<CommandLine> parsed = ParseCommandLine({"--model", "/m"}, FakeEnv(vars), names);
  REQUIRE(parsed.ok());
  CHECK(parsed->config.max_batch == 4);
  REQUIRE(parsed->warnings.size() == 2);
  CHECK(parsed->warnings[0] ==
        "environment variable MOED_MAX_BATCHES names no moed option and is ignored (see --help)");
  CHECK(parsed->warnings[1].find("MOED_SERVICE_HOST") != std::string::npos);
  // Every option's own variable is known: no warning for any of them.
  std::vector<std::string> all;
  for (const OptionSpec& spec : DaemonOptions()) all.push_back(spec.EnvVar());
  absl::StatusOr<CommandLine> quiet = ParseCommandLine({"--model", "/m"}, FakeEnv({}), all);
  REQUIRE(quiet.ok());
  CHECK(quiet->warnings.empty());
}

}  // namespace
}  // namespace moed::server
