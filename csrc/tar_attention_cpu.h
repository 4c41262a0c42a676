// vstar-kernels: the CPU kernel's entry point (tar_attention_cpu.cpp), called by bindings.cpp after validation.
#pragma once

#include <ATen/core/Tensor.h>

#include "tar_attention.h"

namespace vstar {

// out (batch, len_q, heads, head_dim) = TAR attention of q, k, v as described by p (strides included);
// fp32/fp16/bf16 inputs, fp32 accumulation.
void tar_attention_cpu(const TARParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       at::Tensor& out);

// dq, dk, dv (shaped like q, k, v; any strides) of TAR attention for the output gradient grad_out, recomputing the
// scores per (batch, head) and query block: never an Lq x Lk tensor. Row-max ties share its gradient evenly.
void tar_attention_backward_cpu(const TARParams& p, const at::Tensor& grad_out, const at::Tensor& q,
                                const at::Tensor& k, const at::Tensor& v, at::Tensor& dq, at::Tensor& dk,
                                at::Tensor& dv);

}  // namespace vstar
