// The device half of a hybrid layer: every kernel the CUDA (and HIP) device runs. Each
// has its CPU reference twin in `powerinfer-ops` and a test on the CPU execution harness
// comparing the two (kernels-cuda/tests/kernels.rs).
//
// Layouts: activations are row-major [n_tok][width] f32; weight matrices are GGUF rows
// (`row_bytes` apart); masks are one byte per (token, neuron); a layer's KV cache is
// [slot][kv head][position][head_dim], f16 or f32.
#include "quant.cuh"

// Token modes of a step (ops::transformer::SparsityMode).
#define PI_MODE_DENSE 0
#define PI_MODE_PREDICTOR 1
#define PI_MODE_GATE 2

// Gate/up combinations (ops::nn::Glu).
#define PI_GLU_SILU 0
#define PI_GLU_RELU 1
#define PI_GLU_DRELU 2
#define PI_GLU_GELU 3

// Token tile of the matrix product: one dequantized unit serves this many tokens.
#define PI_TT 4

PI_DEVICE float pi_silu(float g) { return g / (1.0f + expf(-g)); }
PI_DEVICE float pi_gelu(float x) {
  const float k = 0.7978845608f; // sqrt(2/pi)
  return 0.5f * x * (1.0f + tanhf(k * x * (1.0f + 0.044715f * x * x)));
}
PI_DEVICE float pi_relu(float x) { return x > 0.0f ? x : 0.0f; }

// The gate's activation alone (what gate mode thresholds).
PI_DEVICE float pi_gate_act(int glu, float g) {
  switch (glu) {
  case PI_GLU_SILU: return pi_silu(g);
  case PI_GLU_GELU: return pi_gelu(g);
  default: return pi_relu(g);
  }
}

// The neuron's value from gate g and up u.
PI_DEVICE float pi_glu(int glu, float g, float u) {
  switch (glu) {
  case PI_GLU_SILU: return pi_silu(g) * u;
  case PI_GLU_RELU: return pi_relu(g) * u;
  case PI_GLU_DRELU: return pi_relu(g) * pi_relu(u);
  default: return pi_gelu(g) * u;
  }
}

// y[t][r] (= or +=) dot(w[r], x[t]) for every row r and token t: matrix × vector when
// n_tok = 1, matrix × matrix otherwise. One warp per row; each dequantized unit is used
// for a tile of PI_TT tokens. grid = (ceil(n_rows / warps per block), ceil(n_tok / PI_TT)).
PI_GLOBAL void pi_matmul(const u8* w, int dtype, int n_rows, int n_cols, i64 row_bytes,
                         const float* x, int n_tok, float* y, int accumulate) {
  int lane = threadIdx.x % PI_WARP;
  int r = blockIdx.x * (blockDim.x / PI_WARP) + threadIdx.x / PI_WARP;
  int t0 = blockIdx.y * PI_TT;
  if (r >= n_rows) return; // whole warps leave together
  const u8* row = w + row_bytes * r;
  float acc[PI_TT];
  for (int k = 0; k < PI_TT; k++) acc[k] = 0.0f;
  float wu[32];
  int nu = pi_n_units(n_cols);
  for (int u = lane; u < nu; u += PI_WARP) {
    pi_unit(row, dtype, n_cols, u, wu);
    int n = n_cols - 32 * u < 32 ? n_cols - 32 * u : 32;
    for (int k = 0; k < PI_TT; k++) {
      if (t0 + k >= n_tok) break;
      const float* xu = x + (i64)(t0 + k) * n_cols + 32 * u;
      float a = 0.0f;
      for (int j = 0; j < n; j++) a += wu[j] * xu[j];
      acc[k] += a;
    }
  }
  for (int k = 0; k < PI_TT; k++) {
    float s = pi_warp_sum(acc[k]);
    if (lane == 0 && t0 + k < n_tok) {
      float* o = y + (i64)(t0 + k) * n_rows + r;
      *o = accumulate ? *o + s : s;
    }
  }
}

// The hot side's gate and up under each token's choice of neurons: for token t and
// neuron r, h[t][r] = glu(gate_r · x_t, up_r · x_t) where the token chooses r (dense:
// every neuron; predictor: mask[t][r] != 0; gate: |act(gate_r · x_t)| > gate_threshold,
// the gate computed for every neuron), else 0 and neither dot product is computed past
// what the choice needs. Each chosen neuron adds 1 to counts[t * counts_stride].
// One warp per neuron; grid = ceil(n_rows / warps per block).
PI_GLOBAL void pi_ffn_gate_up(const u8* gate, int gate_dtype, i64 gate_row_bytes,
                              const u8* up, int up_dtype, i64 up_row_bytes, int n_rows,
                              int n_cols, const float* x, int n_tok, const i32* modes,
                              const u8* mask, int glu, float gate_threshold, float* h,
                              u32* counts, int counts_stride) {
  int lane = threadIdx.x % PI_WARP;
  int r = blockIdx.x * (blockDim.x / PI_WARP) + threadIdx.x / PI_WARP;
  if (r >= n_rows) return;
  const u8* g_row = gate + gate_row_bytes * r;
  const u8* u_row = up + up_row_bytes * r;
  for (int t = 0; t < n_tok; t++) {
    const float* xt = x + (i64)t * n_cols;
    int mode = modes[t];
    int chosen;
    float g = 0.0f;
    int have_g = 0;
    if (mode == PI_MODE_DENSE) {
      chosen = 1;
    } else if (mode == PI_MODE_PREDICTOR) {
      chosen = mask[(i64)t * n_rows + r] != 0;
    } else {
      g = pi_warp_dot(g_row, gate_dtype, n_cols, xt, lane);
      have_g = 1;
      chosen = fabsf(pi_gate_act(glu, g)) > gate_threshold;
    }
    float v = 0.0f;
    if (chosen) {
      if (!have_g) g = pi_warp_dot(g_row, gate_dtype, n_cols, xt, lane);
      float u = pi_warp_dot(u_row, up_dtype, n_cols, xt, lane);
      v = pi_glu(glu, g, u);
      if (lane == 0) atomicAdd(counts + (i64)t * counts_stride, 1u);
    }
    if (lane == 0) h[(i64)t * n_rows + r] = v;
  }
}

// Row-sparse axpy over down_t: part[s][t][c] = Σ h[t][i] · down_t[i][c] over the rows i
// of split s (rows s·rows_per_split ..), skipping h = 0. A thread owns one unit (32
// columns) of one token; grid = (ceil(units / blockDim.x), n_split, n_tok).
PI_GLOBAL void pi_axpy_rows(const u8* down_t, int dtype, i64 row_bytes, int n_rows,
                            int n_cols, const float* h, int n_tok, int rows_per_split,
                            float* part) {
  int u = blockIdx.x * blockDim.x + threadIdx.x;
  int s = blockIdx.y, t = blockIdx.z;
  int nu = pi_n_units(n_cols);
  if (u >= nu || t >= n_tok) return;
  float acc[32];
  for (int j = 0; j < 32; j++) acc[j] = 0.0f;
  float w[32];
  int i0 = s * rows_per_split;
  int i1 = i0 + rows_per_split < n_rows ? i0 + rows_per_split : n_rows;
  const float* ht = h + (i64)t * n_rows;
  for (int i = i0; i < i1; i++) {
    float a = ht[i];
    if (a == 0.0f) continue;
    pi_unit(down_t + row_bytes * i, dtype, n_cols, u, w);
    for (int j = 0; j < 32; j++) acc[j] += a * w[j];
  }
  int n = n_cols - 32 * u < 32 ? n_cols - 32 * u : 32;
  float* o = part + ((i64)s * n_tok + t) * n_cols + 32 * u;
  for (int j = 0; j < n; j++) o[j] = acc[j];
}

// out[i] = Σ_s part[s][i] in split order (deterministic).
PI_GLOBAL void pi_sum_splits(const float* part, int n_split, i64 len, float* out) {
  i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= len) return;
  float acc = 0.0f;
  for (int s = 0; s < n_split; s++) acc += part[s * len + i];
  out[i] = acc;
}

// out[b] = rms_norm(x[rows ? rows[b] : b]) · weight, sum of squares in f64 (as GGML
// does). One block per output row; blockDim.x a multiple of PI_WARP, at most 1024.
PI_GLOBAL void pi_rms_norm(const float* x, const u32* rows, const float* weight, int n,
                           float eps, float* out) {
  __shared__ double partial[1024 / PI_WARP];
  __shared__ float scale_s;
  int b = blockIdx.x;
  const float* xr = x + (i64)(rows ? rows[b] : (u32)b) * n;
  double acc = 0.0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) acc += (double)xr[i] * (double)xr[i];
  acc = pi_warp_sum_f64(acc);
  int warp = threadIdx.x / PI_WARP, n_warps = blockDim.x / PI_WARP;
  if (threadIdx.x % PI_WARP == 0) partial[warp] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    double sum = 0.0;
    for (int k = 0; k < n_warps; k++) sum += partial[k];
    float mean = (float)(sum / (double)n);
    scale_s = 1.0f / sqrtf(mean + eps);
  }
  __syncthreads();
  float scale = scale_s;
  float* o = out + (i64)b * n;
  for (int i = threadIdx.x; i < n; i += blockDim.x) o[i] = (xr[i] * scale) * weight[i];
}

// RoPE in place on x ([n_tok][n_heads][head_dim]): pair i of every head of token t turns
// by the angle whose (cos, sin) is cos_sin[t][i]; pairs are (2i, 2i+1) or, NeoX, (i,
// i + n_rot/2). One thread per (token, head, pair).
PI_GLOBAL void pi_rope(float* x, int n_tok, int n_heads, int head_dim, int n_rot, int neox,
                       const float* cos_sin) {
  int half = n_rot / 2;
  i64 id = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (id >= (i64)n_tok * n_heads * half) return;
  int i = (int)(id % half);
  i64 th = id / half; // token * n_heads + head
  int t = (int)(th / n_heads);
  float* hx = x + th * head_dim;
  int a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
  float c = cos_sin[((i64)t * half + i) * 2], s = cos_sin[((i64)t * half + i) * 2 + 1];
  float x0 = hx[a], x1 = hx[b];
  hx[a] = x0 * c - x1 * s;
  hx[b] = x0 * s + x1 * c;
}

// Writes each token's keys and values ([n_tok][n_head_kv · head_dim]) at its position in
// its slot of the layer's cache. One thread per (token, element).
PI_GLOBAL void pi_kv_write(const float* k, const float* v, int n_tok, int n_head_kv,
                           int head_dim, int n_ctx, const i32* slots, const i32* pos,
                           int f16, u8* k_cache, u8* v_cache) {
  int width = n_head_kv * head_dim;
  i64 id = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (id >= (i64)n_tok * width) return;
  int t = (int)(id / width), e = (int)(id % width);
  int hh = e / head_dim, d = e % head_dim;
  i64 at = (((i64)slots[t] * n_head_kv + hh) * n_ctx + pos[t]) * head_dim + d;
  if (f16) {
    ((u16*)k_cache)[at] = pi_to_f16(k[id]);
    ((u16*)v_cache)[at] = pi_to_f16(v[id]);
  } else {
    ((float*)k_cache)[at] = k[id];
    ((float*)v_cache)[at] = v[id];
  }
}

PI_DEVICE float pi_kv_load(const u8* cache, int f16, i64 i) {
  return f16 ? pi_f16(((const u16*)cache)[i]) : ((const float*)cache)[i];
}

// Block-wide sum or max of v (every thread gets it); `red` holds one value per warp.
PI_DEVICE float pi_block_reduce(float v, float* red, int is_max) {
  v = is_max ? pi_warp_max(v) : pi_warp_sum(v);
  int warp = threadIdx.x / PI_WARP, n_warps = blockDim.x / PI_WARP;
  if (threadIdx.x % PI_WARP == 0) red[warp] = v;
  __syncthreads();
  float r = red[0];
  for (int k = 1; k < n_warps; k++) r = is_max ? fmaxf(r, red[k]) : r + red[k];
  __syncthreads();
  return r;
}

// Attention for decode and prefill: query head h of token t (block (t, h)) attends over
// positions 0..=pos[t] of its slot, through KV head h / (n_head / n_head_kv):
// out = softmax(scale · q·K^T) · V. `scores` is scratch of n_ctx floats per (token,
// head). blockDim.x a multiple of PI_WARP, at most 1024.
PI_GLOBAL void pi_attention(const float* q, const u8* k_cache, const u8* v_cache, int f16,
                            int n_tok, int n_head, int n_head_kv, int head_dim, int n_ctx,
                            const i32* slots, const i32* pos, float scale, float* scores,
                            float* out) {
  __shared__ float red[1024 / PI_WARP];
  int t = blockIdx.x, h = blockIdx.y;
  if (t >= n_tok) return; // the whole block
  int kvh = h / (n_head / n_head_kv);
  int n = pos[t] + 1;
  const float* qh = q + ((i64)t * n_head + h) * head_dim;
  i64 base = ((i64)slots[t] * n_head_kv + kvh) * n_ctx * head_dim;
  float* sc = scores + ((i64)t * n_head + h) * n_ctx;
  float mx = -3.0e38f;
  for (int p = threadIdx.x; p < n; p += blockDim.x) {
    i64 kp = base + (i64)p * head_dim;
    float s = 0.0f;
    for (int d = 0; d < head_dim; d++) s += qh[d] * pi_kv_load(k_cache, f16, kp + d);
    s *= scale;
    sc[p] = s;
    mx = fmaxf(mx, s);
  }
  mx = pi_block_reduce(mx, red, 1);
  float sum = 0.0f;
  for (int p = threadIdx.x; p < n; p += blockDim.x) {
    float e = expf(sc[p] - mx);
    sc[p] = e;
    sum += e;
  }
  sum = pi_block_reduce(sum, red, 0); // also orders the score writes before the reads
  float inv = 1.0f / sum;
  float* o = out + ((i64)t * n_head + h) * head_dim;
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float acc = 0.0f;
    for (int p = 0; p < n; p++) acc += sc[p] * pi_kv_load(v_cache, f16, base + (i64)p * head_dim + d);
    o[d] = acc * inv;
  }
}

// x[t][i] = act(x[t][i] + bias[i]) for act = identity (0) or ReLU (1); bias may be null.
PI_GLOBAL void pi_bias_act(float* x, const float* bias, int n_tok, int n, int relu) {
  i64 id = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (id >= (i64)n_tok * n) return;
  float v = x[id];
  if (bias) v += bias[id % n];
  x[id] = relu ? pi_relu(v) : v;
}

// The elementwise activations: g[i] = glu(g[i], u[i]), or g[i] = act(g[i]) without u.
PI_GLOBAL void pi_glu_elementwise(float* g, const float* u, i64 n, int glu) {
  i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  g[i] = u ? pi_glu(glu, g[i], u[i]) : pi_gate_act(glu, g[i]);
}

// The predictor's threshold: for predictor-mode tokens, neuron i is predicted active
// where logits[t][i] >= threshold; hot_mask gets neurons 0..n_hot, cold_mask the rest
// (from index 0); other tokens get empty masks. One thread per (token, neuron).
PI_GLOBAL void pi_select(const float* logits, int n_tok, int n_ff, int n_hot,
                         const i32* modes, float threshold, u8* hot_mask, u8* cold_mask) {
  i64 id = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (id >= (i64)n_tok * n_ff) return;
  int t = (int)(id / n_ff), i = (int)(id % n_ff);
  u8 on = modes[t] == PI_MODE_PREDICTOR && logits[id] >= threshold;
  if (i < n_hot) hot_mask[(i64)t * n_hot + i] = on;
  else cold_mask[(i64)t * (n_ff - n_hot) + (i - n_hot)] = on;
}

// The merge: x[i] += hot[i] + cold[i] (either may be null).
PI_GLOBAL void pi_merge(float* x, const float* hot, const float* cold, i64 n) {
  i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  if (hot && cold) x[i] += hot[i] + cold[i];
  else if (hot) x[i] += hot[i];
  else if (cold) x[i] += cold[i];
}

// The kernels, for the harness's launch table and the module loader's name list.
#define PI_KERNEL_LIST(X)                                                                  \
  X(pi_matmul)                                                                             \
  X(pi_ffn_gate_up)                                                                        \
  X(pi_axpy_rows)                                                                          \
  X(pi_sum_splits)                                                                         \
  X(pi_rms_norm)                                                                           \
  X(pi_rope)                                                                               \
  X(pi_kv_write)                                                                           \
  X(pi_attention)                                                                          \
  X(pi_bias_act)                                                                           \
  X(pi_glu_elementwise)                                                                    \
  X(pi_select)                                                                             \
  X(pi_merge)
