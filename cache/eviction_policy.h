// Eviction policies behind one narrow interface, keyed by (layer, expert) so that the same
// objects run inside the cache and in the offline trace replay.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "model/expert_provider.h"

namespace moed::cache {

// One copy of one expert: an int4 and a full copy of the same expert are different keys.
struct ExpertKey {
  int layer = 0;
  int expert = 0;
  model::Precision precision = model::Precision::kSource;
  bool operator==(const ExpertKey& other) const {
    return layer == other.layer && expert == other.expert && precision == other.precision;
  }
  template <typename H>
  friend H AbslHashValue(H h, const ExpertKey& key) {
    return H::combine(std::move(h), key.layer, key.expert, key.precision);
  }
};

class EvictionPolicy {
 public:
  virtual ~EvictionPolicy() = default;
  virtual absl::string_view name() const = 0;
  // An expert was used (a hit, or just loaded), at logical time `tick`.
  virtual void Touch(const ExpertKey& key, uint64_t tick) = 0;
  // An expert left the tier.
  virtual void Remove(const ExpertKey& key) = 0;
  // Which of `candidates` (resident and not pinned; never empty) to evict.
  virtual ExpertKey Victim(const std::vector<ExpertKey>& candidates) = 0;
  // The prefetcher's estimate that `key` is used at its layer's next turn, in [0, 1] (scored
  // and sweep policies).
  virtual void Predict(const ExpertKey& /*key*/, double /*probability*/) {}
  // The engine has reached `layer` (layers are swept in order every step; sweep policy).
  virtual void AtLayer(int /*layer*/) {}
};

enum class PolicyKind { kLru, kLfu, kScored, kSweep };
// "lru", "lfu", "scored", "sweep"
absl::StatusOr<PolicyKind> ParsePolicyKind(absl::string_view name);
absl::string_view PolicyName(PolicyKind kind);
// `num_layers`: the model's layers (the sweep policy's period; 0: learned from AtLayer).
std::unique_ptr<EvictionPolicy> MakePolicy(PolicyKind kind, int num_layers = 0);

// Which resident experts a miss may evict. kLayer gives every layer an equal share of the
// tier's slots and evicts from the missing expert's own layer once that layer holds its share
// (or from a layer over its share): the engine sweeps the layers in order every step, and
// with one pool for all layers an LRU evicts each expert just before its next use whenever the
// step's experts exceed the tier. kGlobal: one pool.
enum class EvictionScope { kLayer, kGlobal };
absl::StatusOr<EvictionScope> ParseEvictionScope(absl::string_view name);  // "layer", "global"

}  // namespace moed::cache
