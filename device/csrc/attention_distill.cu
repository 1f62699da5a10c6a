// Fused Grad-CAM + LAD (attention distillation of Learning without Memorizing).
//
// Plain CUDA C++ for NVRTC: no torch headers and no includes at all (NVRTC does not find
// cuda_fp16.h / cuda_bf16.h without an include path, so the few conversions needed are
// defined here). Loaded by fieldlearn/device/ops/cuda_attention.py, which owns the launch
// geometry. Math, per sample b (j: the hw positions, k: the C channels):
//
//   c_j = sum_k w_k A_kj      r = relu(c)      n = max(||r||_2, eps)      q = r / n
//   loss_b = sum_j |q_j - qt_j|                LAD = mean_b loss_b
//
// Backward, with g = dLAD, s_j = sign(q_j - qt_j) (sign(0) = 0, as torch.abs) and
// S = sum_j q_j s_j (saved by the forward, independent of g):
//
//   dc_j  = [c_j > 0] * (g / B) * (s_j - q_j S) / n     (n not clamped)
//   dc_j  = [c_j > 0] * (g / B) * s_j / eps             (n clamped: the clamp has no gradient)
//   dA_kj = dc_j w_k          dw_k = sum_j dc_j A_kj
//
// Kernels (grid is 1-D everywhere; FL_BLOCK threads unless said otherwise):
//   fl_ad_fwd_partial_<TF>_<TW>  grid B*nsplit: block (b, s) sums channels
//                                [s*cpb, min(C, (s+1)*cpb)) of sample b into part[b, s, :]
//   fl_ad_fwd_finish             grid B, any multiple of 32 threads: part -> cam, stats, loss_b
//   fl_ad_fwd_mean               grid 1: loss_b -> out[0] (fixed-order sum / B)
//   fl_ad_bwd_<TF>_<TW>          grid B*nsplit: dA and dw for its channel slice, all positions
// Every reduction has a fixed order (no float atomics): results do not vary run to run.
// Each feature element is read once by the forward and once by the backward.
//
// Layout inside a (b, s) block: TJ = min(HW, FL_BLOCK) positions by KR = FL_BLOCK / TJ
// channel lanes; thread t is position tj = t % TJ (plus multiples of TJ when HW > FL_BLOCK)
// and lane tk = t / TJ. When HW <= FL_BLOCK the ITEMS channels a thread visits in one round
// are KR rows apart, so a round reads KR * ITEMS whole rows: contiguous, coalesced memory.
// Offsets inside a sample are int (the host checks C*HW < 2^31); sample offsets are 64-bit.

#ifndef FL_BLOCK
#define FL_BLOCK 256
#endif
#define FL_WARPS (FL_BLOCK / 32)

// ---------------------------------------------------------------------------- types

struct fl_half { unsigned short bits; };   // IEEE binary16, storage only
struct fl_bf16 { unsigned short bits; };   // bfloat16, storage only

__device__ __forceinline__ unsigned fl_f2u(float f) {
#ifdef __CUDA_ARCH__
    return __float_as_uint(f);
#else
    union { float f; unsigned u; } x; x.f = f; return x.u;
#endif
}

__device__ __forceinline__ float fl_u2f(unsigned u) {
#ifdef __CUDA_ARCH__
    return __uint_as_float(u);
#else
    union { float f; unsigned u; } x; x.u = u; return x.f;
#endif
}

// Software binary16 <-> float (round to nearest even). Used only where there is no PTX cvt
// (the host-side emulator in the tests); the GPU uses cvt.f32.f16 / cvt.rn.f16.f32.
__device__ __forceinline__ float fl_half_bits_to_float_sw(unsigned short h) {
    const unsigned sign = (unsigned)(h & 0x8000u) << 16;
    const unsigned exp = (h >> 10) & 0x1fu;
    const unsigned man = h & 0x3ffu;
    if (exp == 0x1fu) return fl_u2f(sign | 0x7f800000u | (man << 13));   // inf / nan
    if (exp != 0) return fl_u2f(sign | ((exp + 112u) << 23) | (man << 13));
    // zero or subnormal: man * 2^-24, exact in float
    const float v = (float)man * 5.9604644775390625e-8f;
    return sign ? -v : v;
}

__device__ __forceinline__ unsigned short fl_float_to_half_bits_sw(float f) {
    const unsigned u = fl_f2u(f);
    const unsigned short sign = (unsigned short)((u >> 16) & 0x8000u);
    const unsigned au = u & 0x7fffffffu;
    if (au > 0x7f800000u) return (unsigned short)(sign | 0x7e00u);        // nan
    if (au >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);       // rounds to inf
    if (au < 0x38800000u) {                                               // below 2^-14: subnormal
        // value = au as float; half subnormal = round(value * 2^24)
        const float v = fl_u2f(au) * 16777216.0f;                         // exact (power of two)
        // round half to even on the integer part
        unsigned i = (unsigned)v;
        const float frac = v - (float)i;
        if (frac > 0.5f || (frac == 0.5f && (i & 1u))) ++i;
        return (unsigned short)(sign | i);
    }
    // normal: rebias exponent (127 -> 15), keep 10 mantissa bits with round to nearest even
    unsigned m = au - (112u << 23);
    m += 0xfffu + ((m >> 13) & 1u);
    return (unsigned short)(sign | (m >> 13));
}

__device__ __forceinline__ float fl_to_float(float v) { return v; }

__device__ __forceinline__ float fl_to_float(fl_half v) {
#ifdef __CUDA_ARCH__
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
    return f;
#else
    return fl_half_bits_to_float_sw(v.bits);
#endif
}

__device__ __forceinline__ float fl_to_float(fl_bf16 v) {   // exact on every arch
    return fl_u2f((unsigned)v.bits << 16);
}

__device__ __forceinline__ void fl_store(float* p, float v) { *p = v; }

__device__ __forceinline__ void fl_store(fl_half* p, float v) {
    unsigned short h;
#ifdef __CUDA_ARCH__
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
#else
    h = fl_float_to_half_bits_sw(v);
#endif
    p->bits = h;
}

__device__ __forceinline__ void fl_store(fl_bf16* p, float v) {
    unsigned short h;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
#else
    // Round to nearest even in integer arithmetic (pre-Ampere GPUs have no bf16 cvt), as torch.
    const unsigned u = fl_f2u(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) h = (unsigned short)((u >> 16) | 0x40u);   // quiet nan
    else h = (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
#endif
    p->bits = h;
}

// Channels a thread visits per round (loads in flight per thread). Forward: 32 bytes per
// thread (float 8, half/bf16 16). Backward: 8 for every type, which keeps it at <= 64
// registers (4 blocks of 256 per SM) without spills; 16 would need ~100-150 registers.
template <typename T> struct fl_items_fwd { static const int value = 32 / (int)sizeof(T); };
#define FL_ITEMS_BWD 8

// ---------------------------------------------------------------------------- helpers

__device__ __forceinline__ float fl_relu(float c) { return c <= 0.f ? 0.f : c; }   // nan stays nan
__device__ __forceinline__ float fl_sign(float d) { return d > 0.f ? 1.f : (d < 0.f ? -1.f : 0.f); }

// All 32 lanes must call. The xor butterfly leaves the same bits in every lane.
__device__ __forceinline__ float fl_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Every thread of the block must call (blockDim.x a multiple of 32, at most 1024); every
// thread gets the same total. `red` is __shared__ float[32]; the leading barrier makes
// back-to-back calls safe.
__device__ __forceinline__ float fl_block_sum(float v, float* red) {
    v = fl_warp_sum(v);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    return fl_warp_sum(lane < nw ? red[lane] : 0.f);
}

// ---------------------------------------------------------------------------- forward

// The (b, s) block a thread is in and its place there (layout above): channels
// [k_begin, k_end) of sample b, position tj, channel lane tk of KR.
struct FlTile {
    int b, s, k_begin, k_end, TJ, KR, tj, tk;
    bool lane_ok;
};

__device__ __forceinline__ FlTile fl_tile(int C, int HW, int nsplit, int cpb) {
    const int b = blockIdx.x / nsplit, s = blockIdx.x - b * nsplit;
    const int k_begin = s * cpb;
    const int TJ = HW < FL_BLOCK ? HW : FL_BLOCK;
    const int KR = FL_BLOCK / TJ;
    const int tj = threadIdx.x % TJ, tk = threadIdx.x / TJ;
    return FlTile{b, s, k_begin, min(C, k_begin + cpb), TJ, KR, tj, tk, tk < KR};
}

template <typename TF, typename TW>
__device__ __forceinline__ void fl_fwd_partial(const TF* __restrict__ feat, const TW* __restrict__ w,
                                               float* __restrict__ part, int C, int HW, int nsplit, int cpb) {
    const int ITEMS = fl_items_fwd<TF>::value;
    __shared__ float red[FL_BLOCK];

    const int tid = threadIdx.x;
    const auto [b, s, k_begin, k_end, TJ, KR, tj, tk, lane_ok] = fl_tile(C, HW, nsplit, cpb);

    const TF* A = feat + (long long)b * C * HW;       // [C, HW]
    const TW* wb = w + (long long)b * C;              // [C]
    float* out = part + ((long long)b * nsplit + s) * HW;

    for (int j0 = 0; j0 < HW; j0 += TJ) {            // one tile unless HW > FL_BLOCK (then KR == 1)
        const int j = j0 + tj;
        float acc = 0.f;
        if (lane_ok && j < HW) {
            for (int k0 = k_begin + tk; k0 < k_end; k0 += KR * ITEMS) {
                float a[ITEMS], wk[ITEMS];
#pragma unroll
                for (int it = 0; it < ITEMS; ++it) {   // all loads first: ITEMS in flight
                    const int k = k0 + it * KR;
                    const bool in = k < k_end;
                    a[it] = in ? fl_to_float(A[k * HW + j]) : 0.f;
                    wk[it] = in ? fl_to_float(wb[k]) : 0.f;
                }
#pragma unroll
                for (int it = 0; it < ITEMS; ++it) acc = fmaf(wk[it], a[it], acc);
            }
        }
        if (KR == 1) {                               // HW > FL_BLOCK / 2: one lane per position
            if (lane_ok && j < HW) out[j] = acc;     // threads past TJ must not overwrite
        } else {                                     // block-uniform branch: HW == TJ < FL_BLOCK
            red[tid] = acc;                          // lanes past KR*TJ hold 0 and are never read
            __syncthreads();
            const int lane = tid & 31, warp = tid >> 5;
            for (int jj = warp; jj < TJ; jj += FL_WARPS) {
                float v = 0.f;
                for (int r = lane; r < KR; r += 32) v += red[r * TJ + jj];
                v = fl_warp_sum(v);
                if (lane == 0) out[jj] = v;
            }
        }
    }
}

// part [B, nsplit, HW], qt [B, HW] -> cam [B, HW] (pre-ReLU), stats [B, 2] = (||relu(cam)||_2
// unclamped, S = sum_j q_j sign(q_j - qt_j)), loss_b [B].
extern "C" __global__ void __launch_bounds__(FL_BLOCK)
fl_ad_fwd_finish(const float* __restrict__ part, const float* __restrict__ qt, float* __restrict__ cam,
                 float* __restrict__ stats, float* __restrict__ loss_b, int HW, int nsplit, float eps) {
    __shared__ float red[32];
    const int b = blockIdx.x;
    const float* p = part + (long long)b * nsplit * HW;
    const float* qb = qt + (long long)b * HW;
    float* cb = cam + (long long)b * HW;

    float ss = 0.f;
    for (int j = threadIdx.x; j < HW; j += blockDim.x) {
        float c = 0.f;
        for (int s = 0; s < nsplit; ++s) c += p[s * HW + j];   // fixed order over the splits
        cb[j] = c;
        const float r = fl_relu(c);
        ss = fmaf(r, r, ss);
    }
    ss = fl_block_sum(ss, red);
    const float nraw = sqrtf(ss);
    const float n = nraw < eps ? eps : nraw;         // clamp_min(eps); nan stays nan

    float l = 0.f, S = 0.f;
    for (int j = threadIdx.x; j < HW; j += blockDim.x) {   // same thread wrote cb[j] above
        const float q = fl_relu(cb[j]) / n;
        const float d = q - qb[j];
        l += fabsf(d);
        S = fmaf(q, fl_sign(d), S);
    }
    l = fl_block_sum(l, red);
    S = fl_block_sum(S, red);
    if (threadIdx.x == 0) {
        loss_b[b] = l;
        stats[2 * b] = nraw;
        stats[2 * b + 1] = S;
    }
}

// loss_b [B] -> out[0] = sum_b loss_b / B, one block, fixed order.
extern "C" __global__ void __launch_bounds__(FL_BLOCK)
fl_ad_fwd_mean(const float* __restrict__ loss_b, float* __restrict__ out, int B) {
    __shared__ float red[32];
    float v = 0.f;
    for (int i = threadIdx.x; i < B; i += blockDim.x) v += loss_b[i];
    v = fl_block_sum(v, red);
    if (threadIdx.x == 0) out[0] = v / (float)B;
}

// ---------------------------------------------------------------------------- backward

template <typename TF, typename TW>
__device__ __forceinline__ void fl_bwd(const TF* __restrict__ feat, const TW* __restrict__ w,
                                       const float* __restrict__ cam, const float* __restrict__ qt,
                                       const float* __restrict__ stats, const float* __restrict__ gout,
                                       TF* __restrict__ dfeat, TW* __restrict__ dw,
                                       int B, int C, int HW, int nsplit, int cpb, float eps) {
    const int ITEMS = FL_ITEMS_BWD;
    __shared__ float red[ITEMS * FL_BLOCK];

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const auto [b, s, k_begin, k_end, TJ, KR, tj, tk, lane_ok] = fl_tile(C, HW, nsplit, cpb);

    const long long boff = (long long)b * C * HW;
    const TF* A = feat + boff;
    TF* dA = dfeat + boff;
    const TW* wb = w + (long long)b * C;
    TW* dwb = dw + (long long)b * C;
    const float* cb = cam + (long long)b * HW;
    const float* qb = qt + (long long)b * HW;

    const float nraw = stats[2 * b], S = stats[2 * b + 1];
    const bool clamped = nraw < eps;
    const float n = clamped ? eps : nraw;
    const float gB = gout[0] / (float)B;

    // dc at one position (0 outside the ReLU's support)
    #define FL_DC(jpos, out_dc) do {                                              \
        const float c_ = cb[(jpos)];                                              \
        float dc_ = 0.f;                                                          \
        if (c_ > 0.f) {                                                           \
            const float q_ = c_ / n;                                              \
            const float sg_ = fl_sign(q_ - qb[(jpos)]);                           \
            dc_ = clamped ? gB * sg_ / n : gB * (sg_ - q_ * S) / n;               \
        }                                                                         \
        (out_dc) = dc_;                                                           \
    } while (0)

    const bool single = HW <= FL_BLOCK;
    float dc_single = 0.f;
    if (single && lane_ok) FL_DC(tj, dc_single);

    // Each thread accumulates dc_j * A_kj of its ITEMS channels in its own column of `red`
    // (shared memory rather than registers: keeps the 16-bit variants near 64 registers).
    for (int k0 = k_begin; k0 < k_end; k0 += KR * ITEMS) {       // rounds: block-uniform
        float wk[ITEMS];
#pragma unroll
        for (int it = 0; it < ITEMS; ++it) {
            const int k = k0 + it * KR + tk;
            wk[it] = (lane_ok && k < k_end) ? fl_to_float(wb[k]) : 0.f;
            red[it * FL_BLOCK + tid] = 0.f;                       // own column: no barrier needed
        }
        for (int j0 = 0; j0 < HW; j0 += TJ) {
            const int j = j0 + tj;
            if (lane_ok && j < HW) {
                float dc;
                if (single) dc = dc_single; else FL_DC(j, dc);
                const int off0 = (k0 + tk) * HW + j;              // channel k0 + tk, position j
                const int step = KR * HW;                         // next item: KR channels on
                float a[ITEMS];
#pragma unroll
                for (int it = 0; it < ITEMS; ++it)                // all loads first
                    a[it] = k0 + it * KR + tk < k_end ? fl_to_float(A[off0 + it * step]) : 0.f;
#pragma unroll
                for (int it = 0; it < ITEMS; ++it) {
                    if (k0 + it * KR + tk < k_end) {
                        fl_store(dA + off0 + it * step, dc * wk[it]);
                        red[it * FL_BLOCK + tid] = fmaf(dc, a[it], red[it * FL_BLOCK + tid]);
                    }
                }
            }
        }
        __syncthreads();
        // dw of this round's KR*ITEMS channels: channel (it, r) sums red[it][r*TJ + 0..TJ-1]
        for (int ch = warp; ch < KR * ITEMS; ch += FL_WARPS) {
            const int it = ch / KR, r = ch - it * KR;
            const int k = k0 + it * KR + r;
            float v = 0.f;
            for (int t = lane; t < TJ; t += 32) v += red[it * FL_BLOCK + r * TJ + t];
            v = fl_warp_sum(v);
            if (lane == 0 && k < k_end) fl_store(dwb + k, v);
        }
        __syncthreads();                                          // red is reused next round
    }
    #undef FL_DC
}

// ---------------------------------------------------------------------------- instantiation

// (feature type tag, feature type, head-row type tag, head-row type). The host casts any
// other head-row dtype to float32; q_t, cam, stats and the loss are always float32.
#define FL_AD_TYPED_KERNELS(X)          \
    X(f32, float, f32, float)           \
    X(f16, fl_half, f16, fl_half)       \
    X(f16, fl_half, f32, float)         \
    X(bf16, fl_bf16, bf16, fl_bf16)     \
    X(bf16, fl_bf16, f32, float)

#define FL_AD_DEFINE(tfn, TF, twn, TW)                                                              \
    extern "C" __global__ void __launch_bounds__(FL_BLOCK)                                         \
    fl_ad_fwd_partial_##tfn##_##twn(const TF* __restrict__ feat, const TW* __restrict__ w,         \
                                    float* __restrict__ part, int C, int HW, int nsplit, int cpb) { \
        fl_fwd_partial<TF, TW>(feat, w, part, C, HW, nsplit, cpb);                                 \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(FL_BLOCK, 4)                                      \
    fl_ad_bwd_##tfn##_##twn(const TF* __restrict__ feat, const TW* __restrict__ w,                 \
                            const float* __restrict__ cam, const float* __restrict__ qt,           \
                            const float* __restrict__ stats, const float* __restrict__ gout,       \
                            TF* __restrict__ dfeat, TW* __restrict__ dw,                           \
                            int B, int C, int HW, int nsplit, int cpb, float eps) {                \
        fl_bwd<TF, TW>(feat, w, cam, qt, stats, gout, dfeat, dw, B, C, HW, nsplit, cpb, eps);      \
    }

FL_AD_TYPED_KERNELS(FL_AD_DEFINE)
