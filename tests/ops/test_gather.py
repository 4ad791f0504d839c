"""Rows gathered by token (ops.gather) against torch: copies cast as `.to()` casts, mean rows as
mergekit's `embed = zeros; embed = embed + row ...; embed /= count` in the gather's dtype."""

from __future__ import annotations

import pytest
import torch

from raymerge.ops import gather
from raymerge.planning.plan import RowMap, Source

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def _model(rows: int, cols: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(rows, cols, generator=g) * torch.logspace(-3, 3, cols)
    t[0, :4] = torch.tensor([-0.0, float("inf"), float("nan"), 65504.0 * 2])  # signed zero, inf, NaN, f16 overflow
    return t.to(dtype)


@pytest.mark.parametrize("into", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("stored", ["BF16", "F32"])
def test_gathered_rows_match_torch(into, stored):
    cols = 24
    models = [_model(10, cols, DTYPES[stored], seed) for seed in (1, 2, 3)]
    files = {m: t.contiguous().view(torch.uint8).numpy().tobytes() for m, t in enumerate(models)}
    size = models[0].element_size()

    def part(m: int, row: int) -> tuple[int, int, str]:
        return m, row * cols * size, stored

    # rows 0-2: model 0's rows 4-6; row 3: zeros; row 4: mean of three; row 5: mean of two; rows 6-7: model 2's 0-1
    runs = ((0, 3, (part(0, 4),)), (3, 1, ()), (4, 1, (part(0, 0), part(1, 0), part(2, 3))),
            (5, 1, (part(1, 9), part(2, 9))), (6, 2, (part(2, 0),)))
    src = Source(0, into, 0, 8 * cols * DTYPES[into].itemsize, RowMap(cols, runs))
    dtype = DTYPES[into]
    cast = [t.to(dtype) for t in models]  # mergekit gathers every model in the file's dtype first
    want = torch.zeros(8, cols, dtype=dtype)
    want[0:3] = cast[0][4:7]
    for r, parts in ((4, [(0, 0), (1, 0), (2, 3)]), (5, [(1, 9), (2, 9)])):
        embed = torch.zeros(cols, dtype=dtype)
        for m, row in parts:
            embed = embed + cast[m][row]
        embed /= len(parts)
        want[r] = embed
    want[6:8] = cast[2][0:2]

    def fetch(file: int, rng: tuple[int, int]) -> memoryview:
        return memoryview(files[file][rng[0]:rng[1]])

    for begin, end in ((0, 8 * cols), (5, 8 * cols - 7), (4 * cols + 3, 4 * cols + 9), (cols - 1, 3 * cols + 1)):
        reads = gather.reads(src, begin, end)
        got = gather.assemble(src, begin, end, lambda f, r: fetch(f, r) if (f, r) in reads else None)
        flat = want.reshape(-1)[begin:end]
        assert bytes(got) == flat.contiguous().view(torch.uint8).numpy().tobytes(), (begin, end)


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("rows,width", [(1, 64), (3, 40), (15, 64), (16, 8), (17, 72), (300, 64), (4097, 200),
                                        (70001, 64), (3001, 48), (2049, 4), (1001, 1000)])
def test_column_mean_is_torch_mean_fed_in_any_chunks(dtype, rows, width):
    """ColumnMean gives torch.mean(x, dim=0)'s bits (torch's order of float32 sums, then one
    rounding), for widths that are and are not multiples of 32, fed any whole steps at a time;
    NaN, inf and -0 columns included."""
    import random

    g = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, width, generator=g) * torch.logspace(-4, 3, width)).to(DTYPES[dtype])
    x[rows // 2, :3] = torch.tensor([float("nan"), float("inf"), -0.0]).to(DTYPES[dtype])
    x[:, width - 1] = -0.0
    want = torch.mean(x, dim=0)
    xs = x.float().numpy()
    rng = random.Random(rows)
    for _ in range(3):
        mean, at = gather.ColumnMean(rows, width), 0
        while at < rows:
            k = mean.step * rng.randint(1, 40)
            mean.add(xs[at:at + k])
            at += k
        assert mean.result(dtype).tobytes() == want.contiguous().view(torch.uint8).numpy().tobytes()


def test_assembled_mean_rows_repeat_the_mean_row_from_any_element():
    """Rows from a map's mean_of on are the mean row, whatever element a range starts at."""
    cols = 5
    rows = torch.arange(3 * cols, dtype=torch.float32).reshape(3, cols)
    data = rows.numpy().tobytes()
    src = Source(0, "F32", 0, 7 * cols * 4, RowMap(cols, ((0, 3, ((0, 0, "F32"),)),), mean_of=3))
    mean = torch.mean(rows, dim=0).numpy()
    want = torch.cat([rows, torch.from_numpy(mean).expand(4, cols)]).reshape(-1)
    for begin, end in ((0, 7 * cols), (3 * cols + 2, 6 * cols + 1), (2 * cols + 4, 3 * cols + 3), (5 * cols, 7 * cols)):
        assert gather.pads(src, end)
        got = gather.assemble(src, begin, end, lambda f, r: memoryview(data)[r[0]:r[1]], mean)
        assert bytes(got) == want[begin:end].numpy().tobytes(), (begin, end)
    assert not gather.pads(src, 3 * cols)
