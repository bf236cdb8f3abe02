// GGML weight formats on the device: a row is a run of blocks exactly as GGUF stores it.
// Kernels read weights 32 values at a time (a "unit": one block of the 32-value types,
// one sub-block of the 256-value k-quants, 32 plain values of the float types), so every
// format feeds the same dot and axpy loops.
#pragma once
#include "compat.cuh"

// GGML type ids (GGUF's numbering).
#define PI_F32 0
#define PI_F16 1
#define PI_Q4_0 2
#define PI_Q4_1 3
#define PI_Q5_0 6
#define PI_Q5_1 7
#define PI_Q8_0 8
#define PI_Q4_K 12
#define PI_Q5_K 13
#define PI_Q6_K 14
#define PI_BF16 30

// The 6-bit scale and minimum of sub-block j of a Q4_K/Q5_K block.
PI_DEVICE void pi_scale_min_k4(int j, const u8* q, int* sc, int* m) {
  if (j < 4) {
    *sc = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// Values 32u .. 32u + 32 of a row of `n_cols` values in `dtype` into w (values past the
// row's end, possible only for float types, read as 0).
PI_DEVICE void pi_unit(const u8* row, int dtype, int n_cols, int u, float* w) {
  switch (dtype) {
  case PI_F32:
  case PI_F16:
  case PI_BF16: {
    int base = 32 * u;
    int n = n_cols - base < 32 ? n_cols - base : 32;
    for (int j = 0; j < 32; j++) {
      float v = 0.0f;
      if (j < n) {
        int i = base + j;
        if (dtype == PI_F32) v = __uint_as_float(pi_load_u32(row + 4 * i));
        else if (dtype == PI_F16) v = pi_f16(pi_load_u16(row + 2 * i));
        else v = pi_bf16(pi_load_u16(row + 2 * i));
      }
      w[j] = v;
    }
    break;
  }
  case PI_Q4_0: {
    const u8* b = row + 18 * u;
    float d = pi_f16(pi_load_u16(b));
    for (int j = 0; j < 16; j++) {
      w[j] = ((int)(b[2 + j] & 0xF) - 8) * d;
      w[j + 16] = ((int)(b[2 + j] >> 4) - 8) * d;
    }
    break;
  }
  case PI_Q4_1: {
    const u8* b = row + 20 * u;
    float d = pi_f16(pi_load_u16(b)), m = pi_f16(pi_load_u16(b + 2));
    for (int j = 0; j < 16; j++) {
      w[j] = (b[4 + j] & 0xF) * d + m;
      w[j + 16] = (b[4 + j] >> 4) * d + m;
    }
    break;
  }
  case PI_Q5_0: {
    const u8* b = row + 22 * u;
    float d = pi_f16(pi_load_u16(b));
    u32 qh = pi_load_u32(b + 2);
    for (int j = 0; j < 16; j++) {
      int h0 = ((qh >> j) << 4) & 0x10;
      int h1 = (qh >> (j + 12)) & 0x10;
      w[j] = ((int)((b[6 + j] & 0xF) | h0) - 16) * d;
      w[j + 16] = ((int)((b[6 + j] >> 4) | h1) - 16) * d;
    }
    break;
  }
  case PI_Q5_1: {
    const u8* b = row + 24 * u;
    float d = pi_f16(pi_load_u16(b)), m = pi_f16(pi_load_u16(b + 2));
    u32 qh = pi_load_u32(b + 4);
    for (int j = 0; j < 16; j++) {
      int h0 = ((qh >> j) << 4) & 0x10;
      int h1 = (qh >> (j + 12)) & 0x10;
      w[j] = ((b[8 + j] & 0xF) | h0) * d + m;
      w[j + 16] = ((b[8 + j] >> 4) | h1) * d + m;
    }
    break;
  }
  case PI_Q8_0: {
    const u8* b = row + 34 * u;
    float d = pi_f16(pi_load_u16(b));
    for (int j = 0; j < 32; j++) w[j] = (float)(i8)b[2 + j] * d;
    break;
  }
  case PI_Q4_K:
  case PI_Q5_K: {
    int k5 = dtype == PI_Q5_K;
    const u8* b = row + (k5 ? 176 : 144) * (u / 8);
    int s = u % 8;
    float d = pi_f16(pi_load_u16(b)), dmin = pi_f16(pi_load_u16(b + 2));
    int sc, m;
    pi_scale_min_k4(s, b + 4, &sc, &m);
    float d1 = d * sc, m1 = dmin * m;
    const u8* qh = b + 16;
    const u8* qs = b + (k5 ? 48 : 16) + 32 * (s / 2);
    int hi = s & 1;
    for (int l = 0; l < 32; l++) {
      int q = hi ? qs[l] >> 4 : qs[l] & 0xF;
      if (k5) q += ((qh[l] >> s) & 1) << 4;
      w[l] = d1 * q - m1;
    }
    break;
  }
  case PI_Q6_K: {
    const u8* b = row + 210 * (u / 8);
    int s = u % 8, n = s / 4, k = s % 4;
    const u8* ql = b + 64 * n + (k & 1) * 32;
    const u8* qh = b + 128 + 32 * n;
    const i8* sc = (const i8*)(b + 192) + 8 * n + 2 * k;
    float d = pi_f16(pi_load_u16(b + 208));
    for (int l = 0; l < 32; l++) {
      int nib = k >= 2 ? ql[l] >> 4 : ql[l] & 0xF;
      int q = (nib | (((qh[l] >> (2 * k)) & 3) << 4)) - 32;
      w[l] = d * sc[l / 16] * q;
    }
    break;
  }
  default:
    for (int j = 0; j < 32; j++) w[j] = 0.0f;
  }
}

// Units of a row.
PI_DEVICE int pi_n_units(int n_cols) { return (n_cols + 31) / 32; }

// dot(row, x) over a row by the calling warp (every lane gets it): lane l takes units
// l, l + PI_WARP, ...
PI_DEVICE float pi_warp_dot(const u8* row, int dtype, int n_cols, const float* x, int lane) {
  float acc = 0.0f;
  float w[32];
  int nu = pi_n_units(n_cols);
  for (int u = lane; u < nu; u += PI_WARP) {
    pi_unit(row, dtype, n_cols, u, w);
    const float* xu = x + 32 * u;
    int n = n_cols - 32 * u < 32 ? n_cols - 32 * u : 32;
    for (int j = 0; j < n; j++) acc += w[j] * xu[j];
  }
  return pi_warp_sum(acc);
}
