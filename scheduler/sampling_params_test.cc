#include "scheduler/sampling_params.h"

#include <catch2/catch.hpp>
#include <limits>

namespace moed::scheduler {
namespace {

std::string ErrorOf(const SamplingParams& params) {
  absl::Status status = ValidateSamplingParams(params, 100);
  REQUIRE(status.code() == absl::StatusCode::kInvalidArgument);
  return std::string(status.message());
}

TEST_CASE("default sampling parameters are valid") {
  CHECK(ValidateSamplingParams(SamplingParams{}, 100).ok());
  SamplingParams greedy;
  greedy.temperature = 0;
  greedy.stop = {"\n\n"};
  greedy.stop_token_ids = {99};
  CHECK(ValidateSamplingParams(greedy, 100).ok());
}

TEST_CASE("each bad sampling parameter is named") {
  SamplingParams p;
  p.temperature = -1;
  CHECK(ErrorOf(p).rfind("sampling.temperature", 0) == 0);
  p = {};
  p.temperature = std::numeric_limits<float>::quiet_NaN();
  CHECK(ErrorOf(p).rfind("sampling.temperature", 0) == 0);
  p = {};
  p.top_p = 0;
  CHECK(ErrorOf(p).rfind("sampling.top_p", 0) == 0);
  p = {};
  p.min_p = 1.5f;
  CHECK(ErrorOf(p).rfind("sampling.min_p", 0) == 0);
  p = {};
  p.frequency_penalty = 3;
  CHECK(ErrorOf(p).rfind("sampling.frequency_penalty", 0) == 0);
  p = {};
  p.repetition_penalty = 0;
  CHECK(ErrorOf(p).rfind("sampling.repetition_penalty", 0) == 0);
  p = {};
  p.top_logprobs = 21;
  CHECK(ErrorOf(p).rfind("sampling.top_logprobs", 0) == 0);
  p = {};
  p.stop = {""};
  CHECK(ErrorOf(p) == "sampling.stop contains an empty string");
  p = {};
  p.stop_token_ids = {100};
  CHECK(ErrorOf(p) == "sampling.stop_token_ids contains 100, outside the vocabulary of 100");
}

}  // namespace
}  // namespace moed::scheduler
