// Every case of ../shared/chat_templates/*/cases.jsonl rendered through `moectl
// chat-template`, as a user would: stdout must equal "expected" byte for byte; a case with
// "expected_error" must exit 1, and a raise_exception case must print its message verbatim.
#include <sys/wait.h>

#include <catch2/catch.hpp>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "nlohmann/json.hpp"
#include "tests/scratch_dir.h"

namespace {

namespace fs = std::filesystem;

std::string ReadAll(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

struct Outcome {
  int exit_code;
  std::string out, err;
};

Outcome RenderCase(const fs::path& template_file, const std::string& case_line,
                   const fs::path& work) {
  const fs::path case_file = work / "case.json", out = work / "out", err = work / "err";
  std::ofstream(case_file, std::ios::binary) << case_line;
  const std::string command = std::string("'") + MOECTL_BINARY + "' chat-template --template '" +
                              template_file.string() + "' --case '" + case_file.string() + "' >'" +
                              out.string() + "' 2>'" + err.string() + "'";
  int status = std::system(command.c_str());
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, ReadAll(out), ReadAll(err)};
}

TEST_CASE("chat templates: every shared case renders byte for byte through moectl") {
  const char* shared = std::getenv("MOED_SHARED_DIR");
  REQUIRE(shared != nullptr);
  const fs::path root = fs::path(shared) / "chat_templates";
  const moed::testing::ScratchDir scratch("moed-chat-cases");
  const fs::path& work = scratch.path();
  int templates = 0, cases = 0, errors = 0;
  for (const auto& entry : fs::directory_iterator(root)) {
    if (!entry.is_directory()) continue;
    ++templates;
    std::ifstream lines(entry.path() / "cases.jsonl");
    std::string line;
    int index = 0;
    while (std::getline(lines, line)) {
      if (line.empty()) continue;
      const auto test_case = nlohmann::json::parse(line);
      INFO(entry.path().filename().string()
           << " case " << index << ": " << test_case["description"].get<std::string>());
      Outcome got = RenderCase(entry.path() / "template.jinja", line, work);
      if (test_case.contains("expected")) {
        INFO("stderr: " << got.err);
        CHECK(got.exit_code == 0);
        CHECK(got.out == test_case["expected"].get<std::string>());
      } else {
        ++errors;
        CHECK(got.exit_code == 1);
        CHECK(got.out.empty());
        if (test_case["error_type"] == "raise_exception") {
          CHECK(got.err == test_case["expected_error"].get<std::string>() + "\n");
        } else {
          CHECK(got.err.find("template line ") == 0);
        }
      }
      ++index;
      ++cases;
    }
  }
  CHECK(templates == 12);
  CHECK(cases == 123);
  CHECK(errors == 13);
}

}  // namespace
