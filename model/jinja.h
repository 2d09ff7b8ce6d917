// A Jinja2 subset with the semantics Hugging Face's apply_chat_template gives chat templates:
// jinja2's ImmutableSandboxedEnvironment with trim_blocks, lstrip_blocks and loop controls,
// lenient undefined, Python's str()/repr() when printing, and HF's json.dumps-based tojson
// (keys in insertion order, non-ASCII kept).
//
// Context values are JSON (nlohmann::ordered_json keeps key order): a key absent from the
// context object is undefined, a key present with null is none.
#pragma once

#include <cstdint>
#include <ctime>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "nlohmann/json.hpp"

namespace moed::model {

struct JinjaLimits {
  // Rendering stops with RESOURCE_EXHAUSTED past these, whatever the template does.
  size_t max_output_bytes = 64u << 20;
  int max_call_depth = 128;        // nested macro calls (recursive macros)
  int64_t max_steps = 50'000'000;  // statements, loop iterations and calls, all counted
};

struct JinjaRenderOptions {
  // The clock strftime_now() reads (local time fields).
  std::tm now{};
  JinjaLimits limits;
};

// The payload type set on a Status raised by the template's raise_exception(msg); the
// status message is msg verbatim and the payload holds "line N".
inline constexpr absl::string_view kJinjaRaisePayload = "moed.model.jinja.raise_exception";

// True when the status came from the template calling raise_exception().
bool IsTemplateRaise(const absl::Status& status);

class JinjaTemplate {
 public:
  // Parses the template source. Syntax errors are INVALID_ARGUMENT naming the line.
  static absl::StatusOr<JinjaTemplate> Parse(absl::string_view source);

  // Renders with the given variables (a JSON object). Runtime errors (a template's
  // raise_exception, a type error such as a string plus an object, iterating none) are
  // INVALID_ARGUMENT naming the template line, except raise_exception's, whose message is
  // the template's own text; exceeding a limit is RESOURCE_EXHAUSTED.
  absl::StatusOr<std::string> Render(const nlohmann::ordered_json& context,
                                     const JinjaRenderOptions& options) const;

  struct Program;

 private:
  explicit JinjaTemplate(std::shared_ptr<const Program> program) : program_(std::move(program)) {}
  std::shared_ptr<const Program> program_;
};

}  // namespace moed::model
