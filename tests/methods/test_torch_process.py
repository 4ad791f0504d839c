"""The torch process (methods.torch_process): mergekit's scalars computed with torch in a child
of the driver, which never imports torch itself."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from raymerge.methods import torch_process


def _acos_bits(x: float) -> tuple[str, int]:
    import os

    import torch

    return str(os.getpid()), int(torch.arccos(torch.tensor(x, dtype=torch.bfloat16)).view(torch.int16).item())


def _fails(x: float) -> None:
    raise ValueError(f"no scalar for {x}")


def test_calls_run_in_one_child_that_is_spawned_again_where_it_died():
    import torch

    want = int(torch.arccos(torch.tensor(0.3, dtype=torch.bfloat16)).view(torch.int16).item())
    pid, got = torch_process.call(_acos_bits, 0.3)
    assert got == want and int(pid) != __import__("os").getpid()
    assert torch_process.call(_acos_bits, 0.3)[0] == pid  # the same process, kept
    with pytest.raises(ValueError, match="no scalar for 2.5"):
        torch_process.call(_fails, 2.5)  # its exception, raised here; the process goes on
    assert torch_process.call(_acos_bits, 0.3)[0] == pid
    torch_process._kept["process"].kill()
    torch_process._kept["process"].join()
    again, got = torch_process.call(_acos_bits, 0.3)  # a new process, the same bits
    assert again != pid and got == want


def test_a_driver_that_uses_it_does_not_import_torch():
    code = ("import sys, math\nfrom raymerge.methods import torch_process\n"
            "print(torch_process.call(math.sqrt, 2.0), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == [repr(math.sqrt(2.0)), "False"]
