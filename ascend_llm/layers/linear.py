"""Linear layers: replicated, column-/row-parallel, fused QKV and merged gate/up.

Each layer owns its sharding (the `weight_loader` attached to every parameter);
its quantization method owns tensor layout and math.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ascend_llm.distributed.parallel_state import ParallelContext
from ascend_llm.ops.registry import OpSet
from ascend_llm.quant.base import QuantConfig, QuantMethod
from ascend_llm.quant.unquantized import UnquantizedLinearMethod


class LinearBase(nn.Module):
    """Common part: pick the quant method, create weights, forward = method.apply."""

    # whether each rank holds only a slice of the input dim (row-parallel); read by code below
    # the layers (`distributed.communication.splits_input`) that cannot import these classes
    shards_input_dim = False

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool,
                 params_dtype: torch.dtype, quant_config: QuantConfig | None, prefix: str,
                 tp_rank: int = 0, tp_size: int = 1, ops: OpSet | None = None,
                 parallel: ParallelContext | None = None) -> None:
        super().__init__()
        self.ops = ops              # backend kernels; the quant method binds one after loading
        self.input_size, self.output_sizes = input_size, output_sizes
        self.tp_rank, self.tp_size, self.prefix = tp_rank, tp_size, prefix
        self.parallel = parallel    # the group collectives run over (None: no collectives)
        method = quant_config.get_quant_method(self, prefix) if quant_config else None
        self.quant_method: QuantMethod = method or UnquantizedLinearMethod()
        self.quant_method.create_weights(self, input_size, output_sizes, params_dtype)
        # a quantized checkpoint may carry a bias the float model lacks (anti-outlier shifts);
        # zeros so that fused shards without one stay neutral
        if bias or getattr(self.quant_method, "checkpoint_bias", False):
            self.bias = nn.Parameter(torch.zeros(sum(output_sizes), dtype=params_dtype),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)
        for param in self.parameters(recurse=False):
            if not hasattr(param, "weight_loader"):   # methods may give their tensors their own
                param.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: str | int | None = None) -> None:
        _copy_checked(param.data, loaded, self.prefix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)


def _narrow_rows(loaded: torch.Tensor, start: int, size: int, name: str) -> torch.Tensor:
    """Rows [start, start + size) of a checkpoint tensor; ValueError if it has too few."""
    if loaded.dim() == 0 or loaded.shape[0] < start + size:
        raise ValueError(f"{name}: checkpoint tensor has shape {tuple(loaded.shape)}, "
                         f"expected at least {start + size} rows")
    return loaded.narrow(0, start, size)


def _copy_checked(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"{name}: checkpoint tensor has shape {tuple(src.shape)}, "
                         f"expected {tuple(dst.shape)}")
    dst.copy_(src)


class ReplicatedLinear(LinearBase):
    """Full weight on every rank."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 params_dtype: torch.dtype = torch.float32, quant_config: QuantConfig | None = None,
                 prefix: str = "", ops: OpSet | None = None) -> None:
        super().__init__(input_size, [output_size], bias, params_dtype, quant_config, prefix, ops=ops)


class ColumnParallelLinear(LinearBase):
    """Output dim split across ranks; the loader takes this rank's rows of each shard."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 params_dtype: torch.dtype = torch.float32, quant_config: QuantConfig | None = None,
                 prefix: str = "", tp_rank: int = 0, tp_size: int = 1, ops: OpSet | None = None,
                 parallel: ParallelContext | None = None) -> None:
        tp_rank, tp_size = _tp_coords(tp_rank, tp_size, parallel)
        for size in output_sizes:
            if size % tp_size:
                raise ValueError(f"{prefix}: output size {size} is not divisible by tp_size {tp_size}")
        self.full_output_sizes = output_sizes
        super().__init__(input_size, [s // tp_size for s in output_sizes], bias, params_dtype,
                         quant_config, prefix, tp_rank, tp_size, ops, parallel)

    def shard_offset(self, shard_index: int) -> tuple[int, int]:
        """(offset, size) of fused shard `shard_index` in this rank's output rows."""
        return sum(self.output_sizes[:shard_index]), self.output_sizes[shard_index]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: str | int | None = None) -> None:
        index = self.shard_index(shard_id)
        offset, size = self.shard_offset(index)
        part = _narrow_rows(loaded, self.tp_rank * size, size, f"{self.prefix}[{shard_id}]")
        _copy_checked(param.data.narrow(0, offset, size), part, f"{self.prefix}[{shard_id}]")

    def shard_index(self, shard_id: str | int | None) -> int:
        if shard_id is None:
            if len(self.output_sizes) != 1:
                raise ValueError(f"{self.prefix}: fused layer needs a shard id")
            return 0
        return int(shard_id)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs fused into one weight (e.g. gate_up_proj)."""


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections fused; KV heads are replicated when fewer than ranks."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, params_dtype: torch.dtype = torch.float32,
                 quant_config: QuantConfig | None = None, prefix: str = "",
                 tp_rank: int = 0, tp_size: int = 1, ops: OpSet | None = None,
                 parallel: ParallelContext | None = None) -> None:
        tp_rank, tp_size = _tp_coords(tp_rank, tp_size, parallel)
        if num_heads % tp_size:
            raise ValueError(f"{prefix}: num_attention_heads {num_heads} is not divisible by "
                             f"tensor_parallel_size {tp_size}")
        if (num_kv_heads % tp_size) if num_kv_heads >= tp_size else (tp_size % num_kv_heads):
            raise ValueError(f"{prefix}: num_key_value_heads {num_kv_heads} and tensor_parallel_size "
                             f"{tp_size} must divide one another (KV heads are split or replicated)")
        kv_replicas = max(1, tp_size // num_kv_heads)
        sizes = [num_heads * head_dim, num_kv_heads * kv_replicas * head_dim,
                 num_kv_heads * kv_replicas * head_dim]
        self.kv_replicas = kv_replicas
        super().__init__(hidden_size, sizes, bias, params_dtype, quant_config, prefix, tp_rank, tp_size,
                         ops, parallel)

    def shard_index(self, shard_id: str | int | None) -> int:
        return {"q": 0, "k": 1, "v": 2}[shard_id]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: str | int | None = None) -> None:
        index = self.shard_index(shard_id)
        offset, size = self.shard_offset(index)
        rank = self.tp_rank if index == 0 else self.tp_rank // self.kv_replicas
        part = _narrow_rows(loaded, rank * size, size, f"{self.prefix}[{shard_id}]")
        _copy_checked(param.data.narrow(0, offset, size), part, f"{self.prefix}[{shard_id}]")


class RowParallelLinear(LinearBase):
    """Input dim split across ranks; outputs are summed by an all-reduce (tp_size > 1).

    The bias (float, or W8A8's `quant_bias`) is added on rank 0 only so the sum counts it once.
    Without a `parallel` group (bare layers in tests) the rank's partial sum is returned.
    """

    shards_input_dim = True

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 params_dtype: torch.dtype = torch.float32, quant_config: QuantConfig | None = None,
                 prefix: str = "", tp_rank: int = 0, tp_size: int = 1, ops: OpSet | None = None,
                 parallel: ParallelContext | None = None) -> None:
        tp_rank, tp_size = _tp_coords(tp_rank, tp_size, parallel)
        if input_size % tp_size:
            raise ValueError(f"{prefix}: input size {input_size} is not divisible by tp_size {tp_size}")
        super().__init__(input_size // tp_size, [output_size], bias, params_dtype, quant_config,
                         prefix, tp_rank, tp_size, ops, parallel)
        reduce = parallel is not None and parallel.is_distributed
        self._all_reduce = (ops.get("all_reduce") if ops is not None else _all_reduce) if reduce else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias if self.tp_rank == 0 else None
        out = self.quant_method.apply(self, x, bias)             # [T, n] this rank's partial sum
        if self._all_reduce is not None:
            out = self._all_reduce(out, self.parallel)
        return out

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: str | int | None = None) -> None:
        if param.dim() == 2 and param is not self.bias:
            size = self.input_size
            if loaded.dim() != 2 or loaded.shape[1] != size * self.tp_size:
                raise ValueError(f"{self.prefix}: checkpoint tensor has shape {tuple(loaded.shape)}, "
                                 f"expected {(param.shape[0], size * self.tp_size)} (split along dim 1 "
                                 f"over {self.tp_size} ranks)")
            loaded = loaded.narrow(1, self.tp_rank * size, size)
        _copy_checked(param.data, loaded, self.prefix)


def _tp_coords(tp_rank: int, tp_size: int, parallel: ParallelContext | None) -> tuple[int, int]:
    """(rank, size) from the parallel context when there is one, else the explicit values."""
    if parallel is None:
        return tp_rank, tp_size
    return parallel.rank, parallel.world_size


def _all_reduce(x: torch.Tensor, parallel: ParallelContext) -> torch.Tensor:
    from ascend_llm.ops.collectives import all_reduce
    return all_reduce(x, parallel)
