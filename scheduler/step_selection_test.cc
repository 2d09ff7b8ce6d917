#include "scheduler/step_selection.h"

#include <catch2/catch.hpp>

namespace moed::scheduler {
namespace {

StepCandidate Make(bool overdue, std::vector<std::vector<int>> predicted, uint64_t last_stepped,
                   uint64_t arrival) {
  StepCandidate c;
  c.overdue = overdue;
  c.predicted = std::move(predicted);
  c.last_stepped = last_stepped;
  c.arrival = arrival;
  return c;
}

// Two layers of four experts; experts 0 and 1 of both layers resident.
const ResidentSet kResident = {{true, true, false, false}, {true, true, false, false}};

TEST_CASE("round-robin takes the overdue, then the least recently stepped, then first come") {
  std::vector<StepCandidate> c = {Make(false, {{0}, {0}}, 7, 0), Make(false, {{2}, {3}}, 3, 1),
                                  Make(false, {}, 3, 2), Make(true, {{3}, {3}}, 9, 3)};
  CHECK(ChooseForStep(c, 3, nullptr) == std::vector<size_t>{3, 1, 2});
  CHECK(ChooseForStep(c, 10, nullptr) == std::vector<size_t>{3, 1, 2, 0});
  CHECK(ChooseForStep({}, 4, nullptr).empty());
}

TEST_CASE("expert-aware takes the overdue first, then whoever adds the fewest staged experts") {
  std::vector<StepCandidate> c = {
      Make(false, {{2, 3}, {2, 3}}, 1, 0),  // 4 to stage
      Make(false, {{0, 1}, {0, 1}}, 5, 1),  // all resident
      Make(true, {{2}, {3}}, 6, 2),         // overdue
      Make(false, {{0, 2}, {1, 2}}, 2, 3),  // 2 to stage, or 1 once the overdue one brings 2
  };
  CHECK(ChooseForStep(c, 3, &kResident) == std::vector<size_t>{2, 1, 3});
  CHECK(ResidentFraction(c[3], kResident) == 0.5);
}

TEST_CASE("expert-aware counts the experts earlier choices bring in as covered") {
  // Neither 0 nor 1 is resident; 1 shares both experts with 0, 2 shares none.
  std::vector<StepCandidate> c = {Make(false, {{2, 3}, {2, 3}}, 1, 0),
                                  Make(false, {{2, 3}, {2, 3}}, 2, 1),
                                  Make(false, {{2}, {3}}, 3, 2)};
  ResidentSet none = {{false, false, false, false}, {false, false, false, false}};
  CHECK(ChooseForStep(c, 2, &none) == std::vector<size_t>{2, 0});  // 2 is cheapest (2 experts)
  CHECK(ChooseForStep(c, 3, &none) == std::vector<size_t>{2, 0, 1});
}

TEST_CASE("a sequence whose prompt has not started goes first, ties go oldest") {
  std::vector<StepCandidate> c = {Make(false, {{2, 3}, {2, 3}}, 1, 0),   // 4 to stage
                                  Make(false, {}, 0, 1),                 // not started
                                  Make(false, {{0, 2}, {0, 3}}, 3, 2),   // 2 to stage
                                  Make(false, {{0, 3}, {1, 2}}, 2, 3)};  // 2 to stage
  CHECK(ChooseForStep(c, 1, &kResident) == std::vector<size_t>{1});
  // After it, of the two that stage 2, the one stepped longest ago.
  CHECK(ChooseForStep(c, 2, &kResident) == std::vector<size_t>{1, 3});
}

TEST_CASE("overdue means later than the round-robin turn by more than the allowed delay") {
  CHECK(OverdueAfter(16, 4, 4) == 3 + 4);  // round-robin runs each every 4th step
  CHECK(OverdueAfter(17, 4, 4) == 4 + 4);
  CHECK(OverdueAfter(4, 4, 2) == 2);
  CHECK(OverdueAfter(0, 4, 1) == 1);
  CHECK(OverdueAfter(5, 0, 1) == 4 + 1);  // a zero batch counts as one
}

}  // namespace
}  // namespace moed::scheduler
