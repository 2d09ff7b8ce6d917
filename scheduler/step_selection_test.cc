#include "scheduler/step_selection.h"

#include <catch2/catch.hpp>

namespace moed::scheduler {
namespace {

StepCandidate Make(bool overdue, double residency, uint64_t last_stepped, uint64_t arrival) {
  StepCandidate c;
  c.overdue = overdue;
  c.residency = residency;
  c.last_stepped = last_stepped;
  c.arrival = arrival;
  return c;
}

TEST_CASE("expert-aware selection takes overdue sequences first, then the most resident") {
  std::vector<StepCandidate> c = {Make(false, 0.2, 5, 0), Make(false, 0.9, 5, 1),
                                  Make(true, 0.0, 1, 2), Make(false, 0.5, 5, 3)};
  CHECK(ChooseForStep(c, 3, true) == std::vector<size_t>{2, 1, 3});
  CHECK(ChooseForStep(c, 10, true) == std::vector<size_t>{2, 1, 3, 0});
}

TEST_CASE("round-robin selection ignores residency: least recently stepped, then arrival") {
  std::vector<StepCandidate> c = {Make(false, 0.9, 7, 0), Make(false, 0.1, 3, 1),
                                  Make(false, 0.5, 3, 2), Make(true, 1.0, 9, 3)};
  CHECK(ChooseForStep(c, 3, false) == std::vector<size_t>{3, 1, 2});
}

TEST_CASE("equal residency falls back to the least recently stepped") {
  std::vector<StepCandidate> c = {Make(false, 0.5, 4, 0), Make(false, 0.5, 2, 1)};
  CHECK(ChooseForStep(c, 1, true) == std::vector<size_t>{1});
  CHECK(ChooseForStep({}, 4, true).empty());
}

}  // namespace
}  // namespace moed::scheduler
