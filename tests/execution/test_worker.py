"""The worker's start-up: a worker that cannot compute where it was placed fails when it starts,
not at its first item (the pool then says why no worker could start)."""

from __future__ import annotations

import pytest
import torch

from raymerge.config import build_recipe
from raymerge.errors import InputError
from raymerge.execution.worker import MergeWorker
from raymerge.planning.build import make_plan


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_gpu_worker_without_cuda_fails_when_it_starts(llama_trio):
    plan = make_plan(*build_recipe("merge", dict(base=llama_trio["base"], chat=llama_trio["chat"],
                                                 cp=llama_trio["cp"], scale=0.5)))
    with pytest.raises(InputError, match="sees no CUDA GPU"):
        MergeWorker(plan, None, {}, {}, device="cuda")
    MergeWorker(plan, None, {}, {}, device="cpu").close()  # the same plan on the CPU starts


def test_a_worker_without_the_compiled_loops_says_so_and_how_to_build_them(llama_trio, monkeypatch, caplog):
    from raymerge.ops import native

    plan = make_plan(*build_recipe("merge", dict(base=llama_trio["base"], chat=llama_trio["chat"],
                                                 cp=llama_trio["cp"], scale=0.5)))
    worker = MergeWorker(plan, None, {}, {})
    if native.loops is not None:  # built: nothing to say
        with caplog.at_level("WARNING", logger="raymerge"):
            worker.ready()
        assert not [r for r in caplog.records if "compiled loops" in r.getMessage()]
    monkeypatch.setattr(native, "loops", None)
    with caplog.at_level("WARNING", logger="raymerge"):
        worker.ready()
    warned = [r.getMessage() for r in caplog.records if "compiled loops" in r.getMessage()]
    assert len(warned) == 1 and "pip install --no-cache-dir --force-reinstall --no-deps raymerge" in warned[0]
    worker.close()


def test_a_method_with_long_fused_programs_runs_in_wide_chunks():
    """Method.wide_chunks: the thread's scratch for karcher holds the kernel's wide chunk, for a
    linear merge its usual one, each made once and kept for the next item."""
    from raymerge.execution.worker import _ThreadState
    from raymerge.methods import METHODS
    from raymerge.ops.numpy_kernel import CHUNK, NUMPY, WIDE_CHUNK

    st = _ThreadState({})
    wide, usual = st.scratch_for(NUMPY, METHODS["karcher"]), st.scratch_for(NUMPY, METHODS["linear"])
    assert (wide.chunk, usual.chunk) == (WIDE_CHUNK, CHUNK) and WIDE_CHUNK > CHUNK
    assert st.scratch_for(NUMPY, METHODS["multislerp"]) is wide and st.scratch_for(NUMPY, METHODS["ties"]) is usual
