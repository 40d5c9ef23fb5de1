// How the decoding kernels move memory: set once per process at load from the choice for this
// CPU (ops/cpu/machine.py: decode_tuning; yaretnet::set_decode_tuning in gemv.cpp). None of them
// changes what is computed, only when lines arrive and how they leave, so each is read with a
// relaxed load once per call of a row kernel or a core.
#pragma once

#include <atomic>
#include <cstdint>

namespace yaretnet_cpu {

// How far ahead of each weight stream the products prefetch, in bytes (once per cache line; 0: not
// at all). By default 1 KB for the float kernels (gemv.h) and 2 KB for the integer ones (int_dot.h:
// more instructions per byte, so their demand loads come later). On the AMD EPYC Zen 5 kind, whose
// read rate moves between ~50 and ~80 GB/s, the float kernels read as fast at 1 KB as at 2 KB, and
// the integer ones gained 13% (int8) and 20% (int4) at the higher rate from 2 KB and lost 2% and
// 4.5% at the lower one. On the Zen 4 kind the hardware prefetcher alone is faster.
inline std::atomic<int64_t> float_prefetch_ahead{1024};
inline std::atomic<int64_t> int_prefetch_ahead{2048};

// Whether the decoding core writes a large new state (2 MB a layer and more) with streaming stores
// (decode_step.cpp: step_head). Off on the Zen 4 kind, where they slowed the team's second member
// ~2.5x in the core and so the whole step (docs/performance.md).
inline std::atomic<bool> stream_state{true};

}  // namespace yaretnet_cpu
