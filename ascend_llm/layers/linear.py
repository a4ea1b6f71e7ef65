"""Linear layers: replicated, column-/row-parallel, fused QKV and merged gate/up.

Each layer owns tensor parallelism and checkpoint loading: `LinearBase.weight_loader` is the one
loading path of every linear parameter, float or quantized. Its quantization method owns tensor
layout and math, and declares on each parameter its name and where its dims are:
  quant_name the checkpoint suffix (`weight`, `deq_scale`; by default the parameter's own name)
  out_dim    the dim that follows the output rows (None: one value per fused shard, shape [shards])
  out_block  output rows one entry along out_dim covers (block scales; 1 by default)
  in_dim     the dim a row-parallel layer splits (None: kept whole on every rank)
  load_check optional (param, tensor, name) -> tensor: the format's dtype checks / conversions
A float weight [n, k] defaults to out_dim 0, in_dim 1; a bias [n] to out_dim 0.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn as nn

from ascend_llm.distributed.parallel_state import ParallelContext
from ascend_llm.layers.sharding import copy_checked, rank_slice
from ascend_llm.ops.registry import OpSet
from ascend_llm.quant.base import QuantConfig, QuantMethod
from ascend_llm.quant.unquantized import UnquantizedLinearMethod


class LinearBase(nn.Module):
    """Common part: pick the quant method, create weights, load them, forward = method.apply."""

    # whether each rank holds only a slice of the input dim (row-parallel) or of the output dim
    # (column-parallel); read by code below the layers (`distributed.communication`, quant
    # methods), which cannot import these classes
    shards_input_dim = False
    shards_output_dim = False

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool,
                 params_dtype: torch.dtype, quant_config: QuantConfig | None, prefix: str,
                 tp_rank: int = 0, tp_size: int = 1, ops: OpSet | None = None,
                 parallel: ParallelContext | None = None) -> None:
        super().__init__()
        self.ops = ops              # backend kernels; the quant method binds one after loading
        self.input_size, self.output_sizes = input_size, output_sizes
        self.tp_rank, self.tp_size, self.prefix = tp_rank, tp_size, prefix
        self.parallel = parallel    # the group collectives run over (None: no collectives)
        self.loaded_shards: set[tuple[str, int]] = set()    # (param name, fused shard index)
        self.params_dtype = params_dtype
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
        for name, param in self.named_parameters(recurse=False):
            _default_dims(param, name)
            param.weight_loader = self.weight_loader
        # online Hadamard rotation of the input (the checkpoint folded H_b into the weight): block
        # size or None, and the bound `hadamard_transform` kernel
        self.input_hadamard_block = quant_config.input_hadamard_block(prefix) if quant_config else None
        self._input_transform = self._bind_input_transform() if self.input_hadamard_block else None

    def _bind_input_transform(self) -> Callable[[torch.Tensor, int], torch.Tensor]:
        """Check the block against this rank's input and bind the backend's kernel (its matrix
        built now, on the layer's device, so graph capture and torch.compile find it ready)."""
        block, k = self.input_hadamard_block, self.input_size
        if k % block:
            tp = self.tp_size if self.shards_input_dim else 1
            fits = [b for b in (2 ** i for i in range(1, k.bit_length())) if k % b == 0]
            raise ValueError(f"{self.prefix}: online_hadamard block_size {block} does not divide the "
                             f"layer's input size {k * tp}" + (f" split over tensor_parallel_size {tp} "
                             f"({k} per rank; each rank's shard must hold whole blocks)" if tp > 1 else "")
                             + f"; block sizes that fit: {fits or 'none'}")
        if self.ops is None:                    # a bare layer (tests): the CPU kernel
            from ascend_llm.ops.cpu_hadamard import HadamardMatmul
            return HadamardMatmul()
        kernel = self.ops.bind(self, "hadamard_transform", block_size=block, dtype=self.params_dtype)
        kernel.prepare(self)
        return kernel.run

    def shard_index(self, shard_id: str | int | None) -> int:
        """The fused-shard index of `shard_id` (0 for an unfused layer, which takes no id)."""
        if shard_id is not None:
            raise ValueError(f"{self.prefix}: unexpected shard id {shard_id!r} for an unfused layer")
        return 0

    def shard_rank(self, index: int) -> int:
        """Which slice of shard `index`'s checkpoint rows this rank holds."""
        return self.tp_rank

    def shard_replicas(self, index: int) -> int:
        """How many ranks hold the same slice of shard `index` (replicated KV heads)."""
        return 1

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: str | int | None = None) -> None:
        """Copy one checkpoint tensor (one fused shard, this rank's part of it) into `param`."""
        index = self.shard_index(shard_id)
        name = self._tensor_name(param, shard_id)
        check = getattr(param, "load_check", None)
        if check is not None:
            loaded = check(param, loaded, name)
        if param.out_dim is None:
            if loaded.numel() != 1:
                raise ValueError(f"{name}: expected a per-tensor value of shape [1], "
                                 f"got {tuple(loaded.shape)}")
            param.data[index] = loaded.reshape(()).to(param.dtype)
        else:
            dst, part = self._shard_slices(param, loaded, index, name)
            copy_checked(dst, part, name)
        self.loaded_shards.add((param.quant_name, index))

    def _tensor_name(self, param: nn.Parameter, shard_id: Any) -> str:
        name = f"{self.prefix}.{param.quant_name}"
        return name if shard_id is None else f"{name}[{shard_id}]"

    def _shard_slices(self, param: nn.Parameter, loaded: torch.Tensor, index: int,
                      name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(slice of param.data, slice of loaded) for shard `index` on this rank."""
        dst = param.data
        if self.shards_output_dim:
            block = param.out_block
            rows = math.ceil(self.output_sizes[index] / block)
            # each fused shard has its own block grid (a partial last block included)
            block_offset = sum(math.ceil(size / block) for size in self.output_sizes[:index])
            dst = dst.narrow(param.out_dim, block_offset, rows)
            if self.tp_size > 1 and loaded.dim() > param.out_dim:
                ranks = self.tp_size // self.shard_replicas(index)
                loaded = rank_slice(loaded, dst, param.out_dim, self.shard_rank(index), ranks, name)
        elif self.shards_input_dim and self.tp_size > 1 and param.in_dim is not None:
            loaded = rank_slice(loaded, dst, param.in_dim, self.tp_rank, self.tp_size, name)
        return dst, loaded

    def apply_method(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [T, k] -> [T, n]: the quant method's apply, on the Hadamard-rotated input when the
        checkpoint rotated this layer (one place for every scheme)."""
        if self._input_transform is not None:
            x = self._input_transform(x, self.input_hadamard_block)              # [T, k]
        return self.quant_method.apply(self, x, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply_method(x, self.bias)


def _default_dims(param: nn.Parameter, name: str) -> None:
    """Name and dims of a parameter its method did not describe: [n, k] weight or [n] vector."""
    if not hasattr(param, "quant_name"):
        param.quant_name = name
    if not hasattr(param, "out_dim"):
        param.out_dim = 0
        param.in_dim = 1 if param.dim() == 2 else None
    if not hasattr(param, "in_dim"):
        param.in_dim = None
    if not hasattr(param, "out_block"):
        param.out_block = 1


class ReplicatedLinear(LinearBase):
    """Full weight on every rank."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 params_dtype: torch.dtype = torch.float32, quant_config: QuantConfig | None = None,
                 prefix: str = "", ops: OpSet | None = None) -> None:
        super().__init__(input_size, [output_size], bias, params_dtype, quant_config, prefix, ops=ops)


class ColumnParallelLinear(LinearBase):
    """Output dim split across ranks; the loader takes this rank's rows of each shard."""

    shards_output_dim = True

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

    def shard_index(self, shard_id: str | int | None) -> int:
        if shard_id is None:
            if len(self.output_sizes) != 1:
                raise ValueError(f"{self.prefix}: fused layer needs a shard id")
            return 0
        index = int(shard_id)
        if not 0 <= index < len(self.output_sizes):
            raise ValueError(f"{self.prefix}: shard id {shard_id!r} out of range for "
                             f"{len(self.output_sizes)} fused shards")
        return index


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
        if shard_id not in _QKV_SHARDS:
            raise ValueError(f"{self.prefix}: shard id {shard_id!r} is not one of q, k, v")
        return _QKV_SHARDS[shard_id]

    def shard_rank(self, index: int) -> int:
        return self.tp_rank if index == 0 else self.tp_rank // self.kv_replicas

    def shard_replicas(self, index: int) -> int:
        return 1 if index == 0 else self.kv_replicas


_QKV_SHARDS = {"q": 0, "k": 1, "v": 2}


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
        out = self.apply_method(x, bias)                         # [T, n] this rank's partial sum
        if self._all_reduce is not None:
            out = self._all_reduce(out, self.parallel)
        return out


def _tp_coords(tp_rank: int, tp_size: int, parallel: ParallelContext | None) -> tuple[int, int]:
    """(rank, size) from the parallel context when there is one, else the explicit values."""
    if parallel is None:
        return tp_rank, tp_size
    return parallel.rank, parallel.world_size


def _all_reduce(x: torch.Tensor, parallel: ParallelContext) -> torch.Tensor:
    from ascend_llm.ops.collectives import all_reduce
    return all_reduce(x, parallel)
