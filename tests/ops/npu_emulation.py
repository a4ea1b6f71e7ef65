"""A stand-in `torch_npu` module: the documented semantics of every torch_npu op the NPU
backend calls, in plain torch on the CPU, plus the argument checks the hardware makes.

Written from the torch_npu / CANN op documentation (Ascend/op-plugin `docs/context/*.md`,
hiascend "PyTorch API" pages), independently of `ascend_llm/ops/cpu*.py`: the NPU kernels are
tested by comparing what they compute through this module with the CPU reference kernels.

Each op records an `OpCall` (name, dtypes, shapes, formats) in `FakeTorchNPU.calls` and raises
`NPUArgumentError` where the hardware rejects an argument (a wrong dtype, a weight that was not
cast to FRACTAL_NZ, a 310P-only restriction, ...). Numerics: integer matmuls are exact, float
math runs in float32 and is cast to the documented output dtype.

`install_fake_torch_npu(monkeypatch)` puts an instance into `sys.modules["torch_npu"]` and
`torch.npu`, as importing the real torch_npu does; the `npu_emulation` fixture wraps it.
"""
from __future__ import annotations

import contextlib
import importlib.machinery
import sys
import types
from dataclasses import dataclass
from typing import Any, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

ACL_FORMAT_ND = 2
ACL_FORMAT_FRACTAL_NZ = 29
FLOAT_ACTS = (torch.float16, torch.bfloat16)
MASK_SIZE = 2048                      # sparse_mode 2/3/4 take the "optimised" 2048 x 2048 mask


class NPUArgumentError(RuntimeError):
    """What the emulated hardware raises for an argument the real op rejects."""


@dataclass(frozen=True)
class OpCall:
    """One recorded op call: name and a short description of each tensor argument."""
    name: str
    args: dict[str, str]


def _describe(t: Any, formats: "FormatTable") -> str:
    if isinstance(t, torch.Tensor):
        fmt = "NZ" if formats.get(t) == ACL_FORMAT_FRACTAL_NZ else "ND"
        return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}:{fmt}"
    return repr(t)


def _require(cond: bool, op: str, message: str) -> None:
    if not cond:
        raise NPUArgumentError(f"{op}: {message}")


class FormatTable:
    """The storage format (ND or FRACTAL_NZ) of tensors returned by npu_format_cast.

    Real torch_npu keeps the format in the NPU storage descriptor, so it survives `param.data`
    and nn.Parameter wrapping. Here a cast returns a fresh tensor that this table keeps alive
    (its address then cannot be reused) and identifies by address, shape and strides.
    """

    def __init__(self) -> None:
        self._formats: dict[tuple[int, tuple[int, ...], tuple[int, ...]], tuple[int, torch.Tensor]] = {}

    def set(self, t: torch.Tensor, acl_format: int) -> None:
        self._formats[(t.data_ptr(), tuple(t.shape), t.stride())] = (acl_format, t)

    def get(self, t: torch.Tensor) -> int:
        entry = self._formats.get((t.data_ptr(), tuple(t.shape), t.stride()))
        return ACL_FORMAT_ND if entry is None else entry[0]


# ------------------------------------------------------------------------- graph capture (NPUGraph)
#
# ACL graph semantics emulated here (torch_npu `torch.npu.NPUGraph` / `torch.npu.graph` and the
# task-group API vllm-ascend uses to refresh host arguments of captured kernels):
# - capture records the aten ops run inside `torch.npu.graph(g)` (on the emulated capture
#   stream); `replay()` re-runs them on the captured tensors, so host values (Python ints, lists)
#   read during capture stay frozen, as on the device;
# - `graph_task_group_begin(stream)` / `graph_task_group_end(stream) -> handle`, inside a
#   capture and on the capturing stream, make the ops launched in between one replaceable unit
#   of the graph (the torch_npu kernels launched in it are remembered by name);
# - `graph_task_update_begin(stream, handle)` / `graph_task_update_end(stream)`, outside any
#   capture, re-record that unit: the kernels launched in between must be the ones the group
#   captured (same torch_npu ops, in order), and replace the group's tasks, so later replays run
#   them with the new host arguments. Without an update a group replays what it captured.
#   (On the device the update only rewrites task parameters; the emulation also runs the
#   update's ops once, which writes the captured outputs early; the replay rewrites them.)
# - an update of a handle whose graph was reset, during a capture, nested, or not closed on the
#   stream it began on raises NPUArgumentError, as does a replay while an update is open.

class _RecordOps(TorchDispatchMode):
    """Records every aten op run while active: (op, args, kwargs, outputs), into `target`
    (the graph's op list, or the task group being captured / updated)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[Any] = []
        self.target: list[Any] = self.ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        self.target.append((func, args, kwargs or {}, out))
        return out


class _TaskGroup:
    """A captured task group: its recorded ops run in place in the graph, replaceable by an
    update. The handle `graph_task_group_end` returns."""

    def __init__(self, graph: "FakeNPUGraph", generation: int) -> None:
        self.graph, self.generation = graph, generation
        self.ops: list[tuple[Any, tuple, dict, Any]] = []
        self.kernels: list[str] = []          # torch_npu ops launched in the group
        self.closed = False
        self.num_updates = 0


class FakeStream:
    """torch.npu.Stream: only identity matters to the emulation."""
    _count = 0

    def __init__(self, device: Any = None, priority: int = 0, name: str | None = None) -> None:
        FakeStream._count += 1
        self.name = name or f"stream{FakeStream._count}"

    def synchronize(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"FakeStream({self.name})"


class FakeNPUGraph:
    """torch.npu.NPUGraph: capture records the aten ops run inside `torch.npu.graph(g)`;
    `replay()` re-runs them on the same tensors and writes each result into the tensor the
    capture produced, so captured outputs update in place, as a replayed ACL graph does.
    Host values read during capture (Python ints, lists) stay frozen, as on the device;
    task groups replay their latest update (see the section comment)."""

    def __init__(self) -> None:
        self._ops: list[Any] | None = None
        self._generation = 0
        self._namespace: "FakeNPUNamespace | None" = None
        self.num_replays = 0

    def replay(self) -> None:
        if self._ops is None:
            raise NPUArgumentError("NPUGraph.replay: nothing was captured")
        if self._namespace is not None and self._namespace._updating is not None:
            raise NPUArgumentError("NPUGraph.replay: a graph_task_update is still open (call graph_task_update_end)")
        with torch.no_grad():
            for entry in self._ops:
                for func, args, kwargs, out in (entry.ops if isinstance(entry, _TaskGroup) else (entry,)):
                    fresh = func(*args, **kwargs)
                    _wait_for_collectives(fresh)
                    _copy_outputs(out, fresh)
        self.num_replays += 1

    def reset(self) -> None:
        self._ops = None
        self._generation += 1          # its task-group handles become invalid


def _wait_for_collectives(fresh: Any) -> None:
    """A replayed c10d op (all-reduce / all-gather of a captured tensor-parallel forward) returns
    its Work: wait for it, as the graph's stream orders the collective before the ops reading
    its result (the gloo stand-in for hccl runs it on a background thread)."""
    if isinstance(fresh, (tuple, list)):
        for item in fresh:
            _wait_for_collectives(item)
    elif hasattr(fresh, "wait") and not isinstance(fresh, torch.Tensor):
        fresh.wait()


def _copy_outputs(captured: Any, fresh: Any) -> None:
    if isinstance(captured, torch.Tensor) and isinstance(fresh, torch.Tensor):
        if captured is not fresh and captured.shape == fresh.shape and captured.data_ptr() != fresh.data_ptr():
            captured.copy_(fresh)
    elif isinstance(captured, (tuple, list)):
        for c, f in zip(captured, fresh):
            _copy_outputs(c, f)


@dataclass
class _Capture:
    graph: FakeNPUGraph
    recorder: _RecordOps
    stream: FakeStream
    group: _TaskGroup | None = None
    group_first_call: int = 0


@dataclass
class _Update:
    group: _TaskGroup
    recorder: _RecordOps
    stream: Any
    first_call: int


class FakeNPUNamespace(types.SimpleNamespace):
    """The `torch.npu` functions the runtime uses; one emulated device whose tensors live on
    the CPU."""

    def __init__(self, soc: str, memory_bytes: int, calls: list[OpCall]) -> None:
        super().__init__()
        self.soc = soc
        self.memory_bytes = memory_bytes
        self.NPUGraph = FakeNPUGraph
        self.Stream = FakeStream
        self.synchronize_count = 0
        self._calls = calls                  # the module's OpCall log (kernels launched)
        self._default_stream = FakeStream(name="default")
        self._current_stream = self._default_stream
        self._capture: _Capture | None = None
        self._updating: _Update | None = None

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return 1

    def current_device(self) -> int:
        return 0

    def set_device(self, device: Any) -> None:
        return None

    def synchronize(self, device: Any = None) -> None:
        self.synchronize_count += 1

    def mem_get_info(self, device: Any = None) -> tuple[int, int]:
        return self.memory_bytes, self.memory_bytes

    def empty_cache(self) -> None:
        return None

    def get_device_name(self, device: Any = None) -> str:
        return self.soc

    # -- streams
    def current_stream(self, device: Any = None) -> FakeStream:
        return self._current_stream

    @contextlib.contextmanager
    def stream(self, stream: FakeStream) -> Iterator[None]:
        previous, self._current_stream = self._current_stream, stream
        try:
            yield
        finally:
            self._current_stream = previous

    # -- capture
    @contextlib.contextmanager
    def graph(self, graph: FakeNPUGraph, pool: Any = None, stream: Any = None) -> Iterator[None]:
        """Capture into `graph` on a side stream (torch.npu.graph's default)."""
        if self._capture is not None:
            raise NPUArgumentError("torch.npu.graph: a capture is already in progress")
        if self._updating is not None:
            raise NPUArgumentError("torch.npu.graph: a graph_task_update is open")
        recorder = _RecordOps()
        capture = _Capture(graph, recorder, stream or FakeStream(name="capture"))
        self._capture = capture
        graph.reset()
        try:
            with self.stream(capture.stream), recorder:
                yield
            if capture.group is not None:
                raise NPUArgumentError("torch.npu.graph: capture ended inside a task group "
                                       "(graph_task_group_begin without graph_task_group_end)")
        finally:
            self._capture = None
        graph._ops = recorder.ops
        graph._namespace = self

    def graph_task_group_begin(self, stream: FakeStream) -> None:
        op = "graph_task_group_begin"
        capture = self._capture
        _require(capture is not None, op, "only inside a graph capture")
        _require(stream is capture.stream, op, f"{stream} is not the capturing stream {capture.stream}")
        _require(capture.group is None, op, "task groups do not nest")
        capture.group = _TaskGroup(capture.graph, capture.graph._generation)
        capture.group_first_call = len(self._calls)
        capture.recorder.ops.append(capture.group)
        capture.recorder.target = capture.group.ops

    def graph_task_group_end(self, stream: FakeStream) -> _TaskGroup:
        op = "graph_task_group_end"
        capture = self._capture
        _require(capture is not None and capture.group is not None, op, "no task group is open")
        _require(stream is capture.stream, op, f"{stream} is not the capturing stream {capture.stream}")
        group = capture.group
        group.kernels = [c.name for c in self._calls[capture.group_first_call:]]
        _require(bool(group.kernels), op, "the task group launched no kernel")
        group.closed = True
        capture.group = None
        capture.recorder.target = capture.recorder.ops
        return group

    def graph_task_update_begin(self, stream: Any, handle: Any) -> None:
        op = "graph_task_update_begin"
        _require(self._capture is None, op, "not allowed during a graph capture")
        _require(self._updating is None, op, "an update is already open (graph_task_update_end first)")
        _require(isinstance(handle, _TaskGroup) and handle.closed, op,
                 "handle is not a task group captured with graph_task_group_begin/end")
        _require(handle.graph._ops is not None and handle.generation == handle.graph._generation, op,
                 "the task group's graph was reset or re-captured")
        recorder = _RecordOps()
        recorder.__enter__()
        self._updating = _Update(handle, recorder, stream, len(self._calls))

    def graph_task_update_end(self, stream: Any) -> None:
        op = "graph_task_update_end"
        update = self._updating
        _require(update is not None, op, "no update is open")
        update.recorder.__exit__(None, None, None)
        self._updating = None
        _require(stream is update.stream, op, "the update must end on the stream it began on")
        kernels = [c.name for c in self._calls[update.first_call:]]
        _require(kernels == update.group.kernels, op,
                 f"the update launched {kernels}, the task group captured {update.group.kernels}")
        update.group.ops = update.recorder.ops
        update.group.num_updates += 1


# ------------------------------------------------------------------------------ the module

class _OpWithOut:
    """A torch_npu op callable as `op(...)` with its `op.out(..., out=[...])` variant."""

    def __init__(self, functional: Any, out: Any) -> None:
        self._functional, self.out = functional, out
        self.__doc__ = functional.__doc__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._functional(*args, **kwargs)


class FakeTorchNPU(types.ModuleType):
    """A `torch_npu` module object. `soc` is what torch.npu.get_device_name reports
    ("Ascend910B1": Atlas A2; "Ascend310P3": Atlas inference series)."""

    def __init__(self, soc: str = "Ascend910B1", memory_bytes: int = 64 * 2**20) -> None:
        super().__init__("torch_npu")
        self.__spec__ = importlib.machinery.ModuleSpec("torch_npu", loader=None)
        self.emulated_device = "cpu"         # read by ascend_llm.platform.torch_device
        self.emulated_dist_backend = "gloo"  # hccl's stand-in under tensor parallelism
        self.calls: list[OpCall] = []
        self.npu = FakeNPUNamespace(soc, memory_bytes, self.calls)
        self.formats = FormatTable()
        self.strict_nz = True   # quant matmul weights must be NZ (vllm-ascend's default; required on 310P)
        self._workspaces: list[torch.Tensor] = []
        # torch_npu ops carry their out= variant as an attribute (`op.out(...)`)
        self.npu_fused_infer_attention_score = _OpWithOut(
            FakeTorchNPU.npu_fused_infer_attention_score.__get__(self), self.npu_fused_infer_attention_score_out)

    # -- bookkeeping
    @property
    def is_310p(self) -> bool:
        return "310P" in self.npu.soc

    def _record(self, name: str, **tensors: Any) -> None:
        self.calls.append(OpCall(name, {k: _describe(v, self.formats) for k, v in tensors.items()}))

    def called(self, name: str) -> list[OpCall]:
        """The recorded calls of op `name`."""
        return [c for c in self.calls if c.name == name]

    # -- formats
    def npu_format_cast(self, tensor: torch.Tensor, acl_format: int) -> torch.Tensor:
        """Copy `tensor` into storage format `acl_format` (2 ND, 29 FRACTAL_NZ)."""
        _require(acl_format in (ACL_FORMAT_ND, ACL_FORMAT_FRACTAL_NZ), "npu_format_cast",
                 f"format {acl_format} is not ND (2) or FRACTAL_NZ (29)")
        _require(tensor.dim() >= 2, "npu_format_cast", "FRACTAL_NZ needs a tensor of >= 2 dims")
        self._record("npu_format_cast", tensor=tensor)
        out = tensor.contiguous().clone()
        self.formats.set(out, acl_format)
        return out

    def get_npu_format(self, tensor: torch.Tensor) -> int:
        return self.formats.get(tensor)

    # -- quantization
    def npu_quantize(self, input: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
                     dtype: torch.dtype, axis: int = 1, div_mode: bool = True) -> torch.Tensor:
        """div_mode False: y = round(input * scales + zero_points) to int8, per last-axis element."""
        op = "npu_quantize"
        self._record(op, input=input, scales=scales, zero_points=zero_points)
        _require(input.dtype in (torch.float32, *FLOAT_ACTS), op, f"input dtype {input.dtype}")
        _require(not (self.is_310p and input.dtype == torch.bfloat16), op, "bfloat16 is not supported on 310P")
        _require(dtype == torch.qint8, op, f"dtype must be torch.qint8 here, got {dtype}")
        _require(axis == -1, op, "only last-axis (axis=-1) quantization is used")
        k = input.shape[-1]
        if div_mode:
            _require(scales.dtype in (torch.float32, torch.bfloat16), op, f"div_mode scales dtype {scales.dtype}")
            _require(zero_points is None or zero_points.dtype in (torch.int8, torch.uint8, torch.int32,
                                                                  torch.bfloat16), op,
                     f"div_mode zero_points dtype {None if zero_points is None else zero_points.dtype}")
            _require(zero_points is None or zero_points.shape == scales.shape, op,
                     "zero_points must have the shape of scales")
        else:
            _require(scales.dtype == input.dtype, op,
                     f"div_mode=False needs scales in the input dtype {input.dtype}, got {scales.dtype}")
            _require(zero_points is None or (zero_points.dtype == scales.dtype
                                             and zero_points.shape == scales.shape), op,
                     "zero_points must have the dtype and shape of scales")
        _require(scales.dim() == 1 and scales.shape[0] in (1, k), op,
                 f"scales shape {list(scales.shape)} must be [1] or [{k}]")
        x = input.float()
        y = x / scales.float() if div_mode else x * scales.float()
        if zero_points is not None:
            y = y + zero_points.float()
        return torch.round(y).clamp(-128, 127).to(torch.int8)

    def npu_dynamic_quant(self, input: torch.Tensor, *, smooth_scales: torch.Tensor | None = None,
                          group_index: torch.Tensor | None = None,
                          dst_type: torch.dtype = torch.int8) -> tuple[torch.Tensor, torch.Tensor]:
        """Symmetric per-token int8: scale = rowmax|x| / 127, y = round(x / scale)."""
        op = "npu_dynamic_quant"
        self._record(op, input=input)
        _require(input.dtype in FLOAT_ACTS, op, f"input must be float16/bfloat16, got {input.dtype}")
        _require(not self.is_310p, op, "not supported on 310P (Atlas inference series)")
        _require(dst_type == torch.int8, op, f"dst_type {dst_type}")
        _require(smooth_scales is None and group_index is None, op, "smooth scales are not emulated")
        x = input.float()
        scale = x.abs().amax(dim=-1) / 127.0
        y = torch.round(x / scale.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1))
        return y.clamp(-128, 127).to(torch.int8), scale

    def npu_quant_matmul(self, x1: torch.Tensor, x2: torch.Tensor, scale: torch.Tensor, *,
                         offset: torch.Tensor | None = None, pertoken_scale: torch.Tensor | None = None,
                         bias: torch.Tensor | None = None,
                         output_dtype: torch.dtype | None = None) -> torch.Tensor:
        """y = (x1 @ x2 [+ int32 bias]) * scale [* pertoken_scale] [+ float bias], x1 [m, k] int8,
        x2 [k, n] int8; an int64 scale carries float32 bits in its low 32 bits."""
        op = "npu_quant_matmul"
        self._record(op, x1=x1, x2=x2, scale=scale, pertoken_scale=pertoken_scale, bias=bias)
        _require(x1.dtype == torch.int8 and x2.dtype == torch.int8, op,
                 f"x1/x2 must be int8, got {x1.dtype}/{x2.dtype}")
        _require(x1.dim() == 2 and x2.dim() == 2 and x1.shape[1] == x2.shape[0], op,
                 f"shapes {list(x1.shape)} @ {list(x2.shape)}: x2 must be [k, n]")
        if self.strict_nz or self.is_310p:
            _require(self.formats.get(x2) == ACL_FORMAT_FRACTAL_NZ, op,
                     "x2 (weight) must be cast to FRACTAL_NZ with npu_format_cast(w, 29)")
        n = x2.shape[1]
        self._check_quant_matmul_dtypes(scale, pertoken_scale, bias, output_dtype, n, x1.shape[0])
        acc = (x1.double() @ x2.double())                                       # exact integers
        if bias is not None and bias.dtype == torch.int32:
            acc = acc + bias.double()
        out = acc.float() * self._scale_values(scale)
        if pertoken_scale is not None:
            out = out * pertoken_scale.float().unsqueeze(-1)
        if bias is not None and bias.dtype != torch.int32:
            out = out + bias.float()
        return out.to(output_dtype)

    def _check_quant_matmul_dtypes(self, scale: torch.Tensor, pertoken: torch.Tensor | None,
                                   bias: torch.Tensor | None, out: torch.dtype | None, n: int,
                                   m: int) -> None:
        op = "npu_quant_matmul"
        _require(out in (torch.float16, torch.bfloat16), op, f"output_dtype {out} (float16/bfloat16 used)")
        _require(scale.dtype in (torch.float32, torch.int64, torch.bfloat16), op,
                 f"scale dtype {scale.dtype} is not supported (float32, int64 or bfloat16)")
        _require(scale.dim() == 1 and scale.shape[0] in (1, n), op, f"scale shape {list(scale.shape)}")
        if self.is_310p:
            _require(out == torch.float16, op, "310P outputs int8/float16 only")
            _require(pertoken is None, op, "310P has no pertoken_scale")
        if out == torch.bfloat16:
            _require(scale.dtype != torch.int64, op, "bfloat16 output takes a float32/bfloat16 scale, not int64")
        if pertoken is None and out == torch.float16:
            _require(scale.dtype == torch.int64, op,
                     "float16 output without pertoken_scale needs an int64 (quant-param) scale")
        if pertoken is not None:
            _require(pertoken.dtype == torch.float32 and tuple(pertoken.shape) == (m,), op,
                     f"pertoken_scale must be float32 [{m}], got {pertoken.dtype} {list(pertoken.shape)}")
            _require(scale.dtype != torch.int64, op, "pertoken_scale needs a float32/bfloat16 scale")
        if bias is not None:
            allowed = {torch.int32}
            if out == torch.bfloat16:
                allowed |= {torch.bfloat16, torch.float32}
            if out == torch.float16 and pertoken is not None:
                allowed |= {torch.float16}
            _require(bias.dtype in allowed, op, f"bias dtype {bias.dtype} with output {out}")
            _require(tuple(bias.shape) == (n,), op, f"bias shape {list(bias.shape)} != [{n}]")

    @staticmethod
    def _scale_values(scale: torch.Tensor) -> torch.Tensor:
        if scale.dtype == torch.int64:
            low = scale & 0xFFFFFFFF
            low = torch.where(low >= 2**31, low - 2**32, low)
            return low.to(torch.int32).view(torch.float32)
        return scale.float()

    def npu_convert_weight_to_int4pack(self, weight: torch.Tensor, inner_k_tiles: int = 0) -> torch.Tensor:
        """int32 [k, n] of values in [-8, 7] -> int32 [k, n / 8], eight int4 per int32.
        (The emulation packs element j of each group of 8 into bits 4j..4j+3; callers treat
        the layout as opaque and only pass it to npu_weight_quant_batchmatmul.)"""
        op = "npu_convert_weight_to_int4pack"
        self._record(op, weight=weight)
        _require(weight.dtype == torch.int32 and weight.dim() == 2, op, f"weight must be 2-D int32, got {weight.dtype}")
        _require(weight.is_contiguous(), op, "weight must be contiguous")
        _require(weight.shape[-1] % 8 == 0, op, f"last dim {weight.shape[-1]} must be a multiple of 8")
        _require(bool((weight >= -8).all() and (weight <= 7).all()), op, "values outside int4 [-8, 7]")
        nibbles = (weight & 0xF).to(torch.int64).view(weight.shape[0], -1, 8)
        packed = (nibbles << (4 * torch.arange(8))).sum(-1)
        packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
        self.formats.set(packed, ACL_FORMAT_ND)
        return packed

    @staticmethod
    def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
        nibbles = (packed.to(torch.int64).unsqueeze(-1) >> (4 * torch.arange(8))) & 0xF
        values = torch.where(nibbles >= 8, nibbles - 16, nibbles)
        return values.reshape(packed.shape[0], -1)                       # [k, n]

    def npu_weight_quant_batchmatmul(self, x: torch.Tensor, weight: torch.Tensor,
                                     antiquant_scale: torch.Tensor,
                                     antiquant_offset: torch.Tensor | None = None,
                                     quant_scale: torch.Tensor | None = None,
                                     quant_offset: torch.Tensor | None = None,
                                     bias: torch.Tensor | None = None, antiquant_group_size: int = 0,
                                     inner_precise: int = 0) -> torch.Tensor:
        """y = x @ ((weight + antiquant_offset) * antiquant_scale) + bias, weight [k, n] int8
        or int32 [k, n / 8] packed int4. antiquant_group_size 0: per-channel scale/offset [n]
        (or [1, n]); g > 0 (per-group, Atlas A2 / A3 only; g a multiple of 32 in [32, k - 1]):
        scale/offset [ceil(k / g), n], row i of the weight taking row i // g. Scale and offset
        in x's dtype. (hiascend PyTorch API "torch_npu.npu_weight_quant_batchmatmul", 6.0.0
        ptaoplist_000862; the group-size range from "torch_npu.contrib.module.LinearWeightQuant".)"""
        op = "npu_weight_quant_batchmatmul"
        self._record(op, x=x, weight=weight, antiquant_scale=antiquant_scale,
                     antiquant_offset=antiquant_offset, bias=bias)
        _require(x.dtype in FLOAT_ACTS and x.dim() == 2, op, f"x must be 2-D float16/bfloat16, got {x.dtype}")
        _require(weight.dtype in (torch.int8, torch.int32), op,
                 f"weight dtype {weight.dtype} (int8 or int4-packed int32)")
        _require(quant_scale is None and quant_offset is None, op,
                 "only antiquant without output quantization is emulated")
        w = weight.long() if weight.dtype == torch.int8 else self._unpack_int4(weight)   # [k, n]
        k, n = w.shape
        _require(k == x.shape[1], op, f"x {list(x.shape)} @ weight [k, n] = {list(w.shape)}")
        rows = self._antiquant_rows(op, k, antiquant_group_size)                      # [k] scale row of each k
        for name, t in (("antiquant_scale", antiquant_scale), ("antiquant_offset", antiquant_offset)):
            if t is not None:
                _require(t.dtype == x.dtype, op, f"{name} dtype {t.dtype} must equal x dtype {x.dtype}")
                if antiquant_group_size:
                    _require(tuple(t.shape) == (int(rows[-1]) + 1, n), op,
                             f"{name} shape {list(t.shape)} (per group [ceil(k / g), n] = "
                             f"[{int(rows[-1]) + 1}, {n}])")
                else:
                    _require(t.numel() == n and t.shape[-1] == n, op, f"{name} shape {list(t.shape)} (per channel [n])")
        if bias is not None:
            want = torch.float32 if x.dtype == torch.bfloat16 else torch.float16
            _require(bias.dtype == want, op, f"bias dtype {bias.dtype} with x {x.dtype} (needs {want})")
        wf = w.float()
        if antiquant_offset is not None:
            wf = wf + antiquant_offset.float().reshape(-1, n)[rows]
        wf = wf * antiquant_scale.float().reshape(-1, n)[rows]
        out = x.float() @ wf
        if bias is not None:
            out = out + bias.float()
        return out.to(x.dtype)

    def _antiquant_rows(self, op: str, k: int, group_size: int) -> torch.Tensor:
        """[k] index of the antiquant row each weight row uses (all 0 per-channel)."""
        if not group_size:
            return torch.zeros(k, dtype=torch.long)
        _require(not self.is_310p, op, "per-group antiquant is not supported on 310P (per-channel only)")
        _require(group_size % 32 == 0 and 32 <= group_size <= k - 1, op,
                 f"antiquant_group_size {group_size} must be a multiple of 32 in [32, k - 1] (k={k})")
        return torch.arange(k) // group_size

    # -- norms, activation, rotary
    def npu_rms_norm(self, x: torch.Tensor, gamma: torch.Tensor,
                     epsilon: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
        """(x * rstd * gamma, rstd), rstd = 1 / sqrt(mean(x^2) + eps) over the last dim."""
        op = "npu_rms_norm"
        self._record(op, x=x, gamma=gamma)
        _require(x.dtype in (torch.float32, *FLOAT_ACTS), op, f"x dtype {x.dtype}")
        _require(gamma.dtype == x.dtype and gamma.shape == x.shape[-1:], op,
                 f"gamma must be {x.dtype} [{x.shape[-1]}], got {gamma.dtype} {list(gamma.shape)}")
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + epsilon)
        return (xf * rstd * gamma.float()).to(x.dtype), rstd

    def npu_add_rms_norm(self, x1: torch.Tensor, x2: torch.Tensor, gamma: torch.Tensor,
                         epsilon: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rms_norm(x1 + x2) * gamma, rstd, x1 + x2)."""
        op = "npu_add_rms_norm"
        self._record(op, x1=x1, x2=x2, gamma=gamma)
        _require(x1.dtype == x2.dtype == gamma.dtype, op, f"dtypes {x1.dtype}/{x2.dtype}/{gamma.dtype} differ")
        _require(x1.shape == x2.shape, op, f"shapes {list(x1.shape)} and {list(x2.shape)} differ")
        total = x1.float() + x2.float()
        rstd = torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + epsilon)
        return (total * rstd * gamma.float()).to(x1.dtype), rstd, total.to(x1.dtype)

    def npu_add_rms_norm_quant(self, x1: torch.Tensor, x2: torch.Tensor, gamma: torch.Tensor,
                               scales1: torch.Tensor, zero_points1: torch.Tensor | None = None,
                               beta: torch.Tensor | None = None, scales2: torch.Tensor | None = None,
                               zero_points2: torch.Tensor | None = None, axis: int = -1,
                               epsilon: float = 1e-6, div_mode: bool = True
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """y = rms_norm(x1 + x2) * gamma (fp32); y1 = round(y / scales1 + zero_points1) int8
        (div_mode; y * scales1 otherwise); returns (y1, y2 (unused, zeros), x1 + x2)."""
        op = "npu_add_rms_norm_quant"
        self._record(op, x1=x1, x2=x2, gamma=gamma, scales1=scales1, zero_points1=zero_points1)
        _require(x1.dtype == x2.dtype == gamma.dtype and x1.dtype in FLOAT_ACTS, op,
                 f"x1/x2/gamma must share float16/bfloat16, got {x1.dtype}/{x2.dtype}/{gamma.dtype}")
        _require(scales2 is None and zero_points2 is None and beta is None, op,
                 "scales2/zero_points2/beta must be None")
        _require(axis == -1, op, "axis must be -1")
        k = x1.shape[-1]
        _require(scales1.dtype in (torch.float32, x1.dtype) and tuple(scales1.shape) == (k,), op,
                 f"scales1 must be float32 or {x1.dtype} [{k}], got {scales1.dtype} {list(scales1.shape)}")
        _require(zero_points1 is None or (zero_points1.dtype in (torch.int32, torch.float32, x1.dtype)
                                          and tuple(zero_points1.shape) == (k,)), op,
                 "zero_points1 must be int32/float32/input dtype [k]")
        total = x1.float() + x2.float()
        y = total * torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + epsilon) * gamma.float()
        y = y / scales1.float() if div_mode else y * scales1.float()
        if zero_points1 is not None:
            y = y + zero_points1.float()
        y1 = torch.round(y).clamp(-128, 127).to(torch.int8)
        return y1, torch.zeros_like(y1), total.to(x1.dtype)

    def npu_swiglu(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """a, b = x.chunk(2, dim); silu(a) * b."""
        op = "npu_swiglu"
        self._record(op, x=x)
        _require(x.dtype in (torch.float32, *FLOAT_ACTS), op, f"x dtype {x.dtype}")
        _require(x.shape[dim] % 2 == 0, op, f"dim {dim} of size {x.shape[dim]} is odd")
        a, b = x.float().chunk(2, dim=dim)
        return (F.silu(a) * b).to(x.dtype)

    def npu_rotary_mul(self, input: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor,
                       rotary_mode: str = "half") -> torch.Tensor:
        """x * r1 + rotate_half(x) * r2, rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])."""
        op = "npu_rotary_mul"
        self._record(op, input=input, r1=r1, r2=r2)
        _require(input.dim() == 4 and r1.dim() == 4 and r2.dim() == 4, op, "input, r1 and r2 must be 4-D")
        _require(r1.dtype == r2.dtype == input.dtype, op, f"r1/r2 dtype must equal input dtype {input.dtype}")
        _require(rotary_mode == "half", op, f"rotary_mode {rotary_mode!r}")
        _require(input.shape[-1] % 2 == 0 and r1.shape[-1] == input.shape[-1], op, "head_dim mismatch")
        x = input.float()
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return (x * r1.float() + rotated * r2.float()).to(input.dtype)

    # -- KV cache and attention
    def _npu_reshape_and_cache(self, key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                               value_cache: torch.Tensor, slot_indices: torch.Tensor) -> None:
        """key/value [T, Hkv, D] -> caches [num_blocks, block_size, Hkv, D] at flat slots."""
        op = "_npu_reshape_and_cache"
        self._record(op, key=key, value=value, key_cache=key_cache, slot_indices=slot_indices)
        _require(slot_indices.dtype == torch.int32, op, f"slot_indices must be int32, got {slot_indices.dtype}")
        _require(key.dtype == key_cache.dtype and value.dtype == value_cache.dtype, op,
                 f"key {key.dtype} / cache {key_cache.dtype} dtypes differ")
        _require(key.shape[1:] == key_cache.shape[2:] and key.shape == value.shape, op,
                 f"key {list(key.shape)} does not fit cache {list(key_cache.shape)}")
        _require(key_cache.is_contiguous() and value_cache.is_contiguous(), op, "caches must be contiguous")
        slots = slot_indices.long()
        key_cache.view(-1, *key.shape[1:])[slots] = key
        value_cache.view(-1, *value.shape[1:])[slots] = value

    def npu_fused_infer_attention_score(self, query: torch.Tensor, key: torch.Tensor,
                                        value: torch.Tensor, *, atten_mask: torch.Tensor | None = None,
                                        actual_seq_lengths: list[int] | None = None,
                                        actual_seq_lengths_kv: list[int] | None = None,
                                        block_table: torch.Tensor | None = None, num_heads: int = 1,
                                        scale: float = 1.0, input_layout: str = "BSH",
                                        num_key_value_heads: int = 0, sparse_mode: int = 0,
                                        block_size: int = 0, key_antiquant_scale: torch.Tensor | None = None,
                                        key_antiquant_offset: torch.Tensor | None = None,
                                        value_antiquant_scale: torch.Tensor | None = None,
                                        value_antiquant_offset: torch.Tensor | None = None,
                                        key_antiquant_mode: int = 0, value_antiquant_mode: int = 0,
                                        **unused: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Paged attention, TND layout: query [T, N, D] with cumulative query lengths, key/value
        [num_blocks, block_size, Hkv * D] gathered through block_table [B, max_blocks] int32.
        sparse_mode 3 (rightDownCausal): query i of a sequence with q_len Q and kv_len L sees
        keys j <= L - Q + i; the mask must be the optimised 2048 x 2048 upper triangle.
        int8 key/value (C8): dequantized per channel (mode 0) as (q + antiquant_offset) *
        antiquant_scale, scale/offset [1] or [Hkv * D]."""
        self._record("npu_fused_infer_attention_score", query=query, key=key, block_table=block_table,
                     atten_mask=atten_mask)
        return self._fia(query, key, value, atten_mask=atten_mask, actual_seq_lengths=actual_seq_lengths,
                         actual_seq_lengths_kv=actual_seq_lengths_kv, block_table=block_table,
                         num_heads=num_heads, scale=scale, input_layout=input_layout,
                         num_key_value_heads=num_key_value_heads, sparse_mode=sparse_mode,
                         block_size=block_size, key_antiquant_scale=key_antiquant_scale,
                         key_antiquant_offset=key_antiquant_offset,
                         value_antiquant_scale=value_antiquant_scale,
                         value_antiquant_offset=value_antiquant_offset,
                         key_antiquant_mode=key_antiquant_mode, value_antiquant_mode=value_antiquant_mode,
                         **unused)

    def npu_fused_infer_attention_score_out(self, query: torch.Tensor, key: torch.Tensor,
                                            value: torch.Tensor, *, workspace: torch.Tensor | None = None,
                                            out: list[torch.Tensor] | tuple[torch.Tensor, ...] | None = None,
                                            **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """`torch_npu.npu_fused_infer_attention_score.out`: the same attention written into
        out = [attention_out, softmax_lse] (what a captured graph and its task-group updates
        keep), with the workspace from _npu_fused_infer_attention_score_get_max_workspace."""
        op = "npu_fused_infer_attention_score.out"
        self._record(op, query=query, key=key, block_table=kwargs.get("block_table"),
                     atten_mask=kwargs.get("atten_mask"), workspace=workspace)
        _require(isinstance(workspace, torch.Tensor) and any(w is workspace for w in self._workspaces), op,
                 "workspace must come from _npu_fused_infer_attention_score_get_max_workspace")
        _require(isinstance(out, (list, tuple)) and len(out) == 2
                 and all(isinstance(t, torch.Tensor) for t in out), op, "out must be [attention_out, softmax_lse]")
        _require(out[0].shape == query.shape and out[0].dtype == query.dtype, op,
                 f"out[0] must be {query.dtype}{list(query.shape)}, got {out[0].dtype}{list(out[0].shape)}")
        result, _ = self._fia(query, key, value, **kwargs)
        out[0].copy_(result)
        out[1].zero_()                      # softmax_lse is not emulated (softmax_lse_flag False)
        return out[0], out[1]

    def _npu_fused_infer_attention_score_get_max_workspace(self, query: torch.Tensor, key: torch.Tensor,
                                                           value: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """The workspace .out needs for these shapes and any sequence lengths (a byte buffer)."""
        op = "_npu_fused_infer_attention_score_get_max_workspace"
        self._record(op, query=query, key=key)
        self._check_fia_args(op, query, key, value, **kwargs)
        workspace = torch.empty(1 << 12, dtype=torch.uint8)
        self._workspaces.append(workspace)
        return workspace

    def _check_fia_args(self, op: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                        atten_mask: torch.Tensor | None = None, actual_seq_lengths: list[int] | None = None,
                        actual_seq_lengths_kv: list[int] | None = None,
                        block_table: torch.Tensor | None = None, num_heads: int = 1, scale: float = 1.0,
                        input_layout: str = "BSH", num_key_value_heads: int = 0, sparse_mode: int = 0,
                        block_size: int = 0, key_antiquant_scale: torch.Tensor | None = None,
                        key_antiquant_offset: torch.Tensor | None = None,
                        value_antiquant_scale: torch.Tensor | None = None,
                        value_antiquant_offset: torch.Tensor | None = None,
                        key_antiquant_mode: int = 0, value_antiquant_mode: int = 0, **unused: Any) -> None:
        _require(not self.is_310p, op, "not supported on 310P (Atlas inference series)")
        self._check_fia(query, key, value, atten_mask, actual_seq_lengths, actual_seq_lengths_kv,
                        block_table, num_heads, input_layout, num_key_value_heads, sparse_mode,
                        block_size, unused)

    def _fia(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
             atten_mask: torch.Tensor | None = None, actual_seq_lengths: list[int] | None = None,
             actual_seq_lengths_kv: list[int] | None = None, block_table: torch.Tensor | None = None,
             num_heads: int = 1, scale: float = 1.0, input_layout: str = "BSH",
             num_key_value_heads: int = 0, sparse_mode: int = 0, block_size: int = 0,
             key_antiquant_scale: torch.Tensor | None = None, key_antiquant_offset: torch.Tensor | None = None,
             value_antiquant_scale: torch.Tensor | None = None,
             value_antiquant_offset: torch.Tensor | None = None, key_antiquant_mode: int = 0,
             value_antiquant_mode: int = 0, **unused: Any) -> tuple[torch.Tensor, torch.Tensor]:
        op = "npu_fused_infer_attention_score"
        _require(not self.is_310p, op, "not supported on 310P (Atlas inference series)")
        self._check_fia(query, key, value, atten_mask, actual_seq_lengths, actual_seq_lengths_kv,
                        block_table, num_heads, input_layout, num_key_value_heads, sparse_mode,
                        block_size, unused)
        kv_heads = num_key_value_heads or num_heads
        head_dim = query.shape[-1]
        if key.dtype == torch.int8:
            _require(key_antiquant_mode == 0 and value_antiquant_mode == 0, op, "only per-channel antiquant (mode 0)")
            key = self._antiquant(op, key, key_antiquant_scale, key_antiquant_offset, query.dtype)
            value = self._antiquant(op, value, value_antiquant_scale, value_antiquant_offset, query.dtype)
        out = torch.empty_like(query)
        starts = [0, *actual_seq_lengths[:-1]]
        for b, (start, end, kv_len) in enumerate(zip(starts, actual_seq_lengths, actual_seq_lengths_kv)):
            num_blocks = -(-kv_len // block_size)
            blocks = block_table[b, :num_blocks].long()
            k = key[blocks].reshape(-1, kv_heads, head_dim)[:kv_len].float()     # [L, Hkv, D]
            v = value[blocks].reshape(-1, kv_heads, head_dim)[:kv_len].float()
            q = query[start:end].float()                                          # [Q, N, D]
            k = k.repeat_interleave(num_heads // kv_heads, dim=1)
            v = v.repeat_interleave(num_heads // kv_heads, dim=1)
            scores = torch.einsum("qnd,knd->nqk", q, k) * scale                  # [N, Q, L]
            q_len = end - start
            visible = torch.arange(kv_len).view(1, -1) <= (kv_len - q_len + torch.arange(q_len)).view(-1, 1)
            scores = scores.masked_fill(~visible, float("-inf"))
            out[start:end] = torch.einsum("nqk,knd->qnd", scores.softmax(-1), v).to(query.dtype)
        return out, torch.zeros(1, dtype=torch.float32)

    @staticmethod
    def _antiquant(op: str, cache: torch.Tensor, scale: torch.Tensor | None, offset: torch.Tensor | None,
                   dtype: torch.dtype) -> torch.Tensor:
        _require(scale is not None, op, "an int8 key/value needs key/value_antiquant_scale")
        hidden = cache.shape[-1]
        for name, t in (("scale", scale), ("offset", offset)):
            if t is not None:
                _require(t.dim() == 1 and t.shape[0] in (1, hidden), op, f"antiquant {name} shape {list(t.shape)}")
                _require(t.dtype in (torch.float32, *FLOAT_ACTS), op, f"antiquant {name} dtype {t.dtype}")
        x = cache.float() if offset is None else cache.float() + offset.float()
        return (x * scale.float()).to(dtype)

    def _check_fia(self, query, key, value, atten_mask, q_lens, kv_lens, block_table, num_heads,  # noqa: ANN001
                   input_layout, num_kv_heads, sparse_mode, block_size, unused) -> None:
        op = "npu_fused_infer_attention_score"
        _require(not any(v is not None for v in unused.values()), op,
                 f"arguments not emulated: {sorted(k for k, v in unused.items() if v is not None)}")
        _require(input_layout == "TND", op, f"only input_layout TND is emulated, got {input_layout!r}")
        _require(query.dtype in FLOAT_ACTS and query.is_contiguous(), op,
                 f"query must be contiguous float16/bfloat16, got {query.dtype}")
        _require(key.dtype == value.dtype and key.dtype in (query.dtype, torch.int8), op,
                 f"key/value dtype {key.dtype} / {value.dtype} with query {query.dtype}")
        _require(query.dim() == 3 and query.shape[1] == num_heads, op,
                 f"query {list(query.shape)} is not [T, {num_heads}, D]")
        kv_heads = num_kv_heads or num_heads
        _require(num_heads % kv_heads == 0 and num_heads // kv_heads <= 64, op,
                 f"num_heads {num_heads} / num_key_value_heads {kv_heads}")
        _require(block_table is not None and block_table.dtype == torch.int32, op, "block_table must be int32")
        _require(key.dim() == 3 and key.shape[1] == block_size and key.shape[2] == kv_heads * query.shape[2], op,
                 f"paged key must be [num_blocks, {block_size}, {kv_heads * query.shape[2]}], got {list(key.shape)}")
        _require(isinstance(q_lens, list) and isinstance(kv_lens, list), op,
                 "actual_seq_lengths / actual_seq_lengths_kv are host int lists")
        _require(len(q_lens) == len(kv_lens) == block_table.shape[0], op, "batch sizes differ")
        _require(q_lens[-1] == query.shape[0] and all(a <= b for a, b in zip([0, *q_lens], q_lens)), op,
                 f"TND actual_seq_lengths must be cumulative and end at T={query.shape[0]}")
        _require(sparse_mode in (0, 3), op, f"sparse_mode {sparse_mode} is not emulated")
        if sparse_mode == 3:
            _require(atten_mask is not None and tuple(atten_mask.shape) == (MASK_SIZE, MASK_SIZE), op,
                     f"sparse_mode 3 needs the optimised {MASK_SIZE}x{MASK_SIZE} mask")
            _require(atten_mask.dtype in (torch.bool, torch.int8, torch.uint8), op, f"mask dtype {atten_mask.dtype}")
            expect = torch.ones(MASK_SIZE, MASK_SIZE, dtype=torch.bool).triu(1)
            _require(bool((atten_mask.bool() == expect).all()), op, "mask must be the strict upper triangle")
        else:
            _require(all(b - a == 1 for a, b in zip([0, *q_lens], q_lens)), op,
                     "sparse_mode 0 without mask is decode only (one query per sequence)")

    # -- MoE
    def npu_grouped_matmul(self, x: list[torch.Tensor], weight: list[torch.Tensor], *,
                           bias: list[torch.Tensor] | None = None, group_list: torch.Tensor | None = None,
                           split_item: int = 0, group_type: int | None = None,
                           group_list_type: int = 0, output_dtype: torch.dtype | None = None,
                           **unused: Any) -> list[torch.Tensor]:
        """One x [M, k] (rows sorted by expert), weight [E, k, n]; group_list_type 0: cumulative
        row ends per expert (int64), 1: row counts. split_item 2/3: one output [M, n]."""
        quant = {k: v for k, v in unused.items() if v is not None}
        if quant:
            return self._quant_grouped_matmul(x, weight, bias=bias, group_list=group_list, split_item=split_item,
                                              group_type=group_type, group_list_type=group_list_type,
                                              output_dtype=output_dtype, **quant)
        op = "npu_grouped_matmul"
        self._record(op, x=x[0], weight=weight[0], group_list=group_list)
        _require(len(x) == 1 and len(weight) == 1 and weight[0].dim() == 3, op,
                 "one x and one [E, k, n] weight are emulated")
        _require(split_item in (2, 3) and group_type == 0, op, f"split_item {split_item}, group_type {group_type}")
        _require(not any(v is not None for v in unused.values()), op, "quantized grouped matmul is not emulated")
        xs, w = x[0], weight[0]
        _require(xs.dtype in FLOAT_ACTS and w.dtype == xs.dtype, op, f"x {xs.dtype} / weight {w.dtype}")
        _require(group_list is not None and group_list.dtype == torch.int64 and group_list.shape == (w.shape[0],), op,
                 f"group_list must be int64 [{w.shape[0]}]")
        counts = group_list if group_list_type == 1 else torch.diff(group_list, prepend=group_list.new_zeros(1))
        _require(bool((counts >= 0).all()) and int(counts.sum()) <= xs.shape[0], op, "group_list exceeds x rows")
        expert = _row_experts(counts, xs.shape[0])
        out = torch.zeros(xs.shape[0], w.shape[2], dtype=torch.float32)
        for e in range(w.shape[0]):          # group sizes stay on the device (graph-safe)
            y = xs.float() @ w[e].float()
            if bias is not None:
                y = y + bias[0][e].float()
            out = torch.where((expert == e).unsqueeze(1), y, out)
        return [out.to(output_dtype or xs.dtype)]

    # -- MoE, quantized npu_grouped_matmul (torch_npu docs, group_list as a Tensor, Atlas A2/A3 table)
    def _quant_grouped_matmul(self, x: list[torch.Tensor], weight: list[torch.Tensor], *,
                              bias: list[torch.Tensor] | None, group_list: torch.Tensor | None,
                              split_item: int, group_type: int | None, group_list_type: int,
                              output_dtype: torch.dtype | None, scale: list[torch.Tensor] | None = None,
                              per_token_scale: list[torch.Tensor] | None = None,
                              antiquant_scale: list[torch.Tensor] | None = None,
                              antiquant_offset: list[torch.Tensor] | None = None,
                              **rest: Any) -> list[torch.Tensor]:
        """Single x [M, k], single weight [E, k, n] (m-axis groups, split_item 2/3):
        - pertoken int8: x, weight int8; y = (x @ w_e) * scale[e] * per_token_scale[rows]; scale
          [E, n] bfloat16 -> bfloat16 output, float32 -> float16 output; per_token_scale float32 [M];
        - pseudo-quant: x float16/bfloat16, weight int8 [E, k, n] or int4 packed eight per int32
          (int32 [E, k, n / 8]); y = x @ ((w_e + antiquant_offset[e]) * antiquant_scale[e]);
          antiquant_scale / offset [E, n] in x's dtype (per channel; per-group is not emulated).
        310P takes none of these (float16 only)."""
        op = "npu_grouped_matmul"
        self._record(op, x=x[0], weight=weight[0], group_list=group_list,
                     scale=None if scale is None else scale[0],
                     per_token_scale=None if per_token_scale is None else per_token_scale[0],
                     antiquant_scale=None if antiquant_scale is None else antiquant_scale[0])
        _require(not self.is_310p, op, "310P (Atlas inference series): scale / per_token_scale / "
                 "antiquant_scale must be None (float16 only)")
        _require(not rest, op, f"arguments not emulated: {sorted(rest)}")
        _require(bias is None, op, "bias with quantized grouped matmul is not emulated")
        _require(len(x) == 1 and len(weight) == 1 and weight[0].dim() == 3 and x[0].dim() == 2, op,
                 "one x [M, k] and one [E, k, n] weight are emulated")
        _require(split_item in (2, 3) and group_type == 0, op, f"split_item {split_item}, group_type {group_type}")
        _require(group_list_type in (0, 1), op, f"group_list_type {group_list_type}")
        xs, w = x[0], weight[0]
        num_experts = w.shape[0]
        _require(group_list is not None and group_list.dtype == torch.int64 and group_list.shape == (num_experts,),
                 op, f"group_list must be int64 [{num_experts}]")
        counts = group_list if group_list_type == 1 else torch.diff(group_list, prepend=group_list.new_zeros(1))
        _require(bool((counts >= 0).all()) and int(counts.sum()) == xs.shape[0], op,
                 f"group_list must cover exactly x's {xs.shape[0]} rows")
        if antiquant_scale is not None:
            _require(scale is None and per_token_scale is None, op, "antiquant_scale with scale/per_token_scale")
            w_float, out_dtype = self._antiquant_experts(xs, w, antiquant_scale, antiquant_offset, output_dtype)
            row_scale = None
        else:
            w_float, out_dtype, row_scale = self._pertoken_experts(xs, w, scale, per_token_scale, output_dtype)
        _require(w_float.shape[1] == xs.shape[1], op, f"x {list(xs.shape)} @ weight [E, k, n] {list(w_float.shape)}")
        expert = _row_experts(counts, xs.shape[0])
        out = torch.zeros(xs.shape[0], w_float.shape[2], dtype=torch.float64)
        for e in range(num_experts):         # group sizes stay on the device (graph-safe)
            out = torch.where((expert == e).unsqueeze(1), xs.double() @ w_float[e], out)
        if row_scale is not None:
            out = out.float() * row_scale.float().unsqueeze(-1)
        return [out.float().to(out_dtype)]

    def _pertoken_experts(self, xs: torch.Tensor, w: torch.Tensor, scale: list[torch.Tensor] | None,
                          per_token_scale: list[torch.Tensor] | None, output_dtype: torch.dtype | None
                          ) -> tuple[torch.Tensor, torch.dtype, torch.Tensor | None]:
        """int8 codes [E, k, n] as float64 (exact int32 accumulation) with the scale folded in
        per column (exact: the integer sum is formed first, then scaled), output dtype, row scales."""
        op = "npu_grouped_matmul"
        _require(xs.dtype == torch.int8 and w.dtype == torch.int8, op,
                 f"quantized x/weight must be int8, got {xs.dtype}/{w.dtype}")
        _require(scale is not None and len(scale) == 1, op,
                 "int8 x needs one scale tensor (int32 output is not emulated)")
        s = scale[0]
        num_experts, n = w.shape[0], w.shape[2]
        _require(s.dtype in (torch.bfloat16, torch.float32), op,
                 f"scale dtype {s.dtype}: pertoken/perchannel take bfloat16 or float32 (int64 int8-output "
                 f"is not emulated)")
        _require(tuple(s.shape) == (num_experts, n), op, f"scale shape {list(s.shape)} (expected [{num_experts}, {n}])")
        want = torch.bfloat16 if s.dtype == torch.bfloat16 else torch.float16
        _require(output_dtype == want, op, f"scale {s.dtype} needs output_dtype {want}, got {output_dtype}")
        row_scale = None
        if per_token_scale is not None:
            _require(len(per_token_scale) == 1, op, "one per_token_scale tensor")
            row_scale = per_token_scale[0]
            _require(row_scale.dtype == torch.float32 and tuple(row_scale.shape) == (xs.shape[0],), op,
                     f"per_token_scale must be float32 [{xs.shape[0]}], got {row_scale.dtype} {list(row_scale.shape)}")
        # (x @ w_e) * scale_e == x @ (w_e * scale_e) column-wise; float64 keeps the int32 sum exact
        return w.double() * s.double().unsqueeze(1), want, row_scale

    def _antiquant_experts(self, xs: torch.Tensor, w: torch.Tensor, antiquant_scale: list[torch.Tensor],
                           antiquant_offset: list[torch.Tensor] | None, output_dtype: torch.dtype | None
                           ) -> tuple[torch.Tensor, torch.dtype]:
        """(codes + offset) * scale as [E, k, n] (float32 values, float64 storage) and the output dtype."""
        op = "npu_grouped_matmul"
        _require(xs.dtype in FLOAT_ACTS, op, f"pseudo-quant x must be float16/bfloat16, got {xs.dtype}")
        _require(output_dtype in (None, xs.dtype), op, f"output_dtype {output_dtype} with x {xs.dtype}")
        _require(w.dtype in (torch.int8, torch.int32), op,
                 f"pseudo-quant weight dtype {w.dtype} (int8 or int4-in-int32)")
        codes = w.long() if w.dtype == torch.int8 else torch.stack([self._unpack_int4(we) for we in w])
        num_experts, n = codes.shape[0], codes.shape[2]
        if w.dtype == torch.int32:
            _require(n % 2 == 0, op, f"int4 weight last dim {n} must be even")
        wf = codes.float()
        for name, t in (("antiquant_scale", antiquant_scale), ("antiquant_offset", antiquant_offset)):
            if t is None:
                continue
            _require(len(t) == 1, op, f"one {name} tensor")
            _require(t[0].dtype == xs.dtype, op, f"{name} dtype {t[0].dtype} must equal x dtype {xs.dtype}")
            _require(tuple(t[0].shape) == (num_experts, n), op,
                     f"{name} shape {list(t[0].shape)} (per channel [{num_experts}, {n}])")
        if antiquant_offset is not None:
            wf = wf + antiquant_offset[0].float().unsqueeze(1)
        wf = wf * antiquant_scale[0].float().unsqueeze(1)
        return wf.double(), xs.dtype


def _row_experts(counts: torch.Tensor, num_rows: int) -> torch.Tensor:
    """[num_rows] expert of each row from per-expert row counts, computed on the device (the
    kernel reads group_list on the device, so a captured graph sees each replay's groups);
    rows past the last group get E (no expert)."""
    ends = torch.cumsum(counts, 0)
    return torch.searchsorted(ends, torch.arange(num_rows, device=counts.device), right=True)


def install_fake_torch_npu(monkeypatch: pytest.MonkeyPatch, soc: str = "Ascend910B1") -> FakeTorchNPU:
    """Insert a fresh FakeTorchNPU as `torch_npu` and `torch.npu` (undone by monkeypatch)."""
    fake = FakeTorchNPU(soc)
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    monkeypatch.setattr(torch, "npu", fake.npu, raising=False)
    return fake


@pytest.fixture
def npu_emulation(monkeypatch: pytest.MonkeyPatch) -> FakeTorchNPU:
    """The emulated torch_npu (Atlas A2), installed for one test."""
    return install_fake_torch_npu(monkeypatch)


__all__ = ["ACL_FORMAT_FRACTAL_NZ", "FakeTorchNPU", "NPUArgumentError", "OpCall", "install_fake_torch_npu",
           "npu_emulation"]
