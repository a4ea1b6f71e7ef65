"""The errors a tensor-parallel engine raises when a rank fails."""
from __future__ import annotations


class TensorParallelError(RuntimeError):
    """A tensor-parallel step failed; the ranks may be out of step, so the engine cannot step
    any more (fatal: the server turns unhealthy instead of retrying)."""
    fatal = True


class WorkerDiedError(TensorParallelError):
    """A tensor-parallel rank is gone."""
