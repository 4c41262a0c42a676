// vstar-kernels: the CPU kernels' entry points (tar_attention_cpu*.cpp), called by bindings.cpp after validation.
#pragma once

#include <ATen/core/Tensor.h>

#include "tar_attention.h"

namespace vstar {

// out (batch, len_q, heads, head_dim) = TAR attention of q, k, v as described by p (strides included, the folded
// layout of a chunk, a given p.row_max; each row's log-sum-exp into p.lse when set); fp32/fp16/bf16 inputs, fp32
// accumulation.
void tar_attention_cpu(const TARParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       at::Tensor& out);

// The long-row kernel (tar_attention_cpu_long.cpp): flash tiles over key groups, for rows of 1024+ keys with no bias
// or a framed layout (a video transformer's frames); tar_attention_cpu() sends those calls there.
bool tar_attention_cpu_long_applies(const TARParams& p);
void tar_attention_cpu_long(const TARParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            at::Tensor& out);

// dq, dk, dv (shaped like q, k, v; any strides) of TAR attention for the output gradient grad_out, recomputing the
// scores per (batch, head) and query block: never an Lq x Lk tensor. Row-max ties share its gradient evenly.
void tar_attention_backward_cpu(const TARParams& p, const at::Tensor& grad_out, const at::Tensor& q,
                                const at::Tensor& k, const at::Tensor& v, at::Tensor& dq, at::Tensor& dk,
                                at::Tensor& dv);

}  // namespace vstar
