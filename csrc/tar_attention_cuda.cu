// vstar-kernels: the CUDA fallback of TAR temporal attention, for GPUs where Triton is unavailable.
//
// No ATen here: raw pointers, element strides, the caller's stream. Grid: one axis, slice-major and grid-strided:
// work item w is block w % blocks (kWarps query frames) of the (batch, head) slice w / blocks, so the blocks of one
// slice run back to back and read its K and V from L2 after the first. One warp owns one query row:
//   logits   lane j of the warp computes <q, k_j> for key j of a shared-memory tile (kTileN keys, fp32);
//   softmax  online, in the exp2 domain (logits scaled by scale * log2 e);
//   P V      lane c owns channels c, c + 32, ... of the output row.
// Relative mode first sweeps K for the unbiased row max (tar_bias_coeff needs it; a row max given by the call,
// p.row_max, replaces the sweep), then runs the online softmax; p.lse receives each row's log-sum-exp of the biased
// logits in natural units, (m + log2 l) * ln 2.
// The backward (tar_bwd_query_kernel, tar_bwd_key_kernel, below) reuses those passes and the same logit function.
// The Gaussian and the bias come from tar_attention.h, the one C++ definition. Correctness first: no tensor cores.
// A frame-distance profile (p.profile.on, warp-uniform) enters every logit through profile_logit() below
// (tar_profile_pair / tar_profile_logit): masked pairs get -inf and no gradient, the relative row max runs over the
// kept keys, a row with no kept key gets output 0, lse -inf and zero gradients; dS = dS' * scale where S > 0.
// No FP64 anywhere: frame distances are int32 (frames and |offset_delta| <= 2^30, checked by the launcher; the
// folded layout's starts lie in [-tokens_per_frame, 2^30]), rounded to float once (`nvcc_check` compiles with -Xptxas --warn-on-double-precision-use and fails on a warning).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "tar_attention.h"

namespace vstar {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
__device__ __forceinline__ float to_float(T x) { return static_cast<float>(x); }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x) { return static_cast<T>(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_max(float x) {
  for (int off = 16; off > 0; off >>= 1) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, off));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(kFullMask, x, off);
  return x;
}

// DPL: head-dim slots per lane (head_dim <= 32 * DPL). Tiles hold kTileN keys of K and V as fp32; K rows are
// padded by one float so lane j reading row j hits distinct banks.
template <int DPL>
struct TileShape {
  static constexpr int kDim = 32 * DPL;
  static constexpr int kTileN = DPL >= 8 ? 16 : 32;
  static constexpr int kKStride = kDim + 1;
};

template <typename T, int DPL>
__device__ void load_tile(float* dst, int dst_stride, const T* base, int64_t frame_stride, int64_t dim_stride,
                          int64_t j0, int64_t len, int64_t head_dim) {
  using S = TileShape<DPL>;
  for (int idx = threadIdx.x; idx < S::kTileN * S::kDim; idx += kThreads) {
    const int row = idx / S::kDim, col = idx % S::kDim;
    const int64_t j = j0 + row;
    float x = 0.f;
    if (j < len && col < head_dim) x = to_float(base[j * frame_stride + col * dim_stride]);
    dst[row * dst_stride + col] = x;
  }
}

// Dot product of two fp32 rows in shared memory, channel by channel with fmaf in order 0..head_dim-1. Every kernel
// computes its logits with this one function, so a logit recomputed by the backward is bit-identical to the
// forward's: the backward finds the row max's tied keys with ==.
__device__ __forceinline__ float row_dot(const float* a, const float* b, int64_t head_dim) {
  float dot = 0.f;
  for (int c = 0; c < head_dim; ++c) dot = fmaf(a[c], b[c], dot);
  return dot;
}

// Two tiles of rows start..start+kTileN (K and V, or Q and dO) into shared memory, between block barriers.
template <typename T, int DPL>
__device__ __forceinline__ void load_tile_pair(float* a, const T* a_base, TensorStrides a_strides, float* b,
                                               const T* b_base, TensorStrides b_strides, int64_t start, int64_t len,
                                               int64_t head_dim) {
  using S = TileShape<DPL>;
  __syncthreads();
  load_tile<T, DPL>(a, S::kKStride, a_base, a_strides.frame, a_strides.dim, start, len, head_dim);
  load_tile<T, DPL>(b, S::kKStride, b_base, b_strides.frame, b_strides.dim, start, len, head_dim);
  __syncthreads();
}

// Logit (exp2 domain) of this lane's key in the current tile; -inf past the end of the row.
template <int DPL>
__device__ __forceinline__ float lane_logit(const float* q_row, const float* k_tile, int lane, bool valid,
                                            float qk_log2_scale, int64_t head_dim) {
  using S = TileShape<DPL>;
  if (!valid) return -INFINITY;
  return row_dot(q_row, k_tile + lane * S::kKStride, head_dim) * qk_log2_scale;
}

// Query row i's frame: gi - k_offset = offset_delta + frame(i), int32 (the launcher checked the limits), and whether
// the token has a frame at all (text tokens of a framed layout do not).
struct RowFrame {
  int32_t pos;
  bool framed;
};
__device__ __forceinline__ RowFrame row_position(const TARParams& p, int64_t i) {
  const int32_t f = tar_query_frame<int32_t>(p, static_cast<int32_t>(i));
  return {static_cast<int32_t>(p.offset_delta) + f, f >= 0};
}

// The profile's pair of query row `row` (row_position) and key j for head h (tar_profile_pair, int32 frames).
__device__ __forceinline__ ProfilePair profile_at(const TARParams& p, RowFrame row, int64_t h, int64_t j) {
  const int32_t fj = tar_key_frame<int32_t>(p, static_cast<int32_t>(j));
  const int32_t delta = static_cast<int32_t>(p.offset_delta);
  return tar_profile_pair<int32_t>(p.profile, h, delta, row.framed ? row.pos - delta : -1, fj);
}

// The profile's logit (exp2 domain, before the band) of a pair, -inf where the pair is masked.
__device__ __forceinline__ float profile_logit(const ProfilePair& pr, float t) {
  return pr.kept ? tar_profile_logit(pr, t, kLog2e) : -INFINITY;
}

// Relative mode's first pass: max_j of the unbiased exp2-domain logits of this warp's query row (warp-uniform), over
// the keys a profile keeps (row_pos, h: the row's frame and head).
template <typename T, int DPL>
__device__ float unbiased_row_max(const TARParams& p, const float* q_row, float* k_tile, const T* kb, int lane,
                                  RowFrame row_pos, int64_t h) {
  using S = TileShape<DPL>;
  const float qk_log2_scale = p.scale * kLog2e;
  float row_max = -INFINITY;
  for (int64_t j0 = 0; j0 < p.len_k; j0 += S::kTileN) {
    __syncthreads();
    load_tile<T, DPL>(k_tile, S::kKStride, kb, p.k.frame, p.k.dim, j0, p.len_k, p.head_dim);
    __syncthreads();
    const bool valid = lane < S::kTileN && j0 + lane < p.len_k;
    float t = lane_logit<DPL>(q_row, k_tile, lane, valid, qk_log2_scale, p.head_dim);
    if (valid && p.profile.on && !profile_at(p, row_pos, h, j0 + lane).kept) t = -INFINITY;
    row_max = fmaxf(row_max, t);
  }
  return warp_max(row_max);
}

// G_ij of query row `row` (row_position) and key j: the frame distance is exact int32, rounded once; 0 when either
// token has no frame.
__device__ __forceinline__ float gaussian_at(const TARParams& p, RowFrame row, int64_t j) {
  const int32_t fj = tar_key_frame<int32_t>(p, static_cast<int32_t>(j));
  return row.framed && fj >= 0 ? tar_gaussian(static_cast<float>(row.pos - fj), p.gauss_log2_coeff) : 0.f;
}

// The biased exp2-domain logit t' = t + coeff * G_ij of query row `row` and key j.
__device__ __forceinline__ float biased_logit(const TARParams& p, float t, float coeff, RowFrame row, int64_t j) {
  return t + coeff * gaussian_at(p, row, j);
}

// One (batch, head) slice of a (batch, frames, heads, head_dim) tensor.
template <typename T>
__device__ __forceinline__ T* slice_base(T* t, const TensorStrides& s, const TARParams& p, int64_t bh) {
  return t + (bh / p.heads) * s.batch + (bh % p.heads) * s.head;
}

// The online softmax of one query row over every key tile: running max m and sum l (exp2 domain) and the
// unnormalised P V in acc (lane owns channels lane + 32 s). `coeff` multiplies G (tar_bias_coeff). With a profile
// that masks every key of the row, m stays -inf and l 0.
template <typename T, int DPL>
__device__ void online_row_softmax(const TARParams& p, const float* q_row, float* k_tile, float* v_tile,
                                   const T* kb, const T* vb, int lane, int64_t i, int64_t h, float coeff,
                                   bool has_bias, float& m, float& l, float (&acc)[DPL]) {
  using S = TileShape<DPL>;
  const float qk_log2_scale = p.scale * kLog2e;
  const RowFrame row_pos = row_position(p, i);
  m = -INFINITY;
  l = 0.f;
#pragma unroll
  for (int s = 0; s < DPL; ++s) acc[s] = 0.f;
  for (int64_t j0 = 0; j0 < p.len_k; j0 += S::kTileN) {
    load_tile_pair<T, DPL>(k_tile, kb, p.k, v_tile, vb, p.v, j0, p.len_k, p.head_dim);
    const int64_t j = j0 + lane;
    const bool valid = lane < S::kTileN && j < p.len_k;
    float t = lane_logit<DPL>(q_row, k_tile, lane, valid, qk_log2_scale, p.head_dim);
    if (valid && p.profile.on) t = profile_logit(profile_at(p, row_pos, h, j), t);
    if (valid && has_bias) t = biased_logit(p, t, coeff, row_pos, j);
    const float m_new = fmaxf(m, warp_max(t));
    const float m_ref = m_new == -INFINITY ? 0.f : m_new;  // every key so far masked: nothing to rescale
    const float alpha = exp2f(m - m_ref);
    const float pj = valid ? exp2f(t - m_ref) : 0.f;
    l = l * alpha + warp_sum(pj);
#pragma unroll
    for (int s = 0; s < DPL; ++s) acc[s] *= alpha;
    const int n = static_cast<int>(p.len_k - j0 < S::kTileN ? p.len_k - j0 : S::kTileN);
    for (int jj = 0; jj < n; ++jj) {
      const float pb = __shfl_sync(kFullMask, pj, jj);
#pragma unroll
      for (int s = 0; s < DPL; ++s) acc[s] = fmaf(pb, v_tile[jj * S::kKStride + lane + 32 * s], acc[s]);
    }
    m = m_new;
  }
}

// Loads this warp's row i (fp32, zero past head_dim or past the end) into shared memory.
template <typename T, int DPL>
__device__ __forceinline__ void load_row(float* dst, const T* base, int64_t frame_stride, int64_t dim_stride,
                                         int64_t i, bool valid, int64_t head_dim, int lane) {
  for (int c = lane; c < TileShape<DPL>::kDim; c += 32)
    dst[c] = (valid && c < head_dim) ? to_float(base[i * frame_stride + c * dim_stride]) : 0.f;
}

// At least 4 resident blocks per SM caps registers at 128; without the bound ptxas spilled a few bytes in the
// small head-dim variants (found by `python -m vstar_kernels.checks.nvcc_check`).
template <typename T, int DPL, bool kRelative>
__global__ void __launch_bounds__(kThreads, 4)
    tar_attention_kernel(TARParams p, const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                         T* __restrict__ o) {
  using S = TileShape<DPL>;
  __shared__ float k_tile[S::kTileN * S::kKStride];
  __shared__ float v_tile[S::kTileN * S::kKStride];
  __shared__ float q_rows[kWarps][S::kDim];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t num_row_blocks = (p.len_q + kWarps - 1) / kWarps;
  const bool has_bias = tar_has_bias(p);

  for (int64_t w = blockIdx.x; w < p.batch * p.heads * num_row_blocks; w += gridDim.x) {
    const int64_t bh = w / num_row_blocks, rb = w % num_row_blocks;
    const T* qb = slice_base(q, p.q, p, bh);
    const T* kb = slice_base(k, p.k, p, bh);
    const T* vb = slice_base(v, p.v, p, bh);
    T* ob = slice_base(o, p.o, p, bh);
    const int64_t i = rb * kWarps + warp;
    const bool row_valid = i < p.len_q;
    load_row<T, DPL>(q_rows[warp], qb, p.q.frame, p.q.dim, i, row_valid, p.head_dim, lane);
    __syncwarp();

    const int64_t b = bh / p.heads, h = bh % p.heads;
    float coeff = has_bias ? tar_bias_coeff(p, 0.f, kLog2e) : 0.f;  // absolute: fixed
    if (kRelative && has_bias) {
      // p.row_max is uniform over the block, so every warp takes the same branch (the sweep has block barriers)
      const float peak = p.row_max != nullptr
                             ? (row_valid ? p.row_max[tar_row_offset(p.row_max_s, b, i, h)] * kLog2e : 0.f)
                             : unbiased_row_max<T, DPL>(p, q_rows[warp], k_tile, kb, lane, row_position(p, i), h);
      coeff = tar_bias_coeff(p, peak, kLog2e);
    }
    float m, l, acc[DPL];
    online_row_softmax<T, DPL>(p, q_rows[warp], k_tile, v_tile, kb, vb, lane, i, h, coeff, has_bias, m, l, acc);

    if (row_valid) {
      const bool kept_any = l > 0.f;  // false only for a profiled row with no kept key: output 0, lse -inf
      const float inv_l = kept_any ? 1.f / l : 0.f;
#pragma unroll
      for (int s = 0; s < DPL; ++s) {
        const int c = lane + 32 * s;
        if (c < p.head_dim) ob[i * p.o.frame + c * p.o.dim] = from_float<T>(acc[s] * inv_l);
      }
      if (p.lse != nullptr && lane == 0)
        p.lse[tar_row_offset(p.lse_s, b, i, h)] = kept_any ? (m + log2f(l)) * kLn2 : -INFINITY;
    }
    __syncwarp();
  }
}

// ---------------------------------------------------------------------------------------------------- backward
// Two kernels, no atomics (DESIGN.md §10; the same split as the Triton backward):
//   tar_bwd_query_kernel  one warp per query row i: recomputes the forward (row max m_i, lse_i, O_i in fp32),
//                         D_i = <dO_i, O_i>, then one more sweep for dS'_ij = P_ij (dP_ij - D_i), the row max's
//                         gradient share_i = strength * sum_j dS'_ij G_ij / #ties and
//                         dQ_i = scale * (sum_j dS'_ij k_j + share_i * sum_{j tied} k_j). Writes the four row
//                         statistics (m, lse, D, share) for the second kernel.
//   tar_bwd_key_kernel    one warp per key j: dV_j = sum_i P_ij dO_i and dK_j = scale * sum_i dS_ij q_i, with
//                         dS_ij = dS'_ij + share_i at the tied keys [t_ij == m_i].
// Logits are exp2-domain (t = S log2 e) as in the forward; gradients are in natural units.

struct RowStats {
  float row_max, lse, delta, share;
};

// q, k, v and the incoming gradient of the (batch, head) slice bh: what both backward kernels read.
template <typename T>
struct BackwardSlice {
  const T *q, *k, *v, *grad_out;
};

template <typename T>
__device__ __forceinline__ BackwardSlice<T> backward_slice(const TARParams& p, const TARGradStrides& g, const T* q,
                                                           const T* k, const T* v, const T* grad_out, int64_t bh) {
  return {slice_base(q, p.q, p, bh), slice_base(k, p.k, p, bh), slice_base(v, p.v, p, bh),
          slice_base(grad_out, g.grad_out, p, bh)};
}

__device__ __forceinline__ float* stat_plane(float* stats, int stat, const TARParams& p) {
  return stats + static_cast<int64_t>(stat) * p.batch * p.heads * p.len_q;
}

template <typename T, int DPL, bool kRelative>
__global__ void __launch_bounds__(kThreads, 4)
    tar_bwd_query_kernel(TARParams p, TARGradStrides g, const T* __restrict__ grad_out, const T* __restrict__ q,
                         const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ dq,
                         float* __restrict__ stats) {
  using S = TileShape<DPL>;
  __shared__ float k_tile[S::kTileN * S::kKStride];
  __shared__ float v_tile[S::kTileN * S::kKStride];
  __shared__ float q_rows[kWarps][S::kDim];
  __shared__ float do_rows[kWarps][S::kDim];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float qk_log2_scale = p.scale * kLog2e;
  const int64_t num_row_blocks = (p.len_q + kWarps - 1) / kWarps;
  const bool has_bias = tar_has_bias(p);

  for (int64_t w = blockIdx.x; w < p.batch * p.heads * num_row_blocks; w += gridDim.x) {
    const int64_t bh = w / num_row_blocks, rb = w % num_row_blocks;
    const auto [qb, kb, vb, gb] = backward_slice(p, g, q, k, v, grad_out, bh);
    T* dqb = slice_base(dq, g.dq, p, bh);
    const int64_t i = rb * kWarps + warp;
    const bool row_valid = i < p.len_q;
    load_row<T, DPL>(q_rows[warp], qb, p.q.frame, p.q.dim, i, row_valid, p.head_dim, lane);
    load_row<T, DPL>(do_rows[warp], gb, g.grad_out.frame, g.grad_out.dim, i, row_valid, p.head_dim, lane);
    __syncwarp();

    // the forward, recomputed with the forward's own passes
    const int64_t h = bh % p.heads;
    const RowFrame row_pos = row_position(p, i);
    float row_max = -INFINITY;
    float coeff = has_bias ? tar_bias_coeff(p, 0.f, kLog2e) : 0.f;
    if (kRelative && has_bias) {
      row_max = unbiased_row_max<T, DPL>(p, q_rows[warp], k_tile, kb, lane, row_pos, h);
      coeff = tar_bias_coeff(p, row_max, kLog2e);
    }
    float m, l, acc[DPL];
    online_row_softmax<T, DPL>(p, q_rows[warp], k_tile, v_tile, kb, vb, lane, i, h, coeff, has_bias, m, l, acc);
    const bool kept_any = l > 0.f;  // false only for a profiled row with no kept key: every gradient 0
    const float lse = kept_any ? m + log2f(l) : -INFINITY;
    float delta = 0.f;
#pragma unroll
    for (int s = 0; s < DPL; ++s) delta = fmaf(do_rows[warp][lane + 32 * s], kept_any ? acc[s] / l : 0.f, delta);
    delta = warp_sum(delta);

    // dS' per key, its coupling to the row max, and dQ
    float coupling = 0.f, ties = 0.f, dq_acc[DPL], tie_acc[DPL];
#pragma unroll
    for (int s = 0; s < DPL; ++s) dq_acc[s] = tie_acc[s] = 0.f;
    for (int64_t j0 = 0; j0 < p.len_k; j0 += S::kTileN) {
      load_tile_pair<T, DPL>(k_tile, kb, p.k, v_tile, vb, p.v, j0, p.len_k, p.head_dim);
      const int64_t j = j0 + lane;
      const bool valid = lane < S::kTileN && j < p.len_k;
      float ds = 0.f;
      bool tie = false;
      if (valid) {
        const float t = lane_logit<DPL>(q_rows[warp], k_tile, lane, true, qk_log2_scale, p.head_dim);
        const ProfilePair pr = p.profile.on ? profile_at(p, row_pos, h, j) : ProfilePair{true, 1.f, 0.f};
        const float tp = p.profile.on ? profile_logit(pr, t) : t;
        const float tb = has_bias ? biased_logit(p, tp, coeff, row_pos, j) : tp;
        const float pj = tb == -INFINITY ? 0.f : exp2f(tb - lse);  // a masked pair (lse may be -inf too)
        const float dp = row_dot(do_rows[warp], v_tile + lane * S::kKStride, p.head_dim);
        ds = pj * (dp - delta);
        if (kRelative) {
          coupling = fmaf(ds, gaussian_at(p, row_pos, j), coupling);
          tie = t == row_max && pr.kept;
          ties += tie ? 1.f : 0.f;
        }
        if (p.profile.on && t > 0.f) ds *= pr.scale;  // dS = dS' * scale where S > 0 (the coupling takes dS')
      }
      const int n = static_cast<int>(p.len_k - j0 < S::kTileN ? p.len_k - j0 : S::kTileN);
      for (int jj = 0; jj < n; ++jj) {
        const float dsb = __shfl_sync(kFullMask, ds, jj);
        const bool tieb = __shfl_sync(kFullMask, static_cast<int>(tie), jj) != 0;
#pragma unroll
        for (int s = 0; s < DPL; ++s) {
          const float kc = k_tile[jj * S::kKStride + lane + 32 * s];
          dq_acc[s] = fmaf(dsb, kc, dq_acc[s]);
          if (kRelative && tieb) tie_acc[s] += kc;
        }
      }
    }
    float share = 0.f;
    if (kRelative) share = tar_bias_coeff_slope(p, row_max, kLog2e) * warp_sum(coupling) / fmaxf(warp_sum(ties), 1.f);

    if (row_valid) {
#pragma unroll
      for (int s = 0; s < DPL; ++s) {
        const int c = lane + 32 * s;
        if (c < p.head_dim) dqb[i * g.dq.frame + c * g.dq.dim] = from_float<T>(p.scale * fmaf(share, tie_acc[s], dq_acc[s]));
      }
      if (lane == 0) {
        const int64_t row = bh * p.len_q + i;
        stat_plane(stats, 0, p)[row] = row_max;
        stat_plane(stats, 1, p)[row] = lse;
        stat_plane(stats, 2, p)[row] = delta;
        stat_plane(stats, 3, p)[row] = share;
      }
    }
    __syncwarp();
  }
}

template <typename T, int DPL, bool kRelative>
__global__ void __launch_bounds__(kThreads, 4)
    tar_bwd_key_kernel(TARParams p, TARGradStrides g, const T* __restrict__ grad_out, const T* __restrict__ q,
                       const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ dk, T* __restrict__ dv,
                       const float* __restrict__ stats) {
  using S = TileShape<DPL>;
  __shared__ float q_tile[S::kTileN * S::kKStride];
  __shared__ float do_tile[S::kTileN * S::kKStride];
  __shared__ float k_rows[kWarps][S::kDim];
  __shared__ float v_rows[kWarps][S::kDim];
  __shared__ RowStats tile_stats[S::kTileN];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float qk_log2_scale = p.scale * kLog2e;
  const int64_t num_col_blocks = (p.len_k + kWarps - 1) / kWarps;
  const bool has_bias = tar_has_bias(p);
  float* const planes = const_cast<float*>(stats);

  for (int64_t w = blockIdx.x; w < p.batch * p.heads * num_col_blocks; w += gridDim.x) {
    const int64_t bh = w / num_col_blocks, cb = w % num_col_blocks;
    const auto [qb, kb, vb, gb] = backward_slice(p, g, q, k, v, grad_out, bh);
    T* dkb = slice_base(dk, g.dk, p, bh);
    T* dvb = slice_base(dv, g.dv, p, bh);
    const int64_t j = cb * kWarps + warp;
    const bool col_valid = j < p.len_k;
    load_row<T, DPL>(k_rows[warp], kb, p.k.frame, p.k.dim, j, col_valid, p.head_dim, lane);
    load_row<T, DPL>(v_rows[warp], vb, p.v.frame, p.v.dim, j, col_valid, p.head_dim, lane);
    __syncwarp();
    float dk_acc[DPL], dv_acc[DPL];
#pragma unroll
    for (int s = 0; s < DPL; ++s) dk_acc[s] = dv_acc[s] = 0.f;

    for (int64_t i0 = 0; i0 < p.len_q; i0 += S::kTileN) {
      load_tile_pair<T, DPL>(q_tile, qb, p.q, do_tile, gb, g.grad_out, i0, p.len_q, p.head_dim);
      if (threadIdx.x < S::kTileN && i0 + threadIdx.x < p.len_q) {
        const int64_t row = bh * p.len_q + i0 + threadIdx.x;
        tile_stats[threadIdx.x] = {stat_plane(planes, 0, p)[row], stat_plane(planes, 1, p)[row],
                                   stat_plane(planes, 2, p)[row], stat_plane(planes, 3, p)[row]};
      }
      __syncthreads();
      const int64_t i = i0 + lane;
      const bool valid = col_valid && lane < S::kTileN && i < p.len_q;
      float pij = 0.f, ds = 0.f;
      if (valid) {
        const RowStats st = tile_stats[lane];
        const RowFrame row_pos = row_position(p, i);
        const float t = row_dot(q_tile + lane * S::kKStride, k_rows[warp], p.head_dim) * qk_log2_scale;
        const ProfilePair pr =
            p.profile.on ? profile_at(p, row_pos, bh % p.heads, j) : ProfilePair{true, 1.f, 0.f};
        const float tp = p.profile.on ? profile_logit(pr, t) : t;
        const float coeff = has_bias ? tar_bias_coeff(p, st.row_max, kLog2e) : 0.f;
        const float tb = has_bias ? biased_logit(p, tp, coeff, row_pos, j) : tp;
        pij = tb == -INFINITY ? 0.f : exp2f(tb - st.lse);  // a masked pair (lse may be -inf too)
        const float dp = row_dot(do_tile + lane * S::kKStride, v_rows[warp], p.head_dim);
        ds = pij * (dp - st.delta);
        if (p.profile.on && t > 0.f) ds *= pr.scale;  // dS = dS' * scale where S > 0
        if (kRelative && t == st.row_max && pr.kept) ds += st.share;
      }
      const int n = static_cast<int>(p.len_q - i0 < S::kTileN ? p.len_q - i0 : S::kTileN);
      for (int ii = 0; ii < n; ++ii) {
        const float pb = __shfl_sync(kFullMask, pij, ii);
        const float dsb = __shfl_sync(kFullMask, ds, ii);
#pragma unroll
        for (int s = 0; s < DPL; ++s) {
          dv_acc[s] = fmaf(pb, do_tile[ii * S::kKStride + lane + 32 * s], dv_acc[s]);
          dk_acc[s] = fmaf(dsb, q_tile[ii * S::kKStride + lane + 32 * s], dk_acc[s]);
        }
      }
    }
    if (col_valid) {
#pragma unroll
      for (int s = 0; s < DPL; ++s) {
        const int c = lane + 32 * s;
        if (c < p.head_dim) {
          dkb[j * g.dk.frame + c * g.dk.dim] = from_float<T>(dk_acc[s] * p.scale);
          dvb[j * g.dv.frame + c * g.dv.dim] = from_float<T>(dv_acc[s]);
        }
      }
    }
    __syncwarp();
  }
}

// ----------------------------------------------------------------------------------------------------- launch
template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}, std::integral_constant<int, DPL>{}) for the element type and head_dim bucket of a call.
template <typename F>
cudaError_t dispatch(DType dtype, int64_t head_dim, F&& f) {
  auto by_dim = [&](auto tag) {
    if (head_dim <= 32) return f(tag, std::integral_constant<int, 1>{});
    if (head_dim <= 64) return f(tag, std::integral_constant<int, 2>{});
    if (head_dim <= 128) return f(tag, std::integral_constant<int, 4>{});
    return f(tag, std::integral_constant<int, 8>{});
  };
  switch (dtype) {
    case DType::kFloat32: return by_dim(TypeTag<float>{});
    case DType::kFloat16: return by_dim(TypeTag<__half>{});
    case DType::kBFloat16: return by_dim(TypeTag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

// Grid: one axis of batch * heads * ceil(rows / kWarps) work items, slice-major; grid-strided beyond 2^31 - 1.
dim3 grid_for(const TARParams& p, int64_t rows) {
  const int64_t items = p.batch * p.heads * ((rows + kWarps - 1) / kWarps);
  return dim3(static_cast<unsigned>(items < INT32_MAX ? items : INT32_MAX));
}

// The limits of tar_attention.h: frame distances offset_delta + fi - fj and the layout's token indices (starts
// down to -tokens_per_frame) must fit int32.
bool launchable(const TARParams& p) {
  const auto in_range = [](int64_t x) { return x >= -kMaxCudaFrames && x <= kMaxCudaFrames; };
  return p.head_dim >= 1 && p.head_dim <= kMaxCudaHeadDim && p.len_q <= kMaxCudaFrames && p.len_k <= kMaxCudaFrames &&
         p.offset_delta >= -kMaxCudaOffsetDelta && p.offset_delta <= kMaxCudaOffsetDelta &&
         (!p.framed || (in_range(p.tokens_per_frame) && in_range(p.video_start_q) && in_range(p.video_start_k) &&
                        in_range(p.video_end_q) && in_range(p.video_end_k)));
}

}  // namespace

int tar_attention_cuda_launch(const TARParams& p, DType dtype, const void* q, const void* k, const void* v, void* o,
                              void* stream) {
  if (!launchable(p)) return static_cast<int>(cudaErrorInvalidConfiguration);
  if (p.batch * p.heads * p.len_q == 0) return 0;
  auto* s = static_cast<cudaStream_t>(stream);
  const bool relative = p.relative && tar_has_bias(p);
  return static_cast<int>(dispatch(dtype, p.head_dim, [&](auto tag, auto dpl) {
    using T = typename decltype(tag)::type;
    constexpr int DPL = decltype(dpl)::value;
    const auto* qt = static_cast<const T*>(q);
    const auto* kt = static_cast<const T*>(k);
    const auto* vt = static_cast<const T*>(v);
    const dim3 grid = grid_for(p, p.len_q);
    if (relative)
      tar_attention_kernel<T, DPL, true><<<grid, kThreads, 0, s>>>(p, qt, kt, vt, static_cast<T*>(o));
    else
      tar_attention_kernel<T, DPL, false><<<grid, kThreads, 0, s>>>(p, qt, kt, vt, static_cast<T*>(o));
    return cudaGetLastError();
  }));
}

int tar_attention_backward_cuda_launch(const TARParams& p, const TARGradStrides& g, DType dtype, const void* grad_out,
                                       const void* q, const void* k, const void* v, void* dq, void* dk, void* dv,
                                       float* workspace, void* stream) {
  if (!launchable(p)) return static_cast<int>(cudaErrorInvalidConfiguration);
  if (p.batch * p.heads * p.len_q * p.len_k == 0) return 0;  // the caller zero-fills
  auto* s = static_cast<cudaStream_t>(stream);
  const bool relative = p.relative && tar_has_bias(p);
  return static_cast<int>(dispatch(dtype, p.head_dim, [&](auto tag, auto dpl) {
    using T = typename decltype(tag)::type;
    constexpr int DPL = decltype(dpl)::value;
    const auto* go = static_cast<const T*>(grad_out);
    const auto* qt = static_cast<const T*>(q);
    const auto* kt = static_cast<const T*>(k);
    const auto* vt = static_cast<const T*>(v);
    const dim3 rows = grid_for(p, p.len_q), cols = grid_for(p, p.len_k);
    if (relative) {
      tar_bwd_query_kernel<T, DPL, true><<<rows, kThreads, 0, s>>>(p, g, go, qt, kt, vt, static_cast<T*>(dq), workspace);
      tar_bwd_key_kernel<T, DPL, true><<<cols, kThreads, 0, s>>>(p, g, go, qt, kt, vt, static_cast<T*>(dk),
                                                                 static_cast<T*>(dv), workspace);
    } else {
      tar_bwd_query_kernel<T, DPL, false><<<rows, kThreads, 0, s>>>(p, g, go, qt, kt, vt, static_cast<T*>(dq), workspace);
      tar_bwd_key_kernel<T, DPL, false><<<cols, kThreads, 0, s>>>(p, g, go, qt, kt, vt, static_cast<T*>(dk),
                                                                  static_cast<T*>(dv), workspace);
    }
    return cudaGetLastError();
  }));
}

}  // namespace vstar
