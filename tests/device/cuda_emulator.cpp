// CPU emulator for device/csrc/attention_distill.cu (tests only; needs a C++17 compiler).
//
// Runs the kernel source unchanged on the CPU so that its indexing, coverage and reductions
// are checked where there is no GPU. Each CUDA thread is a fiber (ucontext); one block runs
// at a time. __syncthreads() and __shfl_xor_sync() are scheduling points: a block barrier
// opens when every thread of the block waits at it, a warp shuffle when all 32 lanes do.
// A barrier that can never open (divergent __syncthreads or shuffle) is reported as an error
// rather than hanging. Kernel arguments arrive exactly as cuLaunchKernel takes them: an array
// of pointers to the argument values, so the host code's argument packing is checked too.
//
//   int fl_emu_launch(const char* name, unsigned grid, unsigned block, void** params)
//       0 ok, 1 unknown kernel, 2 bad block size, 3 deadlock
//   float fl_emu_half_to_float(unsigned short)   unsigned short fl_emu_float_to_half(float)
//   unsigned short fl_emu_float_to_bf16(float)   (the software conversions of the source)

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

struct dim3 { unsigned x = 1, y = 1, z = 1; };
static dim3 threadIdx, blockIdx, blockDim, gridDim;   // set by the scheduler before each resume

namespace emu {
enum Wait { RUNNING = 0, AT_SYNC = 1, AT_SHFL = 2, DONE = 3 };
struct Fiber {
    ucontext_t ctx;
    std::vector<char> stack;
    Wait wait = RUNNING;
};
static ucontext_t sched;
static std::vector<Fiber> fibers;
static unsigned cur = 0;
static float shfl_vals[32][32];
static std::function<void()> body;

static void yield(Wait w) {
    fibers[cur].wait = w;
    swapcontext(&fibers[cur].ctx, &sched);
}
static void entry() {
    body();
    fibers[cur].wait = DONE;   // uc_link returns to the scheduler
}
}  // namespace emu

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

inline void __syncthreads() { emu::yield(emu::AT_SYNC); }

inline float __shfl_xor_sync(unsigned mask, float v, int lanemask) {
    const unsigned w = threadIdx.x >> 5, l = threadIdx.x & 31;
    if (mask != 0xffffffffu) { std::fprintf(stderr, "emulator: partial shuffle mask\n"); std::abort(); }
    emu::shfl_vals[w][l] = v;
    emu::yield(emu::AT_SHFL);                 // every lane has written
    const float r = emu::shfl_vals[w][l ^ (unsigned)lanemask];
    emu::yield(emu::AT_SHFL);                 // every lane has read
    return r;
}

using std::max;
using std::min;

#include "../../device/csrc/attention_distill.cu"

namespace emu {

// Run one block to completion; false on deadlock.
static bool run_block(unsigned nthreads) {
    static const size_t kStack = 256 * 1024;
    fibers.assign(nthreads, Fiber{});
    for (unsigned t = 0; t < nthreads; ++t) {
        Fiber& f = fibers[t];
        f.stack.resize(kStack);
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack.data();
        f.ctx.uc_stack.ss_size = kStack;
        f.ctx.uc_link = &sched;
        makecontext(&f.ctx, entry, 0);
    }
    for (;;) {
        bool ran = false;
        for (unsigned t = 0; t < nthreads; ++t) {
            if (fibers[t].wait != RUNNING) continue;
            cur = t;
            threadIdx.x = t;
            swapcontext(&sched, &fibers[t].ctx);
            ran = true;
        }
        if (ran) continue;
        // nobody runnable: open the barriers that every participant has reached
        unsigned done = 0, at_sync = 0;
        for (auto& f : fibers) { done += f.wait == DONE; at_sync += f.wait == AT_SYNC; }
        if (done == nthreads) return true;
        bool opened = false;
        if (at_sync == nthreads) {
            for (auto& f : fibers) f.wait = RUNNING;
            opened = true;
        }
        for (unsigned w = 0; w * 32 < nthreads; ++w) {
            bool all = true;
            for (unsigned l = 0; l < 32; ++l) all = all && fibers[w * 32 + l].wait == AT_SHFL;
            if (all) {
                for (unsigned l = 0; l < 32; ++l) fibers[w * 32 + l].wait = RUNNING;
                opened = true;
            }
        }
        if (!opened) return false;   // some wait at a barrier others never reach
    }
}

template <typename... A, size_t... I>
static void call(void (*k)(A...), void** p, std::index_sequence<I...>) {
    k(*static_cast<A*>(p[I])...);
}
template <typename... A>
static std::function<void(void**)> wrap(void (*k)(A...)) {
    return [k](void** p) { call(k, p, std::index_sequence_for<A...>{}); };
}

static std::map<std::string, std::function<void(void**)>>& table() {
#define FL_EMU_ENTRY(tfn, TF, twn, TW)                                                 \
    {"fl_ad_fwd_partial_" #tfn "_" #twn, wrap(fl_ad_fwd_partial_##tfn##_##twn)},       \
    {"fl_ad_bwd_" #tfn "_" #twn, wrap(fl_ad_bwd_##tfn##_##twn)},
    static std::map<std::string, std::function<void(void**)>> t = {
        FL_AD_TYPED_KERNELS(FL_EMU_ENTRY)
        {"fl_ad_fwd_finish", wrap(fl_ad_fwd_finish)},
        {"fl_ad_fwd_mean", wrap(fl_ad_fwd_mean)},
    };
#undef FL_EMU_ENTRY
    return t;
}

}  // namespace emu

extern "C" int fl_emu_launch(const char* name, unsigned grid, unsigned block, void** params) {
    auto it = emu::table().find(name);
    if (it == emu::table().end()) return 1;
    if (block == 0 || block % 32 != 0 || block > 1024) return 2;
    gridDim.x = grid;
    blockDim.x = block;
    auto& kernel = it->second;
    emu::body = [&kernel, params]() { kernel(params); };
    for (unsigned b = 0; b < grid; ++b) {
        blockIdx.x = b;
        if (!emu::run_block(block)) {
            std::fprintf(stderr, "emulator: deadlock in %s block %u\n", name, b);
            return 3;
        }
    }
    return 0;
}

extern "C" int fl_emu_kernel_count() { return (int)emu::table().size(); }

extern "C" float fl_emu_half_to_float(unsigned short h) { return fl_half_bits_to_float_sw(h); }
extern "C" unsigned short fl_emu_float_to_half(float f) { return fl_float_to_half_bits_sw(f); }
extern "C" unsigned short fl_emu_float_to_bf16(float f) {
    fl_bf16 r;
    fl_store(&r, f);
    return r.bits;
}
