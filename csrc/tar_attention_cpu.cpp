// vstar-kernels: fused TAR temporal attention on the CPU.
//
// One task is a block of up to BM query frames of one (batch, head). Per task, in fp32:
//   pack   K^T (d x Lk) and V (Lk x d) of the (batch, head) once per run of tasks sharing it, the query block
//          scaled by `scale`; bf16/fp16 are widened here and nowhere else;
//   S      = Q_blk K^T with a 6x16 register-blocked FMA micro-kernel (at::vec);
//   rows   unbiased row max (relative mode, unless the call gives the row max: then none) -> bias from the
//          Gaussian row (tar_attention.h) -> max of the biased row -> exp -> sum, fused per row while it sits in L1;
//          the log-sum-exp max + log(sum) when the call asks for it;
//   out    = P V with the same micro-kernel shape, scaled by 1 / rowsum and written in the input dtype.
// The only score buffer is one BM x Lk strip per thread; no Lq x Lk tensor exists. The Gaussian is a table over
// the frame distances, computed once per call with tar_gaussian() (GaussianRows).
// A frame-distance profile (p.profile.on) adds, per row, its scale and bias rows (ProfileRows: tar_profile_pair of
// every key, -inf bias where the pair is masked): the relative row max runs over the kept keys, the logits become
// tar_profile_logit() + coeff G, and a row with no kept key gets output 0 and lse -inf. Without one, the code path
// is the plain kernel's.
#include "tar_attention_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include "cpu_gemm.h"
#include "cpu_tiles.h"

namespace vstar {
namespace {

using namespace cpu;  // NOLINT: the tiles of this kernel family

// The native engine's operands of one (batch b, head h) slice (cpu_gemm.h): K^T (d_e x cols) and V (rows x
// d16) in the input dtype, zero past `keys` and in the padding, packed for oneDNN when the plan packs.
template <typename op_t>
struct NativeKeys {
  NativeB<op_t> kt, v;
};

template <typename op_t>
NativeKeys<op_t> pack_native_keys(const TARParams& p, const op_t* k, const op_t* v, int64_t b, int64_t h,
                                  int64_t keys, int64_t d_e, int64_t cols, int64_t d16, int64_t rows, bool packed,
                                  op_t* kt, op_t* vr, op_t* kt_packed, op_t* v_packed) {
  std::fill(kt, kt + d_e * cols, op_t(0.f));
  std::fill(vr, vr + rows * d16, op_t(0.f));
  const op_t* kb = k + b * p.k.batch + h * p.k.head;
  const op_t* vb = v + b * p.v.batch + h * p.v.head;
  for (int64_t j = 0; j < keys; ++j)
    for (int64_t c = 0; c < p.head_dim; ++c) {
      kt[c * cols + j] = kb[j * p.k.frame + c * p.k.dim];
      vr[j * d16 + c] = vb[j * p.v.frame + c * p.v.dim];
    }
  return {pack_native_b(kt, cols, d_e, cols, packed, kt_packed), pack_native_b(vr, d16, rows, d16, packed, v_packed)};
}

// The forward of the whole-row kernel. op_t is the products' operand type: float (brgemm_f32 and the micro-kernel;
// bf16/fp16 widened while packing) or scalar_t itself (brgemm_native: Q, K^T, V and P in the input dtype, fp32
// accumulation; S scaled in fp32 after the product, P rounded to the dtype before P V, as SDPA does).
template <typename scalar_t, typename op_t>
void whole_row_forward(const TARParams& p, const GemmPlan plan, const scalar_t* q, const scalar_t* k,
                       const scalar_t* v, scalar_t* o) {
  constexpr bool native = !std::is_same_v<op_t, float>;
  const int64_t lq = p.len_q, lk = p.len_k, d = p.head_dim;
  const int64_t lk_pad = round_up(lk, native ? std::max(kVec, kPackAlign) : kVec), d_pad = round_up(d, kVec);
  const int64_t ld_k = skewed_stride(lk_pad), ld_v = skewed_stride(round_up(d, native ? kPackAlign : kVec));
  const int64_t block_m = std::clamp<int64_t>(kStripFloats / lk_pad / kRows * kRows, kRows, 64);
  const int64_t bm = std::min(block_m, lq);
  const int64_t num_qb = (lq + bm - 1) / bm;
  const bool has_bias = tar_has_bias(p);
  // the native engine's sizes: the reduction dims even (VNNI pairs), B's columns by kPackAlign
  const int64_t d_e = round_up(d, 2), lk_e = round_up(lk, 2), d16 = round_up(d, kPackAlign);

  const GaussianRows gauss(p, has_bias ? lk_pad : 0);
  const bool profiled = p.profile.on;  // a frame-distance profile: its tables and masks per row (ProfileRows)
  const ProfileRows profile(p, profiled ? lk_pad : 0);

  at::parallel_for(0, p.batch * p.heads * num_qb, 1, [&](int64_t begin, int64_t end) {
    const int64_t fp32_operands = native ? 0 : d * ld_k + lk * ld_v + bm * d;
    std::unique_ptr<float[]> scratch(new float[fp32_operands + bm * ld_k + bm * ld_v + lk_pad +
                                               (profiled ? 2 * lk_pad : 0)]);
    float* kt = scratch.get();     // d x lk_pad, row stride ld_k (fp32 operands)
    float* vp = kt + d * ld_k;     // lk x d_pad, row stride ld_v
    float* qp = vp + lk * ld_v;    // bm x d
    float* s = scratch.get() + fp32_operands;  // bm x lk_pad, row stride ld_k
    float* acc = s + bm * ld_k;    // bm x d_pad, row stride ld_v
    float* band = acc + bm * ld_v;  // lk_pad: the band row of a framed layout
    float* pscale = band + lk_pad;  // lk_pad each: the profile's scale and bias rows (profiled calls only)
    float* pbias = pscale + lk_pad;
    // native operands: K^T, V (and their packed copies), the query block and P in the input dtype
    const int64_t native_elems = native ? 2 * (d_e * lk_pad + lk_e * d16) + bm * d_e + bm * lk_pad : 0;
    std::unique_ptr<op_t[]> native_scratch(new op_t[native_elems]);
    op_t* nkt = native_scratch.get();
    op_t* nv = nkt + d_e * lk_pad;
    op_t* nkt_packed = nv + lk_e * d16;
    op_t* nv_packed = nkt_packed + d_e * lk_pad;
    op_t* nq = nv_packed + lk_e * d16;
    op_t* np = nq + bm * d_e;
    NativeKeys<op_t> keys_view{};
    int64_t packed_bh = -1, band_frame = GaussianRows::kNoRow;
    int64_t profile_row[2] = {ProfileRows::kNoRow, -1};
    for (int64_t task = begin; task < end; ++task) {
      QueryTask t;
      if constexpr (native) {
        t = task_at(p, task, num_qb, bm);
        if (t.slice != packed_bh) {
          keys_view = pack_native_keys(p, k, v, t.b, t.h, tar_key_count(p, t.b), d_e, lk_pad, d16, lk_e,
                                       plan.packed, nkt, nv, nkt_packed, nv_packed);
          packed_bh = t.slice;
        }
        copy_query_block(p, q, t, nq, d_e);
      } else {
        t = begin_task(p, q, k, v, task, num_qb, bm, packed_bh, kt, ld_k, vp, ld_v, qp);
      }
      const auto [slice, b, h, m0, mb] = t;
      const int64_t keys = tar_key_count(p, b);  // the keys past it: -inf logits, never read by P V

      if constexpr (native) {  // natural-unit logits: the product, then the scale in fp32
        gemm_native(nq, d_e, keys_view.kt, s, ld_k, mb, d_e, false);
        for (int64_t r = 0; r < mb; ++r) scale_row(s + r * ld_k, p.scale, lk_pad);
      } else {
        gemm_f32(plan, qp, d, kt, ld_k, s, ld_k, mb, d, lk_pad, false);  // natural-unit logits
      }
      float inv_sum[64];
      for (int64_t r = 0; r < mb; ++r) {
        float* row = s + r * ld_k;
        std::fill(row + keys, row + lk_pad, -std::numeric_limits<float>::infinity());
        const float* gauss_row = has_bias ? gauss.row(p, m0 + r, band, band_frame) : nullptr;
        float max;
        if (profiled) {  // S' = profile logit (kept keys; -inf masked) + coeff G, the row max over the kept keys
          profile.row(p, m0 + r, h, pscale, pbias, profile_row);
          float coeff = 0.f;
          if (has_bias) {
            const float peak = !p.relative            ? 0.f
                               : p.row_max != nullptr ? p.row_max[tar_row_offset(p.row_max_s, b, m0 + r, h)]
                                                      : kept_row_max(row, pbias, lk_pad);
            coeff = tar_bias_coeff(p, peak, 1.f);
          }
          apply_profile(row, pscale, pbias, lk_pad);
          max = has_bias ? add_bias_max(row, gauss_row, coeff, lk_pad) : row_max(row, lk_pad);
          if (max == kMinusInf) {  // no kept key: output 0, lse -inf
            std::fill(row, row + lk_pad, 0.f);
            inv_sum[r] = 0.f;
            if (p.lse != nullptr) p.lse[tar_row_offset(p.lse_s, b, m0 + r, h)] = kMinusInf;
            continue;
          }
        } else if (!has_bias) {
          max = row_max(row, lk_pad);
        } else if (p.relative) {  // the bias needs the unbiased row max first: the given one, or the row's own
          const float peak = p.row_max != nullptr ? p.row_max[tar_row_offset(p.row_max_s, b, m0 + r, h)]
                                                  : row_max(row, lk_pad);
          max = add_bias_max(row, gauss_row, tar_bias_coeff(p, peak, 1.f), lk_pad);
        } else {
          max = add_bias_max(row, gauss_row, tar_bias_coeff(p, 0.f, 1.f), lk_pad);
        }
        const float sum = exp_sum(row, max, lk_pad);
        inv_sum[r] = 1.f / sum;
        if (p.lse != nullptr) p.lse[tar_row_offset(p.lse_s, b, m0 + r, h)] = max + std::log(sum);
      }

      if constexpr (native) {  // P rounded to the dtype, zero past the keys (the reduction padded to even)
        const int64_t keys_e = round_up(keys, 2);
        for (int64_t r = 0; r < mb; ++r) {
          at::vec::convert(s + r * ld_k, np + r * lk_pad, keys);
          std::fill(np + r * lk_pad + keys, np + r * lk_pad + keys_e, op_t(0.f));
        }
        gemm_native(np, lk_pad, keys_view.v, acc, ld_v, mb, keys_e, false);
      } else {
        gemm_f32(plan, s, ld_k, vp, ld_v, acc, ld_v, mb, keys, d_pad, false);
      }
      scalar_t* orow = o + b * p.o.batch + h * p.o.head + m0 * p.o.frame;
      for (int64_t r = 0; r < mb; ++r) store_row(acc + r * ld_v, d, inv_sum[r], orow + r * p.o.frame, p.o.dim);
    }
    release_engine(plan);
  });
}

template <typename scalar_t>
void tar_attention_cpu_impl(const TARParams& p, const scalar_t* q, const scalar_t* k, const scalar_t* v,
                            scalar_t* o) {
  with_operand_type<scalar_t>([&](const GemmPlan& plan, auto op) {
    whole_row_forward<scalar_t, decltype(op)>(p, plan, q, k, v, o);
  });
}


// The backward, per (batch, head) task (so dK and dV are summed without races), query blocks of up to bm rows:
//   S  = (scale Q) K^T            recomputed (fp32 operands: as the fp32 forward computes it, so its row max and ties
//                                 are the forward's; native operands: Q K^T in the dtype, then scaled in fp32)
//   P  = softmax(S + coeff G)     coeff = strength * rowmax(S) (relative) or strength (absolute)
//   dP = dO V^T,  dS' = P (dP - rowsum(P dP))
//   dS = dS' + strength * [S = rowmax] / #ties * rowsum(dS' G)        (relative: the row max's gradient)
//   with a profile: the forward's profile logits; dS = dS' * (S > 0 ? scale : 1) for kept pairs, 0 for masked ones,
//   the row max and its ties over the kept keys (reference.profile_bias_backward)
//   dQ = scale dS K,  dK += dS^T (scale Q),  dV += P^T dO
// Buffers per thread: packed K^T, V^T, K, the block's Q and dO, three bm x Lk strips and dK, dV accumulators.
// op_t as in the forward: float (brgemm_f32, micro-kernel) or scalar_t (brgemm_native: the five products on the
// dtype's operands, dS and P rounded to it, as SDPA's backward multiplies; accumulation, softmax and ties in fp32).
constexpr int64_t kLongRowBlockKeys = 1024;  // rows of this many keys take kLongRowBlockM query rows per block
constexpr int64_t kLongRowBlockM = 64;

template <typename scalar_t, typename op_t>
void whole_row_backward(const TARParams& p, const GemmPlan plan, const TensorStrides& go_strides, const scalar_t* go,
                        const scalar_t* q, const scalar_t* k, const scalar_t* v, scalar_t* dq, scalar_t* dk,
                        scalar_t* dv, const TensorStrides& dq_s, const TensorStrides& dk_s,
                        const TensorStrides& dv_s) {
  constexpr bool native = !std::is_same_v<op_t, float>;
  const int64_t lq = p.len_q, lk = p.len_k, d = p.head_dim;
  const int64_t align = native ? std::max(kVec, kPackAlign) : kVec;
  const int64_t lk_pad = round_up(lk, align), d_pad = round_up(d, align);
  const int64_t ld_k = skewed_stride(lk_pad), ld_d = skewed_stride(d_pad);
  // query rows per block: a 128 KiB strip for short rows; 64 rows for long ones (a transformer's 3D attention), whose
  // dK and dV accumulators (Lk x d) are read and written once per block: with the 128 KiB strip's 6 rows, DiT rows of
  // 8192 tokens ran forward+backward at 1.81x SDPA, with 64 rows at 0.74x (AMD EPYC, AVX-512, fp32)
  const int64_t bm = std::min<int64_t>(
      lk >= kLongRowBlockKeys ? kLongRowBlockM : std::clamp<int64_t>(kStripFloats / lk_pad / kRows * kRows, kRows, 64),
      lq);
  const int64_t d_e = round_up(d, 2), lk_e = round_up(lk, 2), bm_e = round_up(bm, 2);
  const bool has_bias = tar_has_bias(p);
  const GaussianRows gauss(p, has_bias ? lk_pad : 0);
  const float minus_inf = -std::numeric_limits<float>::infinity();
  const bool profiled = p.profile.on;
  const ProfileRows profile(p, profiled ? lk_pad : 0);

  at::parallel_for(0, p.batch * p.heads, 1, [&](int64_t begin, int64_t end) {
    const int64_t floats = 2 * d * ld_k + lk * ld_d + 2 * bm * ld_d + 3 * bm * ld_k + lk * bm + 2 * lk * ld_d +
                           bm * ld_d + lk_pad + (profiled ? 2 * lk_pad : 0);
    std::unique_ptr<float[]> scratch(new float[floats]);
    float* kt = scratch.get();      // d x lk_pad: K^T
    float* vt = kt + d * ld_k;      // d x lk_pad: V^T
    float* kp = vt + d * ld_k;      // lk x d_pad: K
    float* qp = kp + lk * ld_d;     // bm x d_pad: scale * Q of the block
    float* dop = qp + bm * ld_d;    // bm x d_pad: dO of the block
    float* s = dop + bm * ld_d;     // bm x lk_pad: S, then P
    float* s0 = s + bm * ld_k;      // bm x lk_pad: unbiased S (relative mode)
    float* ds = s0 + bm * ld_k;     // bm x lk_pad: dP, then dS
    float* tr = ds + bm * ld_k;     // lk x bm: a transposed strip
    float* dk_acc = tr + lk * bm;   // lk x d_pad
    float* dv_acc = dk_acc + lk * ld_d;
    float* dq_acc = dv_acc + lk * ld_d;  // bm x d_pad
    float* band = dq_acc + bm * ld_d;    // lk_pad: the band row of a framed layout
    float* pscale = band + lk_pad;       // lk_pad each: the profile's scale and bias rows (profiled calls only)
    float* pbias = pscale + lk_pad;
    int64_t band_frame = GaussianRows::kNoRow;
    int64_t profile_row[2] = {ProfileRows::kNoRow, -1};
    // native operands (row-major, then packed for oneDNN when the plan packs): K^T, V^T (d_e x lk_pad) and K
    // (lk_e x d_pad) per slice; the block's Q and dO (bm_e x d_pad, also the A of S and dP); dS (bm x lk_pad);
    // dS^T and P^T (lk x bm_e)
    const int64_t slice_elems = 2 * d_e * lk_pad + lk_e * d_pad, block_elems = 2 * bm_e * d_pad;
    std::unique_ptr<op_t[]> native_scratch(new op_t[native ? 2 * (slice_elems + block_elems) + bm * lk_pad +
                                                                 2 * lk * bm_e : 0]);
    op_t* nkt = native_scratch.get();
    op_t* nvt = nkt + d_e * lk_pad;
    op_t* nk = nvt + d_e * lk_pad;
    op_t* nq = nk + lk_e * d_pad;
    op_t* ndo = nq + bm_e * d_pad;
    op_t* packed_slice = ndo + bm_e * d_pad;  // the packed copies of the five B operands
    op_t* packed_block = packed_slice + slice_elems;
    op_t* nds = packed_block + block_elems;
    op_t* ndst = nds + bm * lk_pad;
    op_t* npt = ndst + lk * bm_e;
    NativeB<op_t> b_kt{}, b_vt{}, b_k{};

    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / p.heads, h = bh % p.heads;
      const int64_t keys = tar_key_count(p, b);  // the keys past it: P = dS = 0, zero dK and dV rows
      const Strided<scalar_t> ks{k + b * p.k.batch + h * p.k.head, p.k.frame, p.k.dim};
      const Strided<scalar_t> vs{v + b * p.v.batch + h * p.v.head, p.v.frame, p.v.dim};
      const Strided<scalar_t> qs{q + b * p.q.batch + h * p.q.head, p.q.frame, p.q.dim};
      const Strided<scalar_t> gos{go + b * go_strides.batch + h * go_strides.head, go_strides.frame, go_strides.dim};
      std::fill(dk_acc, dk_acc + 2 * lk * ld_d, 0.f);
      if constexpr (native) {  // K^T, V^T, K in the dtype, zero past the keys and in the padding
        const op_t* kb = k + b * p.k.batch + h * p.k.head;
        const op_t* vb = v + b * p.v.batch + h * p.v.head;
        std::fill(nkt, nkt + slice_elems, op_t(0.f));
        for (int64_t j = 0; j < keys; ++j)
          for (int64_t c = 0; c < d; ++c) {
            const op_t kv = kb[j * p.k.frame + c * p.k.dim];
            nkt[c * lk_pad + j] = kv;
            nk[j * d_pad + c] = kv;
            nvt[c * lk_pad + j] = vb[j * p.v.frame + c * p.v.dim];
          }
        b_kt = pack_native_b(nkt, lk_pad, d_e, lk_pad, plan.packed, packed_slice);
        b_vt = pack_native_b(nvt, lk_pad, d_e, lk_pad, plan.packed, packed_slice + d_e * lk_pad);
        b_k = pack_native_b(nk, d_pad, lk_e, d_pad, plan.packed, packed_slice + 2 * d_e * lk_pad);
      } else {
        std::fill(kt, kt + 2 * d * ld_k + lk * ld_d, 0.f);  // kt, vt, kp with their padding
        std::fill(qp, qp + 2 * bm * ld_d, 0.f);
        for (int64_t j = 0; j < lk; ++j)
          for (int64_t c = 0; c < d; ++c) {
            const float kv = ks.at(j, c);
            kt[c * ld_k + j] = kv;
            kp[j * ld_d + c] = kv;
            vt[c * ld_k + j] = vs.at(j, c);
          }
      }
      for (int64_t m0 = 0; m0 < lq; m0 += bm) {
        const int64_t mb = std::min(bm, lq - m0);
        if constexpr (native) {  // S and dP: the dtype's products, S scaled in fp32
          std::fill(nq, nq + 2 * bm_e * d_pad, op_t(0.f));
          const op_t* qb = q + b * p.q.batch + h * p.q.head;
          const op_t* gb = go + b * go_strides.batch + h * go_strides.head;
          for (int64_t r = 0; r < mb; ++r)
            for (int64_t c = 0; c < d; ++c) {
              nq[r * d_pad + c] = qb[(m0 + r) * p.q.frame + c * p.q.dim];
              ndo[r * d_pad + c] = gb[(m0 + r) * go_strides.frame + c * go_strides.dim];
            }
          gemm_native(nq, d_pad, b_kt, s, ld_k, mb, d_e, false);
          for (int64_t r = 0; r < mb; ++r) scale_row(s + r * ld_k, p.scale, lk_pad);
          gemm_native(ndo, d_pad, b_vt, ds, ld_k, mb, d_e, false);
        } else {
          for (int64_t r = 0; r < mb; ++r)
            for (int64_t c = 0; c < d; ++c) {
              qp[r * ld_d + c] = qs.at(m0 + r, c) * p.scale;
              dop[r * ld_d + c] = gos.at(m0 + r, c);
            }
          gemm_f32(plan, qp, ld_d, kt, ld_k, s, ld_k, mb, d, lk_pad, false);    // S
          gemm_f32(plan, dop, ld_d, vt, ld_k, ds, ld_k, mb, d, lk_pad, false);  // dP
        }
        for (int64_t r = 0; r < mb; ++r) {
          float* row = s + r * ld_k;
          float* drow = ds + r * ld_k;
          std::fill(row + keys, row + lk_pad, minus_inf);
          const float* gauss_row = has_bias ? gauss.row(p, m0 + r, band, band_frame) : nullptr;
          float unbiased_max, max;
          if (profiled) {  // the forward's profile logits; the unscaled row kept in s0 for the scale and the ties
            profile.row(p, m0 + r, h, pscale, pbias, profile_row);
            unbiased_max = kept_row_max(row, pbias, lk_pad);
            std::copy(row, row + lk_pad, s0 + r * ld_k);
            apply_profile(row, pscale, pbias, lk_pad);
            max = has_bias ? add_bias_max(row, gauss_row, tar_bias_coeff(p, unbiased_max, 1.f), lk_pad)
                           : row_max(row, lk_pad);
            if (max == minus_inf) {  // no kept key: P = dS = 0
              std::fill(row, row + lk_pad, 0.f);
              std::fill(drow, drow + lk_pad, 0.f);
              continue;
            }
          } else {
            unbiased_max = max = row_max(row, lk_pad);
            if (has_bias) {
              if (p.relative) std::copy(row, row + lk_pad, s0 + r * ld_k);
              max = add_bias_max(row, gauss_row, tar_bias_coeff(p, unbiased_max, 1.f), lk_pad);
            }
          }
          const float dot = normalize_dot(row, drow, 1.f / exp_sum(row, max, lk_pad), keys);  // rowsum(P dP)
          const float coupling = softmax_grad(drow, row, dot, gauss_row, keys, lk_pad);      // rowsum(dS' G)
          if (profiled)  // through the positive-logit scale: dS = dS' * scale where S > 0 (masked: dS' = 0)
            scale_positive_grad(drow, s0 + r * ld_k, pscale, lk_pad);
          if (has_bias && p.relative && coupling != 0.f) {  // the row max over the (kept) keys: its tied argmax
            const float* unbiased = s0 + r * ld_k;
            int64_t ties = 0;
            if (!profiled) {
              for (int64_t j = 0; j < keys; ++j) ties += unbiased[j] == unbiased_max;
              const float share = tar_bias_coeff_slope(p, unbiased_max, 1.f) * coupling / static_cast<float>(ties);
              for (int64_t j = 0; j < keys; ++j)
                if (unbiased[j] == unbiased_max) drow[j] += share;
            } else {  // a masked key (-inf bias) is no argmax, even at the max of the unmasked logits
              ties = count_kept_ties(unbiased, pbias, unbiased_max, lk_pad);  // past the keys: -inf, no tie
              const float share = tar_bias_coeff_slope(p, unbiased_max, 1.f) * coupling / static_cast<float>(ties);
              add_at_kept_ties(drow, unbiased, pbias, unbiased_max, share, lk_pad);
            }
          }
        }
        scalar_t* dqrow = dq + b * dq_s.batch + h * dq_s.head + m0 * dq_s.frame;
        if constexpr (native) {  // dS and P rounded to the dtype (the reductions padded to even with zeros)
          const int64_t keys_e = round_up(keys, 2), mb_e = round_up(mb, 2);
          std::fill(ndst, ndst + 2 * lk * bm_e, op_t(0.f));
          for (int64_t r = 0; r < mb; ++r) {
            at::vec::convert(ds + r * ld_k, nds + r * lk_pad, keys_e);  // dS = 0 past the keys
            for (int64_t j = 0; j < keys; ++j) {
              ndst[j * bm_e + r] = nds[r * lk_pad + j];
              npt[j * bm_e + r] = static_cast<op_t>(s[r * ld_k + j]);
            }
          }
          gemm_native(nds, lk_pad, b_k, dq_acc, ld_d, mb, keys_e, false);  // dQ / scale
          const NativeB<op_t> b_q = pack_native_b(nq, d_pad, mb_e, d_pad, plan.packed, packed_block);
          gemm_native(ndst, bm_e, b_q, dk_acc, ld_d, lk, mb_e, true);  // dK / scale += dS^T Q
          const NativeB<op_t> b_do = pack_native_b(ndo, d_pad, mb_e, d_pad, plan.packed, packed_block + bm_e * d_pad);
          gemm_native(npt, bm_e, b_do, dv_acc, ld_d, lk, mb_e, true);  // dV += P^T dO
        } else {
          gemm_f32(plan, ds, ld_k, kp, ld_d, dq_acc, ld_d, mb, keys, d_pad, false);  // dQ / scale
          for (int64_t j = 0; j < lk; ++j)
            for (int64_t r = 0; r < mb; ++r) tr[j * bm + r] = ds[r * ld_k + j];
          gemm_f32(plan, tr, bm, qp, ld_d, dk_acc, ld_d, lk, mb, d_pad, true);  // dK += dS^T (scale Q)
          for (int64_t j = 0; j < lk; ++j)
            for (int64_t r = 0; r < mb; ++r) tr[j * bm + r] = s[r * ld_k + j];
          gemm_f32(plan, tr, bm, dop, ld_d, dv_acc, ld_d, lk, mb, d_pad, true);  // dV += P^T dO
        }
        for (int64_t r = 0; r < mb; ++r) store_row(dq_acc + r * ld_d, d, p.scale, dqrow + r * dq_s.frame, dq_s.dim);
      }
      scalar_t* dkrow = dk + b * dk_s.batch + h * dk_s.head;
      scalar_t* dvrow = dv + b * dv_s.batch + h * dv_s.head;
      for (int64_t j = 0; j < lk; ++j) {
        store_row(dk_acc + j * ld_d, d, native ? p.scale : 1.f, dkrow + j * dk_s.frame, dk_s.dim);
        store_row(dv_acc + j * ld_d, d, 1.f, dvrow + j * dv_s.frame, dv_s.dim);
      }
    }
    release_engine(plan);
  });
}

template <typename scalar_t>
void tar_attention_backward_cpu_impl(const TARParams& p, const TensorStrides& go_strides, const scalar_t* go,
                                     const scalar_t* q, const scalar_t* k, const scalar_t* v, scalar_t* dq,
                                     scalar_t* dk, scalar_t* dv, const TensorStrides& dq_s,
                                     const TensorStrides& dk_s, const TensorStrides& dv_s) {
  with_operand_type<scalar_t>([&](const GemmPlan& plan, auto op) {
    whole_row_backward<scalar_t, decltype(op)>(p, plan, go_strides, go, q, k, v, dq, dk, dv, dq_s, dk_s, dv_s);
  });
}

}  // namespace

namespace {

TensorStrides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

}  // namespace

void tar_attention_cpu(const TARParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       at::Tensor& out) {
  if (tar_attention_cpu_long_applies(p)) {  // a video transformer's long rows: flash tiles over key groups
    tar_attention_cpu_long(p, q, k, v, out);
    return;
  }
  cpu::dispatch_input_dtype(q.scalar_type(), "tar_attention", [&](auto tag) {
    using scalar_t = decltype(tag);
    tar_attention_cpu_impl<scalar_t>(p, q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                                     v.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>());
  });
}

void tar_attention_backward_cpu(const TARParams& p, const at::Tensor& grad_out, const at::Tensor& q,
                                const at::Tensor& k, const at::Tensor& v, at::Tensor& dq, at::Tensor& dk,
                                at::Tensor& dv) {
  cpu::dispatch_input_dtype(q.scalar_type(), "tar_attention_backward", [&](auto tag) {
    using scalar_t = decltype(tag);
    tar_attention_backward_cpu_impl<scalar_t>(
        p, strides_of(grad_out), grad_out.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(),
        k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), dq.mutable_data_ptr<scalar_t>(),
        dk.mutable_data_ptr<scalar_t>(), dv.mutable_data_ptr<scalar_t>(), strides_of(dq), strides_of(dk),
        strides_of(dv));
  });
}

}  // namespace vstar
