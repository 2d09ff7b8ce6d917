// The tiered expert cache: a device tier (on the CPU backend, RAM with its own budget), an
// optional host tier, and the store on SSD read through a BlockReader. It implements the
// model's ExpertProvider: a layer asks for the experts its tokens chose and computes each as
// it becomes resident, those already in the device tier first. A slot in use is never evicted.
// It knows nothing of requests.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "cache/aligned_buffer.h"
#include "cache/block_reader.h"
#include "cache/eviction_policy.h"
#include "cache/host_compute.h"
#include "cache/precision_policy.h"
#include "cache/prefetcher.h"
#include "cache/store_fault.h"
#include "cache/store_reader.h"
#include "kernels/backend.h"
#include "model/expert_provider.h"
#include "util/byte_size.h"
#include "util/histogram.h"

namespace moed::cache {

struct CacheOptions {
  // The full copy the cache serves (the checkpoint's own precision unless the daemon was told
  // to serve a quantized copy throughout).
  Precision precision = Precision::kSource;
  uint64_t device_bytes = 0;  // 0: room for every expert
  uint64_t host_bytes = 0;    // 0: no host tier
  PolicyKind device_policy = PolicyKind::kLru;
  PolicyKind host_policy = PolicyKind::kLru;
  EvictionScope eviction_scope = EvictionScope::kLayer;  // both tiers
  ReaderOptions reader;
  bool allow_io_uring = true;  // false: the pread pool
  // Device slots set aside for prefetches to land in, so that a prefetch never evicts a
  // resident expert: a used prefetch joins its layer (which gives a slot back), a wrong one is
  // dropped. Only when the budget cannot hold every expert, and at least two slots remain.
  int prefetch_slots = 0;
  // A read that fails with an I/O error or comes back short is tried again, up to this many
  // attempts in all, waiting retry_backoff, then 4× that, 16× ... between attempts. A checksum
  // mismatch is never retried: the bytes on disk are wrong.
  int max_read_attempts = 4;
  std::chrono::microseconds retry_backoff{1000};
  // The store counts as unreadable after failed reads (I/O errors or short reads, after their
  // retries) of this many different blobs in a row, with no successful read between them.
  int unreadable_after_failed_blobs = 3;
  // When a missing expert may run from a low-precision copy. A policy that falls back splits
  // the device budget into a pool of full copies and a pool of the fallback copies (see
  // SplitDeviceBudget).
  PrecisionPolicyOptions precision_policy;
  // Told of every failed read attempt, on the reader's thread, without the cache's lock.
  std::function<void(const StoreFault& fault, absl::string_view message, bool will_retry)>
      on_read_failure;
  // The backend whose memory the device tier is. Null, or a backend whose device memory is host
  // memory (the CPU): RAM, as before. Otherwise (a GPU) the device pools are one allocation of
  // device memory each, the host tier is pinned memory, reads from the store land in the host
  // tier or in pinned staging buffers, and each copy to the device goes on the backend's copy
  // stream behind an event: an expert counts as ready once its copy is queued, and the compute
  // stream waits for that event (ExpertServed::ready) before reading it. A slot is refilled only
  // after the compute stream's last read of it (an event recorded when its use is released).
  std::shared_ptr<kernels::Backend> backend;
  // With such a backend: pinned buffers that reads land in when no host slot takes them. A use
  // whose read finds none waits for a copy to finish with one; a prefetch does not start.
  int staging_buffers = 8;
  // With such a backend and a host tier: when an expert the host tier holds runs on the CPU
  // instead of being copied to the device (the engine's model needs a host backend for it).
  HostComputeOptions host_compute;
};

// What the engine's routing says of one expert a layer needs.
struct ExpertUse {
  bool may_fall_back = false;  // the precision policy lets every token routed to it fall back
  int tokens = 0;              // tokens routed to it
  bool all_inexact = false;    // every one of them accepts results that are not bitwise exact
};

// Whether the store can be read, as readiness reports it. A checksum mismatch in one blob
// never makes it unreadable: the rest of the store serves.
struct StoreHealth {
  bool readable = true;
  std::string reason;  // why not, when not
};

struct TierCounters {
  uint64_t hits = 0;
  uint64_t misses = 0;
  uint64_t bytes_in = 0;  // bytes copied or read into this tier
  uint64_t evictions = 0;
  uint64_t slots = 0;
  uint64_t resident = 0;
  uint64_t budget_bytes = 0;  // slots × slot bytes
};

// How a device budget is divided between full copies and the fallback copies of a policy that
// falls back. No fallback pool when the policy never falls back or the full pool holds every
// expert. With the low-bit floor, the fallback pool takes what holds every expert's fallback
// copy (leaving at least two full slots); without it, both pools get the same number of slots
// and any bytes left over go to full slots.
struct DeviceBudgetSplit {
  uint64_t full_slots = 0;
  uint64_t fallback_slots = 0;
};
// `experts`: the MoE experts of the model (layers × experts per layer).
absl::StatusOr<DeviceBudgetSplit> SplitDeviceBudget(uint64_t device_bytes, uint64_t full_slot_bytes,
                                                    uint64_t fallback_slot_bytes, uint64_t experts,
                                                    const PrecisionPolicyOptions& policy);

struct CacheCounters {
  TierCounters device;
  TierCounters host;
  // The device pool of fallback copies (slots 0 without a policy that falls back). A use of a
  // resident fallback copy is a hit there, one that read it a miss.
  TierCounters fallback;
  // Expert uses that ran from a low-precision copy instead of waiting for the full one.
  uint64_t fallbacks_int8 = 0;
  uint64_t fallbacks_int4 = 0;
  // Expert uses computed on the CPU from the host tier instead of copied to the device.
  uint64_t host_computes = 0;
  // Bytes of the copies to the device queued and not yet done (a GPU backend's).
  uint64_t copy_bytes_queued = 0;
  // Background reads of the low-bit floor (fallback copies read while the disk is idle) and
  // of upgrades (full copies of experts that ran from a fallback copy).
  uint64_t floor_reads = 0;
  uint64_t upgrade_reads = 0;
  // Reads requested from the store, and their bytes (a cancelled prefetch included; most of its
  // bytes are never read: cancelled_read_bytes).
  uint64_t ssd_reads = 0;
  uint64_t ssd_bytes = 0;
  uint64_t cancelled_read_bytes = 0;
  // Every prefetch issued ends as exactly one of: useful (used after it arrived), late (a use
  // waited for it), wasted (evicted unused, or cancelled when its layer came without needing
  // it), failed (the read failed for good; it failed no request), or is still pending (on its
  // way, or resident and not used yet):
  // issued = useful + late + wasted + failed + pending.
  uint64_t prefetch_issued = 0;
  uint64_t prefetch_useful = 0;
  uint64_t prefetch_late = 0;
  uint64_t prefetch_wasted = 0;
  uint64_t prefetch_failures = 0;
  uint64_t prefetch_pending = 0;
  uint64_t prefetch_cancelled = 0;   // hints dropped before any read: stale, or already resident
  uint64_t prefetch_reads = 0;       // prefetches read from the store (counted in ssd_reads too)
  double prefetch_wait_seconds = 0;  // of wait_seconds, the part spent waiting for late prefetches
  uint64_t failed_reads = 0;  // I/O errors, short reads, checksum mismatches: the three below
  uint64_t failed_io = 0;
  uint64_t failed_short_reads = 0;
  uint64_t failed_checksums = 0;
  double wait_seconds = 0;  // time the compute thread waited for experts
  // Seconds from asking for an expert to having it in the device tier, by where it came from.
  util::HistogramSnapshot stage_from_ssd;
  util::HistogramSnapshot stage_from_host;
};

// The stage-time buckets: from a copy out of RAM (microseconds) to a read from a slow disk.
std::vector<double> StageSecondsBuckets();

// Makes the reader for a cache; tests inject fault-injecting readers through this.
using ReaderFactory =
    std::function<absl::StatusOr<std::unique_ptr<BlockReader>>(ReadCallback callback)>;

class ExpertCache;

// One use's claim on one copy of one expert, as the cache tracks it.
struct ExpertClaim {
  ExpertKey key;
  bool fallback_pool = false;  // in the pool of fallback copies (else the full copies')
  bool host_pool = false;      // in the host tier, to compute on the CPU (HostComputeOptions)
  int slot = -1;               // pinned slot; -1 while waiting for one
  bool finished = false;       // computed, failed, or released
  model::ExpertServed served;
};

// A pinned, future-like claim on one copy of one expert (ExpertCache::Acquire). Pinned once it
// has a slot, so the copy is never evicted while held; ready once the copy is resident. Released
// by Release() or when destroyed, which must come before the cache's end. Like ForEachExpert,
// used from one thread at a time.
class ExpertHandle {
 public:
  ExpertHandle() = default;
  ExpertHandle(ExpertHandle&& other) noexcept { *this = std::move(other); }
  ExpertHandle& operator=(ExpertHandle&& other) noexcept;
  ExpertHandle(const ExpertHandle&) = delete;
  ExpertHandle& operator=(const ExpertHandle&) = delete;
  ~ExpertHandle() { Release(); }

  bool valid() const { return cache_ != nullptr; }
  const ExpertKey& key() const { return claim_.key; }
  // Resident now: weights() may be read without waiting.
  bool ready() const;
  // Blocks until the copy is resident (OK), or its read failed for good (that read's error,
  // naming the expert; the cache goes on serving).
  absl::Status Wait();
  // The copy's matrices where the cache holds them (read in place, no copy); valid while the
  // handle is held, once ready. With a GPU backend they are in device memory, and the compute
  // stream must wait for ready_event() before reading them.
  model::ExpertWeights weights() const;
  kernels::Event ready_event() const;
  // Where the copy came from, the bytes moved for this use, the prefetch that served it, and
  // (after Wait) the time waited.
  const model::ExpertServed& served() const { return claim_.served; }
  void Release();

 private:
  friend class ExpertCache;
  ExpertCache* cache_ = nullptr;
  ExpertClaim claim_;
};

class ExpertCache final : public model::ExpertProvider {
 public:
  // The smallest device budget that works (two slots: one computing, one streaming in).
  static uint64_t MinimumDeviceBytes(const Store& store, Precision precision);
  // Bytes of one slot of `precision`.
  static uint64_t SlotBytes(const Store& store, Precision precision);

  // `reader_factory` may be empty: then io_uring (or the pread pool where io_uring is refused)
  // over the store's experts.bin; `note` receives why it fell back, if it did.
  static absl::StatusOr<std::unique_ptr<ExpertCache>> Create(
      std::shared_ptr<const Store> store, const CacheOptions& options,
      const ReaderFactory& reader_factory = {}, std::string* note = nullptr);
  ~ExpertCache() override;

  // Re-examines the store: experts.bin must open and hold the bytes the manifest lists; while
  // the store counts as unreadable, one blob is also read back (and verified) as a probe, and
  // success makes it readable again. Cheap (an open and an fstat) while readable: the daemon
  // calls it a few times a second.
  StoreHealth CheckStore();
  StoreHealth store_health() const;

  absl::Status ForEachExpert(int layer, const std::vector<int>& experts,
                             const model::ExpertCompute& compute) override;
  // Remembers, with a precision policy that falls back, who claims each expert of the layer
  // (gate weight, rank, what the request accepts): the ForEachExpert after it asks the policy.
  // On the engine's thread, as ForEachExpert.
  void Routed(const model::LayerRouting& routing) override;

  // As above, and once this layer's experts are pinned and its misses have their slots,
  // `hints` replace the prefetch queue (see Prefetch). Falls back as the last Routed decided.
  absl::Status ForEachExpert(int layer, const std::vector<int>& experts,
                             const model::ExpertCompute& compute,
                             const std::vector<PrefetchHint>& hints);
  // As above, with what the routing says of experts[i] in uses[i] (empty: nothing; then none
  // falls back and none runs on the host). A full copy that is resident always serves;
  // otherwise a resident fallback copy when the expert may fall back; otherwise, with host
  // compute, the host tier's copy on the CPU when that is estimated to finish sooner than the
  // copy to the device.
  absl::Status ForEachExpert(int layer, const std::vector<int>& experts,
                             const model::ExpertCompute& compute,
                             const std::vector<PrefetchHint>& hints,
                             const std::vector<ExpertUse>& uses);

  // Claims `precision`'s copy of (layer, expert): pinned at once if resident or on its way (a
  // prefetch still being read is promoted), else a slot is taken (evicting the policy's victim
  // if need be) and its read started, or, while every slot is pinned, it waits for one in
  // Wait(). Fails for a precision the cache keeps no pool for, or an expert out of range.
  absl::StatusOr<ExpertHandle> Acquire(int layer, int expert, Precision precision);

  // Replaces the queue of prefetches not yet started with `hints` (highest probability first;
  // those with fetch false only reach the eviction policy as predictions) and starts the first
  // if it can: one prefetch reads at a time, only while no use waits for a read or a slot, into
  // a free slot or the landing slot (CacheOptions::prefetch_slots); it never evicts and never
  // waits. Queued hints start as reads complete; the next layer's hints replace them, so a hint
  // for a layer the engine has reached is dropped as stale. A
  // prefetch that fails for good fails no request: it is counted (by kind, as every failed read
  // is), its slot is freed, and a later use reads the expert again; a use that arrives while it
  // is in flight waits for it, and should it fail, reads anew.
  void Prefetch(const std::vector<PrefetchHint>& hints);
  // Drops the queued hints (the engine finished the step they were for).
  void CancelPrefetches();

  CacheCounters counters() const;
  // [layer][expert]: whether the expert is ready in the device tier.
  std::vector<std::vector<bool>> DeviceResidency() const;
  absl::string_view reader_name() const { return reader_->name(); }
  const CacheOptions& options() const { return options_; }
  const PrecisionPolicy& precision_policy() const { return precision_policy_; }
  // True when the device tier is the backend's device memory (CacheOptions::backend is set):
  // the weights handed to a compute are where that backend's operators read them.
  bool serves_device_memory() const override { return options_.backend != nullptr; }

 private:
  enum class SlotState { kFree, kLoading, kReady };
  struct Slot {
    SlotState state = SlotState::kFree;
    ExpertKey key;
    int pins = 0;
    bool prefetched = false;    // brought in by a prefetch and not used yet
    bool claimed = false;       // ... and a use is waiting for it (late, should it arrive)
    bool arrived_late = false;  // a claimed prefetch that arrived: its waiting use says late
    bool landing = false;       // a landing slot (CacheOptions::prefetch_slots) holding a prefetch
    // Staged mode (see CacheOptions::backend): the copy that filled it, and the compute
    // stream's last read of it (a refill waits for it).
    kernels::Event ready;
    kernels::Event last_read;
  };
  struct Tier {
    std::string name;
    Precision precision = Precision::kSource;  // of every copy it holds
    const BlobLayout* layout = nullptr;
    AlignedBuffer memory;          // RAM
    kernels::DeviceBuffer buffer;  // or the backend's memory (staged mode)
    uint8_t* base = nullptr;       // where slot 0 starts, in one or the other
    uint64_t slot_bytes = 0;
    std::vector<Slot> slots;
    absl::flat_hash_map<ExpertKey, int> index;  // resident or loading
    std::vector<int> free;
    std::unique_ptr<EvictionPolicy> policy;
    TierCounters counters;
    std::vector<int> per_layer;  // entries of `index` by layer
    std::vector<int> quota;      // each layer's share of the slots (EvictionScope::kLayer)
    void Add(const ExpertKey& key, int slot);
    void Drop(const ExpertKey& key);
    uint8_t* SlotData(int slot) { return base + static_cast<uint64_t>(slot) * slot_bytes; }
  };
  // A read in flight: into `tier`'s `slot`; on success also copied into device slot
  // `device_slot` when the read went to the host tier.
  struct Load {
    ExpertKey key;
    const BlobEntry* blob = nullptr;
    bool into_host = false;
    int host_slot = -1;
    int device_slot = -1;
    std::chrono::steady_clock::time_point started;
    uint8_t* target = nullptr;  // where the read goes
    int attempts = 1;
    bool prefetch = false;   // started by Prefetch, not by a use
    bool fill = false;       // a floor read or an upgrade: background, never cancelled
    bool cancelled = false;  // the reader was asked to give it up
    // Staged mode: the pinned staging buffer it reads into (-1: the host slot, or none yet: it
    // waits in staging_waiters_), and the device slot's last read, which its copy waits for.
    int staging = -1;
    kernels::Event after;
  };
  // A copy to the device in flight (staged mode): what it reads from is held until it is done.
  struct CopyInFlight {
    kernels::Event done;
    int staging = -1;    // a staging buffer to give back
    int host_slot = -1;  // a host slot to unpin
    bool from_host = false;
    uint64_t bytes = 0;
    std::chrono::steady_clock::time_point started;
  };

  ExpertCache(std::shared_ptr<const Store> store, const CacheOptions& options);
  friend class ExpertHandle;
  Tier& PoolOf(const ExpertClaim& claim) {
    return claim.host_pool ? *host_ : claim.fallback_pool ? *fallback_ : device_;
  }
  // Takes the host tier's copy for a claim when the CPU is estimated to be faster: true then.
  bool ClaimOnHostLocked(ExpertClaim& claim, const ExpertUse& use);
  // Pins the claim's copy when it is resident or on its way; else leaves it waiting for a slot.
  void ClaimLocked(ExpertClaim& claim);
  // Takes a slot for a claim waiting for one and starts its read: false while every slot is
  // pinned; an error when the read cannot start (the claim is then finished).
  absl::StatusOr<bool> StartClaimLocked(ExpertClaim& claim, int layer);
  enum class ClaimState { kWaitingForSlot, kLoading, kReady, kFailed };
  // Where a claim stands; kFailed moves its read's error into `error` (once).
  ClaimState ClaimStateLocked(ExpertClaim& claim, absl::Status* error);
  void ReleaseClaimLocked(ExpertClaim& claim);
  // The device pool holding copies of `precision`.
  Tier& DevicePool(Precision precision) {
    return precision == device_.precision || fallback_ == nullptr ? device_ : *fallback_;
  }
  ExpertKey FullKey(int layer, int expert) const { return {layer, expert, device_.precision}; }
  // Starts one floor read or upgrade when the disk is idle.
  void IssueBackgroundLocked();
  // Starts a floor read or upgrade of `key` into `slot` of its pool (taken already; given back
  // when the read cannot start, and then false).
  bool StartFillLocked(const ExpertKey& key, int slot);
  // A slot of `pool` no longer holds anything (device_: FreeDeviceSlotLocked).
  void FreeSlotLocked(Tier& pool, int slot);
  // A free slot of `tier` for an expert of `layer`, evicting an unpinned ready one (within the
  // eviction scope when it has one) if needed; -1 when all are busy.
  int AllocateSlotLocked(Tier& tier, int layer);
  // Evicts the policy's victim among `candidates` (never empty) and returns its slot, now free.
  int EvictLocked(Tier& tier, const std::vector<ExpertKey>& candidates);
  // A device slot no longer holds anything: back to the free list, or to the landing slots.
  void FreeDeviceSlotLocked(int slot);
  // A prefetch in a landing slot is being used: the slot joins its layer.
  void JoinLayerLocked(int slot);
  // Takes slots back from layers over their share until the landing slots are whole again.
  void RestoreLandingSlotsLocked();
  void ReleaseSlotLocked(Tier& tier, int slot);
  // Starts making `key` resident in device slot `slot` (already allocated; pinned by a use,
  // unpinned for a prefetch).
  absl::Status StartLoadLocked(const ExpertKey& key, int device_slot, bool prefetch = false);
  // Submits `load` (already in loads_ under `tag`) to the reader.
  absl::Status SubmitLocked(uint64_t tag, const Load& load);
  void OnReadComplete(uint64_t tag, const absl::Status& status);
  // Ends `load` (already out of loads_) as failed with `status`: frees its slots and records
  // the failure for the compute thread.
  void FailLoadLocked(const Load& load, const absl::Status& status);
  // A load that failed for good: a use's fails the use (FailLoadLocked); a prefetch's fails
  // nothing (see Prefetch). `tag` is free to reuse for a read on behalf of a waiting use.
  void EndFailedLoadLocked(uint64_t tag, const Load& load, const absl::Status& status);
  void RetryLoop();
  // Starts queued prefetches while reads may be added and no use waits for a slot.
  void IssuePrefetchesLocked();
  // Gives up prefetches still being read for `layer` that none of `experts` is.
  void CancelUnneededLocked(int layer, const std::vector<int>& experts);
  // A prefetch whose read the reader gave up (counted wasted when it was cancelled).
  void EndCancelledLoadLocked(uint64_t tag, const Load& load);
  // A prefetch that will not arrive (failed, or cancelled): should a use wait for it, it is read
  // again as that use's own read (reusing `tag`); otherwise its slots are freed.
  void AbandonPrefetchLocked(uint64_t tag, const Load& load);
  void QueuePrefetchesLocked(const std::vector<PrefetchHint>& hints);
  void NoteReadOutcomeLocked(const ExpertKey& key, std::optional<ReadFaultKind> failed);
  bool staged() const { return staged_; }
  // Queues the copy of `bytes` at `src` (pinned) into `pool`'s `slot` on the copy stream, behind
  // `after`; the event it is done at.
  absl::StatusOr<kernels::Event> QueueCopy(Tier& pool, int slot, const uint8_t* src, uint64_t bytes,
                                           const kernels::Event& after);
  // A staging buffer is free again: a use waiting for one has its read submitted.
  void ReleaseStagingLocked(int staging);
  void CopyWatchLoop();

  std::shared_ptr<const Store> store_;
  CacheOptions options_;
  std::unique_ptr<BlockReader> reader_;

  mutable std::mutex mutex_;
  std::condition_variable changed_;
  Tier device_;
  std::unique_ptr<Tier> fallback_;  // null without a policy that falls back
  std::unique_ptr<Tier> host_;      // null without a host tier; full copies only
  PrecisionPolicy precision_policy_;
  uint64_t fallbacks_int8_ = 0, fallbacks_int4_ = 0;
  uint64_t floor_reads_ = 0, upgrade_reads_ = 0;
  size_t floor_cursor_ = 0;  // the next expert (layer-major over MoE layers) the floor checks
  bool floor_complete_ = false;
  absl::flat_hash_set<ExpertKey> floor_failed_;  // floor reads that failed for good
  std::deque<ExpertKey> upgrades_;               // full copies to read when the disk is idle
  // From the last Routed (engine thread only): the tokens routed to each expert of the layer.
  absl::flat_hash_map<int, std::vector<TokenUse>> routed_uses_;
  int routed_layer_ = -1;
  absl::flat_hash_map<uint64_t, Load> loads_;  // by tag
  // Failed loads not yet reported, kept as code and text: an absl::Status made on the reader's
  // thread is not handed to the compute thread, whose copy would share its reference count
  // with uninstrumented library code (a false report under TSan).
  struct Failure {
    absl::StatusCode code;
    std::string message;
    StoreFault fault;
  };
  absl::flat_hash_map<ExpertKey, Failure> failures_;
  uint64_t next_tag_ = 1;
  uint64_t tick_ = 0;
  uint64_t ssd_reads_ = 0, ssd_bytes_ = 0;
  uint64_t failed_io_ = 0, failed_short_reads_ = 0, failed_checksums_ = 0;
  uint64_t prefetch_reads_ = 0, prefetch_failures_ = 0;
  uint64_t prefetch_issued_ = 0, prefetch_useful_ = 0, prefetch_late_ = 0, prefetch_wasted_ = 0;
  uint64_t prefetch_cancelled_ = 0;
  uint64_t cancelled_read_bytes_ = 0;
  double prefetch_wait_seconds_ = 0;
  int prefetches_in_flight_ = 0;             // prefetch reads submitted and not completed
  std::deque<PrefetchHint> prefetch_queue_;  // highest probability first
  std::vector<int> landing_;                 // free landing slots
  int landing_total_ = 0;                    // landing slots there should be
  int landing_in_use_ = 0;                   // landing slots holding a prefetch
  size_t uses_waiting_for_slots_ = 0;        // misses of that layer not yet given a slot
  // Retries waiting for their time, by due time (tags of loads_ entries).
  std::multimap<std::chrono::steady_clock::time_point, uint64_t> retries_;
  std::condition_variable retry_changed_;
  bool stopping_ = false;
  std::thread retry_thread_;
  // Blobs whose reads failed with I/O errors or short reads since the last successful read.
  absl::flat_hash_set<ExpertKey> failing_blobs_;
  StoreHealth health_;
  // Staged mode: pinned buffers reads land in, the free ones, the demand loads waiting for one
  // (tags), the copies in flight in queue order, and the thread that waits for them.
  bool staged_ = false;
  std::vector<kernels::DeviceBuffer> staging_;
  std::vector<int> staging_free_;
  std::deque<uint64_t> staging_waiters_;
  std::deque<CopyInFlight> copies_in_flight_;
  std::condition_variable copies_changed_;
  bool copy_watch_stopping_ = false;
  uint64_t copy_bytes_queued_ = 0;  // of the copies in flight
  uint64_t host_computes_ = 0;
  std::mutex copy_mutex_;  // one enqueuer of a copy's wait, copy and record at a time
  std::thread copy_watch_thread_;
  util::Histogram stage_from_ssd_{StageSecondsBuckets()};
  util::Histogram stage_from_host_{StageSecondsBuckets()};
  double wait_seconds_ = 0;
};

// A provider for a Model that shares `cache` with others (the daemon's ModelInfo reads it too).
// With a prefetcher, each layer's routing is turned into hints for the later layers.
std::unique_ptr<model::ExpertProvider> SharedProvider(
    std::shared_ptr<ExpertCache> cache, std::shared_ptr<Prefetcher> prefetcher = nullptr);

using util::ParseByteSize;

}  // namespace moed::cache
