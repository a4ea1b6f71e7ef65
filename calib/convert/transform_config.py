"""Our `online_hadamard` <-> compressed-tensors' `transform_config` (both directions).

The correspondence (ascend_llm/quant/compressed_tensors_transform.py has the details, from
compressed-tensors 0.19's own code): `online_hadamard: {block_size: b, layers: L}` (the runtime
rotates the inputs of L by blockdiag(H_b), H_b the normalized Sylvester matrix; the stored weights
already hold W @ blockdiag(H_b)) is llm-compressor's SpinQuant R4 form:

    {"config_groups": {"R4": {"type": "hadamard", "head_dim": b, "randomize": false,
      "requires_grad": false, "precision": "torch.float32",
      "apply": [{"targets": L, "location": "input", "inverse": false, "ignore": []},
                {"targets": L, "location": "weight_input", "inverse": true, "ignore": []}]}}}

"input" is the online rotation a loader runs; "weight_input" (offline, inverse) records that the
stored weight already holds the rotation, which no loader applies again (vLLM keeps only online
entries; compressed-tensors' decompression and transformers ignore transform_config). Like
llm-compressor, the +-1 matrix is saved once, as `<first layer>.R4_input.weight` [b, b].
"""
from __future__ import annotations

import torch

from ascend_llm.numerics.hadamard import hadamard_matrix
from ascend_llm.quant.compressed_tensors_transform import OnlineHadamard, check_hadamard_matrix
from calib.config import CalibError

SCHEME = "R4"                    # llm-compressor's name for the online rotation before down_proj
# what loading the written transform_config needs in vLLM (transform/module.py `HadamardTransform`)
VLLM_NOTE = ("vLLM runs the online Hadamard with its CUDA hadacore kernel and refuses online transforms "
             "with tensor_parallel_size > 1; this runtime runs it on every backend and with TP")


def transform_config(online_hadamard: dict) -> dict:
    """compressed-tensors' `transform_config` for our `online_hadamard` {block_size, layers}."""
    layers = sorted(online_hadamard["layers"])
    fused = {"targets": layers, "location": "weight_input", "inverse": True, "ignore": []}
    return {"config_groups": {SCHEME: {
        "type": "hadamard", "head_dim": int(online_hadamard["block_size"]), "randomize": False,
        "requires_grad": False, "precision": "torch.float32",
        "apply": [{"targets": layers, "location": "input", "inverse": False, "ignore": []}, fused]}}}


def transform_tensors(online_hadamard: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The matrix tensor llm-compressor saves with the config: +-1 H_b [b, b] (exact in any float
    dtype), under the first rotated layer (`<layer>.R4_input.weight`)."""
    block = int(online_hadamard["block_size"])
    first = sorted(online_hadamard["layers"])[0]
    signs = hadamard_matrix(block, torch.float64) * block ** 0.5                  # +-1 [b, b]
    return {f"{first}.{SCHEME}_input.weight": signs.round().to(dtype).contiguous()}


def pop_transform_tensors(tensors: dict[str, torch.Tensor], transforms: list[OnlineHadamard]) -> None:
    """Remove (after checking) the `<layer>.<scheme>_input.weight` matrices from `tensors`."""
    for transform in transforms:
        suffix = f".{transform.submodule}.weight"
        for name in [n for n in tensors if n.endswith(suffix)]:
            try:
                check_hadamard_matrix(tensors.pop(name), transform.block_size, name)
            except ValueError as exc:
                raise CalibError(str(exc)) from None


def online_hadamard_from(transforms: list[OnlineHadamard], modules: list[str]) -> dict | None:
    """Our `online_hadamard` for the Linears `modules` the transforms rotate (None if none); one
    block size, as the ascendV1 key holds one."""
    rotated = {m: t for m in modules for t in transforms if t.applies_to(m)}
    if not rotated:
        if transforms:
            raise CalibError(f"transform_config scheme {transforms[0].scheme!r}: its online input "
                             f"targets match no Linear of the checkpoint")
        return None
    blocks = {t.block_size for t in rotated.values()}
    if len(blocks) > 1:
        raise CalibError(f"transform_config: online Hadamard block sizes (head_dim) {sorted(blocks)}; "
                         f"ascendV1's online_hadamard holds one block_size")
    return {"block_size": blocks.pop(), "layers": sorted(rotated)}
