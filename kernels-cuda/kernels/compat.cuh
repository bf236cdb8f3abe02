// One kernel source for three compilers: NVRTC (CUDA), hipcc/hiprtc (HIP) and the host
// C++ compiler with the CPU execution harness (harness/harness.h, which defines
// PI_HARNESS before including this file). Everything a kernel needs from its platform
// goes through the names defined here; kernels use no platform header of their own.
//
// PI_WARP is the number of lanes that execute together: 32 on NVIDIA and RDNA, 64 on
// CDNA (a compile-time parameter: `-DPI_WARP=64`).
#pragma once

#ifndef PI_WARP
#define PI_WARP 32
#endif

#if defined(PI_HARNESS)
// The harness header has defined threadIdx & co., __syncthreads, the shuffles and the
// atomics already.
#define PI_DEVICE static inline
#define PI_GLOBAL static
#elif defined(__HIPCC__) || defined(__HIPCC_RTC__)
#if !defined(__HIPCC_RTC__)
// hipcc offline (hiprtc has the runtime's declarations built in, as NVRTC has CUDA's).
#include <hip/hip_runtime.h>
#endif
#define PI_DEVICE __device__ static inline
#define PI_GLOBAL extern "C" __global__
#define PI_SHFL_XOR(v, m) __shfl_xor((v), (m), PI_WARP)
#else // CUDA (NVRTC)
#define PI_DEVICE __device__ static inline
#define PI_GLOBAL extern "C" __global__
#define PI_SHFL_XOR(v, m) __shfl_xor_sync(0xffffffffu, (v), (m), PI_WARP)
#endif

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef int i32;
typedef long long i64;

// IEEE half to float, in integer arithmetic (no platform half type needed).
PI_DEVICE float pi_f16(u16 h) {
  u32 sign = (u32)(h & 0x8000u) << 16;
  u32 exp = (h >> 10) & 0x1fu;
  u32 man = h & 0x3ffu;
  u32 bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {
      // Subnormal: normalize.
      int e = -1;
      do {
        e++;
        man <<= 1;
      } while ((man & 0x400u) == 0);
      bits = sign | ((u32)(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  return __uint_as_float(bits);
}

PI_DEVICE float pi_bf16(u16 h) { return __uint_as_float((u32)h << 16); }

// Float to IEEE half, round to nearest even (the KV cache's f16 stores).
PI_DEVICE u16 pi_to_f16(float f) {
  u32 x = __float_as_uint(f);
  u32 sign = (x >> 16) & 0x8000u;
  u32 ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) { // inf or nan
    return (u16)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
  }
  if (ax >= 0x477ff000u) { // rounds to >= 65520: overflow to inf
    return (u16)(sign | 0x7c00u);
  }
  if (ax < 0x38800000u) { // below the smallest normal half: subnormal or zero
    if (ax < 0x33000000u) return (u16)sign;
    u32 e = ax >> 23;
    u32 m = (ax & 0x7fffffu) | 0x800000u;
    u32 shift = 126 - e; // 14..24
    u32 half_m = m >> shift;
    u32 rem = m & ((1u << shift) - 1u);
    u32 mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half_m & 1u))) half_m++;
    return (u16)(sign | half_m);
  }
  u32 r = ax + 0xfffu + ((ax >> 13) & 1u); // round to nearest even at bit 13
  return (u16)(sign | ((r - 0x38000000u) >> 13));
}

PI_DEVICE u16 pi_load_u16(const u8* p) { return (u16)(p[0] | (p[1] << 8)); }
PI_DEVICE u32 pi_load_u32(const u8* p) {
  return (u32)p[0] | ((u32)p[1] << 8) | ((u32)p[2] << 16) | ((u32)p[3] << 24);
}

// Sum over the lanes of a warp; every lane gets the total. The butterfly's order is
// fixed, so the result does not depend on scheduling.
PI_DEVICE float pi_warp_sum(float v) {
  for (int m = PI_WARP / 2; m > 0; m >>= 1) v += PI_SHFL_XOR(v, m);
  return v;
}

PI_DEVICE float pi_warp_max(float v) {
  for (int m = PI_WARP / 2; m > 0; m >>= 1) v = fmaxf(v, PI_SHFL_XOR(v, m));
  return v;
}

PI_DEVICE double pi_warp_sum_f64(double v) {
  for (int m = PI_WARP / 2; m > 0; m >>= 1) v += PI_SHFL_XOR(v, m);
  return v;
}
