// vstar-kernels: the CUDA fallback of TAR temporal attention, for GPUs where Triton is unavailable.
//
// No ATen here: raw pointers, element strides, the caller's stream. Grid: x = batch * heads (up to 2^31 - 1),
// y = blocks of kWarps query frames (grid-strided, so any frame count). One warp owns one query row:
//   logits   lane j of the warp computes <q, k_j> for key j of a shared-memory tile (kTileN keys, fp32);
//   softmax  online, in the exp2 domain (logits scaled by scale * log2 e);
//   P V      lane c owns channels c, c + 32, ... of the output row.
// Relative mode first sweeps K for the unbiased row max (tar_bias_coeff needs it), then runs the online softmax.
// The Gaussian and the bias come from tar_attention.h, the one C++ definition. Correctness first: no tensor cores.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

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

// Logit (exp2 domain) of this lane's key in the current tile; -inf past the end of the row.
template <int DPL>
__device__ __forceinline__ float lane_logit(const float* q_row, const float* k_tile, int lane, bool valid,
                                            float qk_log2_scale, int64_t head_dim) {
  using S = TileShape<DPL>;
  if (!valid) return -INFINITY;
  const float* k_row = k_tile + lane * S::kKStride;
  float dot = 0.f;
  for (int c = 0; c < head_dim; ++c) dot = fmaf(q_row[c], k_row[c], dot);
  return dot * qk_log2_scale;
}

// At least 4 resident blocks per SM caps registers at 128; without the bound ptxas spilled a few bytes in the
// small head-dim variants (found by `python -m vstar_kernels.nvcc_check`).
template <typename T, int DPL, bool kRelative>
__global__ void __launch_bounds__(kThreads, 4)
    tar_attention_kernel(TARParams p, const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                         T* __restrict__ o) {
  using S = TileShape<DPL>;
  __shared__ float k_tile[S::kTileN * S::kKStride];
  __shared__ float v_tile[S::kTileN * S::kDim];
  __shared__ float q_rows[kWarps][S::kDim];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.x, b = bh / p.heads, h = bh % p.heads;
  const T* qb = q + b * p.q.batch + h * p.q.head;
  const T* kb = k + b * p.k.batch + h * p.k.head;
  const T* vb = v + b * p.v.batch + h * p.v.head;
  T* ob = o + b * p.o.batch + h * p.o.head;
  const float qk_log2_scale = p.scale * kLog2e;
  const int64_t num_row_blocks = (p.len_q + kWarps - 1) / kWarps;
  const bool has_bias = tar_has_bias(p);

  for (int64_t rb = blockIdx.y; rb < num_row_blocks; rb += gridDim.y) {
    const int64_t i = rb * kWarps + warp;
    const bool row_valid = i < p.len_q;
    for (int c = lane; c < S::kDim; c += 32)
      q_rows[warp][c] = (row_valid && c < p.head_dim) ? to_float(qb[i * p.q.frame + c * p.q.dim]) : 0.f;
    __syncwarp();

    float coeff = has_bias ? tar_bias_coeff(p, 0.f, kLog2e) : 0.f;  // absolute: fixed
    if (kRelative && has_bias) {  // pass 1: the unbiased row max
      float row_max = -INFINITY;
      for (int64_t j0 = 0; j0 < p.len_k; j0 += S::kTileN) {
        __syncthreads();
        load_tile<T, DPL>(k_tile, S::kKStride, kb, p.k.frame, p.k.dim, j0, p.len_k, p.head_dim);
        __syncthreads();
        const bool valid = lane < S::kTileN && j0 + lane < p.len_k;
        row_max = fmaxf(row_max, lane_logit<DPL>(q_rows[warp], k_tile, lane, valid, qk_log2_scale, p.head_dim));
      }
      coeff = tar_bias_coeff(p, warp_max(row_max), kLog2e);
    }

    // pass 2: online softmax of the biased logits, accumulating P V
    float m = -INFINITY, l = 0.f, acc[DPL];
#pragma unroll
    for (int s = 0; s < DPL; ++s) acc[s] = 0.f;
    const double row_dist = p.offset_delta + static_cast<double>(i);
    for (int64_t j0 = 0; j0 < p.len_k; j0 += S::kTileN) {
      __syncthreads();
      load_tile<T, DPL>(k_tile, S::kKStride, kb, p.k.frame, p.k.dim, j0, p.len_k, p.head_dim);
      load_tile<T, DPL>(v_tile, S::kDim, vb, p.v.frame, p.v.dim, j0, p.len_k, p.head_dim);
      __syncthreads();
      const int64_t j = j0 + lane;
      const bool valid = lane < S::kTileN && j < p.len_k;
      float t = lane_logit<DPL>(q_rows[warp], k_tile, lane, valid, qk_log2_scale, p.head_dim);
      if (valid && has_bias) t += coeff * tar_gaussian(row_dist - static_cast<double>(j), p.gauss_log2_coeff);
      const float m_new = fmaxf(m, warp_max(t));
      const float alpha = exp2f(m - m_new);
      const float pj = valid ? exp2f(t - m_new) : 0.f;
      l = l * alpha + warp_sum(pj);
#pragma unroll
      for (int s = 0; s < DPL; ++s) acc[s] *= alpha;
      const int n = static_cast<int>(p.len_k - j0 < S::kTileN ? p.len_k - j0 : S::kTileN);
      for (int jj = 0; jj < n; ++jj) {
        const float pb = __shfl_sync(kFullMask, pj, jj);
#pragma unroll
        for (int s = 0; s < DPL; ++s) acc[s] = fmaf(pb, v_tile[jj * S::kDim + lane + 32 * s], acc[s]);
      }
      m = m_new;
    }

    if (row_valid) {
      const float inv_l = 1.f / l;
#pragma unroll
      for (int s = 0; s < DPL; ++s) {
        const int c = lane + 32 * s;
        if (c < p.head_dim) ob[i * p.o.frame + c * p.o.dim] = from_float<T>(acc[s] * inv_l);
      }
    }
    __syncwarp();
  }
}

template <typename T, int DPL>
cudaError_t launch_typed(const TARParams& p, const void* q, const void* k, const void* v, void* o,
                         cudaStream_t stream) {
  const int64_t row_blocks = (p.len_q + kWarps - 1) / kWarps;
  const dim3 grid(static_cast<unsigned>(p.batch * p.heads), static_cast<unsigned>(row_blocks < 65535 ? row_blocks : 65535));
  const auto* qt = static_cast<const T*>(q);
  const auto* kt = static_cast<const T*>(k);
  const auto* vt = static_cast<const T*>(v);
  auto* ot = static_cast<T*>(o);
  if (p.relative && tar_has_bias(p))
    tar_attention_kernel<T, DPL, true><<<grid, kThreads, 0, stream>>>(p, qt, kt, vt, ot);
  else
    tar_attention_kernel<T, DPL, false><<<grid, kThreads, 0, stream>>>(p, qt, kt, vt, ot);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_dim(const TARParams& p, const void* q, const void* k, const void* v, void* o, cudaStream_t s) {
  if (p.head_dim <= 32) return launch_typed<T, 1>(p, q, k, v, o, s);
  if (p.head_dim <= 64) return launch_typed<T, 2>(p, q, k, v, o, s);
  if (p.head_dim <= 128) return launch_typed<T, 4>(p, q, k, v, o, s);
  return launch_typed<T, 8>(p, q, k, v, o, s);
}

}  // namespace

int tar_attention_cuda_launch(const TARParams& p, DType dtype, const void* q, const void* k, const void* v, void* o,
                              void* stream) {
  if (p.head_dim < 1 || p.head_dim > kMaxCudaHeadDim || p.batch * p.heads > INT32_MAX)
    return static_cast<int>(cudaErrorInvalidConfiguration);
  if (p.batch * p.heads * p.len_q == 0) return 0;
  auto* s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32: return static_cast<int>(launch_dim<float>(p, q, k, v, o, s));
    case DType::kFloat16: return static_cast<int>(launch_dim<__half>(p, q, k, v, o, s));
    case DType::kBFloat16: return static_cast<int>(launch_dim<__nv_bfloat16>(p, q, k, v, o, s));
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace vstar
