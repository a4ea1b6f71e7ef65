"""NPU grouped matmul for MoE experts (npu_grouped_matmul), the float path.

No MoE model is wired into the runtime yet; the kernel is registered as op `grouped_matmul`
so that the MoE layer can bind it: x [M, k] with rows sorted by expert, weight [E, k, n] (the
NPU layout: `prepare_expert_weights` transposes the checkpoint's [E, n, k]), group_list [E]
int64 cumulative row ends per expert.
"""
from __future__ import annotations

import torch

from ascend_llm.ops.npu_runtime import torch_npu


def prepare_expert_weights(weight: torch.Tensor) -> torch.Tensor:
    """[E, n, k] checkpoint layout -> [E, k, n] contiguous, what npu_grouped_matmul takes."""
    return weight.transpose(1, 2).contiguous()


def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, group_list: torch.Tensor) -> torch.Tensor:
    """x [M, k] (rows of expert e at group_list[e-1]:group_list[e]) @ weight[e] [k, n] -> [M, n]."""
    return torch_npu().npu_grouped_matmul([x], [weight], group_list=group_list.to(torch.int64),
                                          split_item=2, group_type=0, group_list_type=0,
                                          output_dtype=x.dtype)[0]
