// A team of threads that stays together through a whole decoder layer (decode_step.cpp).
//
// A layer's step is a chain of products, each needing all of the one before: q/k/v/g, the core,
// the output product, the feed-forward pair. Run as one thread-pool region each, a layer forks
// and joins five times, and the serial parts between them (norms, the activations' rounding, the
// GLU) leave the other thread waiting. A team forks once per layer: each member takes its share
// of every product's rows, computes what is cheap (a norm of one row) for itself rather than
// waiting for one member to do it, and meets the others at a spin barrier only where the next
// product reads all of the last one's output.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace yaretnet_cpu {

// The rows [lo, hi) a caller computes.
struct RowRange {
  int64_t lo, hi;
};

// How many rows a thread-pool task takes at least: ~64 KB of weights amortise the scheduling.
inline int64_t row_grain(int64_t row_bytes, int64_t least) {
  return std::max<int64_t>(least, 65536 / std::max<int64_t>(1, row_bytes));
}

// A barrier for the slots of one at::parallel_for region. A member may hold several slots (the
// region hands a thread more than one index when it runs fewer threads than asked, or all of
// them when it runs inline inside another region), so arrivals are counted in slots. The count
// only grows: the k-th barrier opens when it reaches k times the slots.
class SpinBarrier {
 public:
  explicit SpinBarrier(int64_t slots) : slots_(slots) {}

  // Thrown by wait() into a member whose partner failed; the member stops (Member::run), so the
  // error that reaches the caller is the partner's own.
  struct PartnerFailed {};

  void wait(int64_t width, int64_t& phase) {
    ++phase;
    const int64_t target = phase * slots_;
    if (arrived_.fetch_add(width, std::memory_order_acq_rel) + width >= target) return;
    for (int64_t spins = 0; arrived_.load(std::memory_order_acquire) < target; ++spins) {
      if (failed_.load(std::memory_order_relaxed)) throw PartnerFailed{};
      // Spin while the partner is near (a barrier's usual wait is microseconds); past that, give
      // the core away, in case the threads outnumber the cores.
      if (spins < (1 << 14)) {
#if defined(__x86_64__) || defined(_M_X64)
        _mm_pause();
#endif
      } else {
        std::this_thread::yield();
      }
    }
  }

  void fail() { failed_.store(true, std::memory_order_relaxed); }

 private:
  std::atomic<int64_t> arrived_{0};
  std::atomic<bool> failed_{false};
  const int64_t slots_;
};

// One member of a team: the slots [first, last) of `size`. A member alone (size 1, no barrier)
// runs each product over PyTorch's thread pool instead (`pool`).
struct Member {
  int64_t first = 0, last = 1, size = 1;
  SpinBarrier* barrier = nullptr;
  int64_t phase = 0;

  bool pool() const { return barrier == nullptr; }

  // This member's rows of `rows`, split as at::parallel_for splits a range for `grain` (so a product
  // too small to share runs on the first member alone, as it would on the pool).
  RowRange share(int64_t rows, int64_t grain) const {
    if (pool()) return {0, rows};
    const int64_t tasks = std::max<int64_t>(1, std::min(size, (rows + grain - 1) / std::max<int64_t>(1, grain)));
    const int64_t chunk = (rows + tasks - 1) / tasks;
    return {std::min(rows, first * chunk), std::min(rows, last * chunk)};
  }

  // Waits until every member has reached this point (a no-op alone).
  void sync() {
    if (barrier != nullptr) barrier->wait(last - first, phase);
  }
};

// Runs body(member) once per member of a team of `threads` (one member, on the pool, if
// `threads` <= 1). Only with OpenMP: each calling thread gets a team of its own that runs all at
// once, so members spinning at a barrier wait only for each other (a shared pool could queue a
// member behind another team's).
template <typename Body>
void run_team(int64_t threads, const Body& body) {
#if AT_PARALLEL_OPENMP
  if (threads > 1 && !at::in_parallel_region()) {
    SpinBarrier barrier(threads);
    at::parallel_for(0, threads, 1, [&](int64_t first, int64_t last) {
      Member member{first, last, threads, &barrier};
      try {
        body(member);
      } catch (const SpinBarrier::PartnerFailed&) {
        return;  // the partner's error is the one reported
      } catch (...) {
        barrier.fail();
        throw;
      }
    });
    return;
  }
#endif
  (void)threads;
  Member alone;
  body(alone);
}

}  // namespace yaretnet_cpu
