"""The worker: produce plan items. A plain class; `dispatch` wraps it with `ray.remote`.

Protocol:
  1. Constructed once per actor with the plan, the output URL, storage options, the driver's
     storage settings (credentials, endpoints) and the driver's view of local paths.
  2. `ready()` checks that this node sees the local inputs and the output folder as the driver
     does (execution.nodes), then says the worker is up.
  3. `run(item_id, handle, facts)`, any number of times, from up to `max_concurrency` threads at
     once (so one item is read while another is computed or written): read the item's input ranges
     (coalesced, per file), let each tensor's method compute its piece in float32 (cast once),
     write the bytes at the item's offset of its shard's staged target `handle`. Idempotent:
     running an item twice writes the same bytes to the same place. `facts`: what the statistics
     passes found of the item's tensors (execution.passes), by tensor.
  3'. `stats(item_id, pass_name, facts)`: a statistics pass over the item's pieces that need it;
     reads their vectors' ranges only and returns each piece's small result.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import resource
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from raymerge.execution.nodes import NodeView, check_view, local_inputs
from raymerge.execution.passes import Row
from raymerge.methods import ELEMENTWISE, METHODS, Operands, Vector
from raymerge.ops import gather, native
from raymerge.ops.kernel import Kernel, Scratch, Sums, check_device, kernel_for
from raymerge.planning.passes import statistics_passes, tensor_passes
from raymerge.planning.plan import HEADER, Item, Piece, Plan, Source, TensorPlan
from raymerge.records import ItemRecord, TensorSums
from raymerge.safetensors.dtypes import ITEMSIZE
from raymerge.storage import urls
from raymerge.storage.checksum import crc32
from raymerge.storage.reader import Buffer, RangeReader
from raymerge.storage.writers import BLOCK, Span, Target, open_output

Kept = dict[tuple[int, int], dict[str, Any]]  # (tensor, piece's first element) -> what a pass kept of it

log = logging.getLogger("raymerge")


MEAN_CHUNK = 16 << 20  # bytes of float32 rows a column mean takes at once

# The names of a piece's operands (with an index: which term or override row): see _sources.
ANCHOR, A, B, ROW = "anchor", "a", "b", "row"


@dataclass(frozen=True, slots=True)
class ItemResult:
    record: ItemRecord  # what the driver keeps: checksum, ETag, per-tensor sums
    read_bytes: int
    seconds: float
    worker: str
    peak_rss: int  # bytes, of the worker process so far
    timings: tuple[float, ...] = ()  # seconds reading, computing, writing, checksumming

    @property
    def item(self) -> int:
        return self.record.item


@dataclass(frozen=True, slots=True)
class StatsResult:
    item: int
    pass_name: str
    rows: list[Row]  # per piece: (tensor, first element, the method's result)
    read_bytes: int
    seconds: float
    worker: str
    peak_rss: int
    kept: tuple[KeptName, ...] = ()  # what this pass kept: (tensor, piece's first element, name) each
    spent: tuple[KeptName, ...] = ()  # what earlier passes kept that no pass after this one reads


KeptName = tuple[int, int, str]  # a value a pass kept: its piece (tensor, first element) and its name


def merged(carried: tuple[Kept | None, ...], live: list[list[KeptName]] | None) -> Kept:
    """What an item's earlier passes kept, per piece: the values of each object in `carried` (oldest
    first) that `live` lists for it (all of them where `live` is None), a later object's value of a
    piece's name in place of an earlier one's. Each pass's object holds only what that pass made,
    so a value kept once is not copied again by the passes after it."""
    out: Kept = {}
    for i, kept in enumerate(carried):
        names = {tuple(x) for x in live[i]} if live is not None else None
        for (tensor, begin), values in (kept or {}).items():
            out.setdefault((tensor, begin), {}).update(
                values if names is None else {n: v for n, v in values.items() if (tensor, begin, n) in names})
    return out


class _ThreadState:
    """Per-thread reader, buffers and scratch: reused across items to avoid first-touch faults."""

    def __init__(self, storage_options: dict[str, Any], again: bool = False) -> None:
        self.reader = RangeReader(storage_options, again=again)
        self.inputs: list[Buffer] = []
        self.out = Buffer()
        self.scratch: dict[tuple[Kernel, bool], Any] = {}  # each kernel's scratch, made on first use

    def scratch_for(self, k: Kernel, method: Any) -> Any:
        """k's scratch, of the chunks `method` runs in (Method.wide_chunks)."""
        key = (k, method.wide_chunks)
        if key not in self.scratch:
            self.scratch[key] = k.scratch(wide=method.wide_chunks)
        return self.scratch[key]


class MergeWorker:
    def __init__(self, plan: Plan, out_url: str | None, storage_options: dict[str, Any],
                 env: dict[str, str], threads: int = 1, device: str = "cpu", view: NodeView | None = None,
                 facts: dict[int, Any] | None = None) -> None:
        os.environ.update(env)  # the driver's storage settings, so every node talks to the same stores
        _test_fault("RAYMERGE_TEST_START")  # fault-injection tests: a worker that dies while starting
        self._plan = plan
        self._options = storage_options
        self._threads = max(1, threads)
        self._view = view
        check_device(device)  # a GPU worker without a GPU fails here, at start-up, not at its first item
        # numpy does the arithmetic on the CPU (no torch import: a faster start); torch on a GPU and for FP8
        self._kernels = [kernel_for(device, t.dtypes, self._threads) for t in plan.tensors]
        self._passes = [tensor_passes(t) for t in plan.tensors]
        self._again = bool(statistics_passes(plan))  # the items' inputs are read by more than one pass
        self._facts = facts or {}  # verify's: the facts a manifest recorded
        self._means: dict[Source, Any] = {}  # gathered sources' mean rows (pad_to_multiple_of), once computed
        self._out = open_output(out_url, storage_options) if out_url else None  # None: produce only (verify)
        if self._out is not None:
            self._out.protect(local_inputs(plan))  # as this node sees them: no write may reach an input
        self._local = threading.local()
        self._states: list[_ThreadState] = []
        self._name = f"{socket.gethostname()}:{os.getpid()}"
        self._test_delay = float(os.environ.get("RAYMERGE_TEST_ITEM_DELAY") or 0)

    def ready(self) -> str:
        """Check this node's view of local paths (raises NodeViewError), then report in."""
        if self._view is not None:
            check_view(self._view)
        if native.loops is None:  # Ray shows a worker's warnings in the driver's output
            log.warning("%s: raymerge's compiled loops (raymerge/ops/_native.c) were not built on this node, so "
                        "its statistics passes run numpy's loops (the same bits, 2 to 4 times slower); to build "
                        "them, install a C compiler there and reinstall raymerge without pip's cache (pip "
                        "install --no-cache-dir --force-reinstall --no-deps raymerge, or pip install -e . in a "
                        "checkout)", self._name)
        return self._name

    def _state(self) -> _ThreadState:
        st = getattr(self._local, "state", None)
        if st is None:
            st = self._local.state = _ThreadState(self._options, self._again)
            self._states.append(st)
        return st

    def close(self) -> None:
        """Release every thread's open input files (a worker in a Ray actor ends with its process)."""
        for st in self._states:
            st.reader.close()
        self._states.clear()

    def produce(self, item_id: int, clock: list[float] | None = None, facts: dict[int, Any] | None = None,
                carried: Kept | None = None) -> tuple[memoryview, int, list[TensorSums]]:
        """The item's output bytes (valid until this thread's next item), bytes read, per-tensor sums.
        `clock` gets the seconds spent reading and computing appended; `carried`: what the item's
        statistics passes kept (`merged`)."""
        item = self._plan.items[item_id]
        st = self._state()
        t0 = time.perf_counter()
        inputs, read_bytes = self._read_inputs(item, st, ELEMENTWISE)
        t1 = time.perf_counter()
        # Place the bytes so that file blocks fall on memory pages: direct I/O can write them as they are.
        lead = item.start % BLOCK
        out = st.out.view(lead + item.nbytes)[lead:]
        sums = self._compute(item, inputs, out, st, self._facts if facts is None else facts, carried or {})
        if clock is not None:
            clock += [t1 - t0, time.perf_counter() - t1]
        return out, read_bytes, sums

    def run(self, item_id: int, handle: str, facts: dict[int, Any] | None = None, *carried: Kept | None,
            live: list[list[KeptName]] | None = None) -> ItemResult:
        """Compute and write the item; `carried`, `live`: what its statistics passes kept (`merged`)."""
        t0 = time.perf_counter()
        if self._test_delay:  # fault-injection tests need runs slow enough to be interrupted
            time.sleep(self._test_delay)
        item = self._plan.items[item_id]
        clock: list[float] = []
        out, read_bytes, sums = self.produce(item_id, clock, facts, merged(carried, live))
        t1 = time.perf_counter()
        shard = self._plan.shards[item.shard]
        etag = self._out.write(Target(shard.name, handle, shard.size), Span(item.part, item.start, item.end), out)
        t2 = time.perf_counter()
        crc = crc32(out)
        t3 = time.perf_counter()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return ItemResult(ItemRecord(item_id, crc, etag, tuple(sums)), read_bytes, t3 - t0, self._name, peak,
                          (clock[0], clock[1], t2 - t1, t3 - t2))

    def stats(self, item_id: int, pass_name: str, facts: dict[int, Any]) -> StatsResult:
        """Statistics pass `pass_name` over the item's pieces of tensors that need it."""
        return self.stats_kept(item_id, pass_name, facts, keep=False)[0]

    def stats_kept(self, item_id: int, pass_name: str, facts: dict[int, Any], *carried: Kept | None,
                   live: list[list[KeptName]] | None = None, keep: bool = True) -> tuple[StatsResult, Kept | None]:
        """`stats`, given what the item's earlier passes kept (`carried`, `live`: see `merged`), and
        what this pass keeps for the next ones (Method.keeps; docs/ARCHITECTURE.md: values kept
        between passes): its own values alone, or None; what they are is in the StatsResult."""
        t0 = time.perf_counter()
        if self._test_delay:
            time.sleep(self._test_delay)
        item = self._plan.items[item_id]
        st = self._state()
        given, kept, spent, skipped = merged(carried, live), {}, [], []
        inputs, read_bytes = self._read_inputs(item, st, pass_name, facts, self._maps_only(item, pass_name, facts, given))
        rows: list[Row] = []
        for p, piece in enumerate(item.pieces):
            if not self._needs(piece, pass_name, facts):
                skipped.append(piece)
                continue
            t = self._plan.tensors[piece.tensor]
            k = self._kernels[piece.tensor]
            scratch = st.scratch_for(k, METHODS[t.method])
            new: dict[str, Any] | None = {} if keep and METHODS[t.method].keeps(t) else None
            operands = dataclasses.replace(_operands(p, t, inputs, k, piece.begin, facts.get(piece.tensor), scratch),
                                           carried=given.get((piece.tensor, piece.begin)), keep=new)
            result = METHODS[t.method].statistic(k, pass_name, operands, scratch)
            rows.append((piece.tensor, piece.begin, result))
            spent += [(piece.tensor, piece.begin, name) for name in METHODS[t.method].spends(pass_name)]
            if new:
                kept[(piece.tensor, piece.begin)] = new
        if kept:  # this pass makes an object: the pieces it skips move what they still hold into it
            spent += self._carry(pass_name, skipped, given, kept)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        names = tuple(sorted((tensor, begin, name) for (tensor, begin), values in kept.items() for name in values))
        return (StatsResult(item_id, pass_name, rows, read_bytes, time.perf_counter() - t0, self._name, peak, names,
                            tuple(spent)), kept or None)

    def _carry(self, pass_name: str, skipped: list[Piece], given: Kept, kept: Kept) -> list[KeptName]:
        """Put what the `skipped` pieces were given into `kept`, but for the values the pass would
        have read last (Method.spends): those are spent, and returned. An object is freed only once
        no piece holds a value in it (kept.KeptValues), so a piece that needs no more passes (a
        karcher tensor that converged) would otherwise hold its item's whole objects to the end."""
        spent = []
        for piece in skipped:
            values = given.get((piece.tensor, piece.begin))
            if not values:
                continue
            method = METHODS[self._plan.tensors[piece.tensor].method]
            spends = method.spends(pass_name) if pass_name in self._passes[piece.tensor] else ()  # its own passes'
            spent += [(piece.tensor, piece.begin, name) for name in spends if name in values]
            rest = {name: v for name, v in values.items() if name not in spends}
            if rest:
                kept[(piece.tensor, piece.begin)] = rest
        return spent

    def _needs(self, piece: Piece, pass_name: str, facts: dict[int, Any] | None) -> bool:
        """Whether the piece's tensor needs the pass, given its facts so far (`facts`: a statistics
        pass's; None: the elementwise pass's, which every tensor needs)."""
        if piece.tensor == HEADER or pass_name not in self._passes[piece.tensor]:
            return False
        return facts is None or METHODS[self._plan.tensors[piece.tensor].method].needs(pass_name,
                                                                                       facts.get(piece.tensor))

    def _sources(self, item: Item, pass_name: str, facts: dict[int, Any] | None = None):
        """(piece index, operand key, Source, byte range) of every input slice the item needs in a pass.

        Operand keys name what a slice is: (ANCHOR, 0), (A, j) and (B, j) for term j's a and b,
        (ROW, j) for override row j. A term limited to the tensor's first elements is read only
        up to its limit. A statistics pass reads the terms of the pieces that need it, nothing else.
        """
        stats = pass_name != ELEMENTWISE
        for p, piece in enumerate(item.pieces):
            if not self._needs(piece, pass_name, facts):
                continue
            t = self._plan.tensors[piece.tensor]
            wanted: list[tuple[tuple[str, int], Source | None, int, int]] = [
                ((ANCHOR, 0), None if stats else t.anchor, piece.begin, piece.end)]
            for j, term in enumerate(t.terms):
                end = piece.end if term.limit is None else min(piece.end, term.limit)
                wanted += [((A, j), term.a, piece.begin, end), ((B, j), term.b, piece.begin, end)]
            row = t.row_elements
            for j, o in enumerate(() if stats else t.overrides):
                lo, hi = max(piece.begin, o.row * row), min(piece.end, (o.row + 1) * row)
                wanted.append(((ROW, j), o.source, lo - o.row * row, hi - o.row * row))
            for key, src, begin, end in wanted:
                if src is not None and begin < end:
                    size = ITEMSIZE[src.dtype]
                    # a gathered source (a tokenizer's rows): its element range, assembled after the reads
                    yield p, key, src, (begin, end) if src.rows else (src.start + begin * size, src.start + end * size)

    def _maps_only(self, item: Item, pass_name: str, facts: dict[int, Any], given: Kept) -> bool:
        """Whether no piece of the item reads its inputs in this statistics pass, given what the
        earlier passes kept (Method.reads_inputs): its local inputs are mapped, not read."""
        return not any(self._needs(piece, pass_name, facts) and METHODS[self._plan.tensors[piece.tensor].method]
                       .reads_inputs(pass_name, given.get((piece.tensor, piece.begin)), facts.get(piece.tensor))
                       for piece in item.pieces)

    def _read_inputs(self, item: Item, st: _ThreadState, pass_name: str, facts: dict[int, Any] | None = None,
                     maps_only: bool = False) -> tuple[dict[tuple[int, str, int], memoryview], int]:
        """Each slice a pass needs as a view, keyed by (piece index, *operand key); one read per file
        run, and each range once however many operands name it (a mergekit recipe's base is its
        anchor and every vector's b). `maps_only`: local files are mapped, not read (none counted)."""
        by_file: dict[int, dict[tuple[int, int], list]] = {}
        gathered, scattered = [], set()
        for p, key, src, rng in self._sources(item, pass_name, facts):
            if src.rows:
                gathered.append(((p, *key), src, rng))
                for file, r in gather.reads(src, *rng):
                    by_file.setdefault(file, {}).setdefault(r, [])
                    scattered.add(file)
                continue
            by_file.setdefault(src.file, {}).setdefault(rng, []).append((p, *key))
        while len(st.inputs) < len(by_file):
            st.inputs.append(Buffer())
        raw, total = self._read(st, {file: list(wanted) for file, wanted in by_file.items()}, st.inputs, scattered,
                                maps_only)
        views = {key: raw[(file, *r)] for file, wanted in by_file.items() for r, keys in wanted.items() for key in keys}
        for key, src, (begin, end) in gathered:
            mean = None
            if gather.pads(src, end):
                if src not in self._means:  # the base model's is the anchor's and every b's
                    self._means[src], read = self._column_mean(src, st)
                    total += read
                mean = self._means[src]
            views[key] = gather.assemble(src, begin, end, lambda file, r: raw[(file, *r)], mean)
        return views, total

    def _column_mean(self, src: Source, st: _ThreadState) -> tuple[Any, int]:
        """(the mean row of a gathered source's rows before its mean rows, bytes read): read and
        assembled in order, MEAN_CHUNK bytes at a time, so no worker holds the whole tensor. The
        item holding the mean rows does this once per source (an embedding's last item or two);
        it does not depend on items, so any worker computing it gets the same bits."""
        rows, width = src.rows.mean_of, src.rows.row_elements
        mean = gather.ColumnMean(rows, width)
        step = max(1, MEAN_CHUNK // (width * 4) // mean.step) * mean.step
        bufs: list[Buffer] = []
        total = 0
        for first in range(0, rows, step):
            lo, hi = first * width, min(rows, first + step) * width
            by_file: dict[int, dict[tuple[int, int], None]] = {}
            for file, r in gather.reads(src, lo, hi):
                by_file.setdefault(file, {})[r] = None
            while len(bufs) < len(by_file):  # a chunk's rows lie in few files (a model's, a donor's)
                bufs.append(Buffer())
            raw, read = self._read(st, {file: list(ranges) for file, ranges in by_file.items()}, bufs, set(by_file))
            total += read
            part = gather.assemble(src, lo, hi, lambda file, r: raw[(file, *r)])
            mean.add(gather.as_float32(part, src.dtype).reshape(-1, width))
        return mean.result(src.dtype), total

    def _read(self, st: _ThreadState, by_file: dict[int, list[tuple[int, int]]], bufs: list[Buffer],
              scattered: set[int], maps_only: bool = False) -> tuple[dict[tuple[int, int, int], memoryview], int]:
        """(each range's bytes by (file, start, end), bytes read): one read per file, into the
        file's buffer of `bufs` (in order); a file in `scattered` holds rows gathered by token.
        `maps_only`: a local file is mapped, its pages read only where touched (not counted)."""
        raw, total = {}, 0
        for buf, (file, ranges) in zip(bufs, by_file.items()):
            f = self._plan.files[file]
            got = st.reader.read(f.url, ranges, buf, version=f.version, scattered=file in scattered,
                                 populate=not maps_only)
            local = urls.protocol(f.url) == "file"
            for (lo, hi), mem in zip(ranges, got):
                raw[(file, lo, hi)] = mem
                total += 0 if maps_only and local else hi - lo
        return raw, total

    def _compute(self, item: Item, inputs: dict[tuple[int, str, int], memoryview], out: memoryview,
                 st: _ThreadState, facts: dict[int, Any], carried: Kept) -> list[TensorSums]:
        sums = []
        for p, piece in enumerate(item.pieces):
            if piece.tensor == HEADER:
                out[piece.begin - item.start:piece.end - item.start] = \
                    self._plan.shards[item.shard].header[piece.begin:piece.end]
                continue
            t = self._plan.tensors[piece.tensor]
            size = ITEMSIZE[t.dtype]
            lo = t.start + piece.begin * size - item.start
            dest = out[lo:lo + (piece.end - piece.begin) * size]
            if t.is_copy:
                dest[:] = inputs[(p, ANCHOR, 0)]
                continue
            k = self._kernels[piece.tensor]
            method = METHODS[t.method]
            scratch = st.scratch_for(k, method)
            operands = dataclasses.replace(_operands(p, t, inputs, k, piece.begin, facts.get(piece.tensor), scratch),
                                           carried=carried.get((piece.tensor, piece.begin)))
            s = _apply(method, k, dest, t, operands, scratch)
            nonfinite, new = s.nonfinite, s.new_nonfinite
            if t.overrides:
                more, more_new = self._override_rows(p, piece, t, inputs, dest, k, scratch, operands)
                nonfinite, new = nonfinite + more, new + more_new
            sums.append(TensorSums(piece.tensor, s.ss_delta, s.ss_anchor, nonfinite, new))
        return sums

    def _override_rows(self, p: int, piece: Piece, t: TensorPlan, inputs, dest: memoryview, k, scratch,
                       operands: Operands) -> tuple[int, int]:
        """Special-token rows: the chat model's row, cast once to the output dtype, over what the
        method wrote there. Returns the change to the piece's non-finite counts: the rows' own, less
        the method's over those rows (computed again, into a scratch row, since they are overwritten)."""
        row = t.row_elements
        size = ITEMSIZE[t.dtype]
        method = METHODS[t.method]
        nonfinite = new = 0
        for j, o in enumerate(t.overrides):
            got = inputs.get((p, ROW, j))
            if got is None:
                continue
            lo = max(piece.begin, o.row * row) - piece.begin
            src = k.view(got, o.source.dtype)
            hi = lo + len(src)
            replaced = _apply(method, k, memoryview(bytearray((hi - lo) * size)), t, operands.rows(lo, hi), scratch)
            own = k.weighted_sum(k.view(dest[lo * size:hi * size], t.dtype), src, [], scratch)  # a cast
            nonfinite += own.nonfinite - replaced.nonfinite
            new += own.new_nonfinite - replaced.new_nonfinite
        return nonfinite, new


def _operands(p: int, t: TensorPlan, inputs: dict[tuple[int, str, int], memoryview], k, begin: int,
              facts: Any, scratch: Scratch) -> Operands:
    """Piece p's operands of tensor t (the piece starts at element `begin`), as arrays of kernel k,
    cast to its compute dtype if it has one. A term absent from `inputs` lies past its limit in this
    piece: it has no operands here. An anchor absent from `inputs` is not read in this pass."""
    def operand(key: tuple[int, str, int], dtype: str) -> Any:
        return _at_compute(k, inputs[key], dtype, t.compute, scratch)

    key = (p, ANCHOR, 0)
    anchor = operand(key, t.anchor.dtype) if t.anchor is not None and key in inputs else None
    vectors = []
    for j, term in enumerate(t.terms):
        if (p, A, j) in inputs:
            b = operand((p, B, j), term.b.dtype) if term.b is not None else None
            vectors.append(Vector(term.scale, operand((p, A, j), term.a.dtype), b, j, term.values))
    return Operands(anchor, tuple(vectors), t.params, t.name, begin, facts, t.compute, t.shape)


def _at_compute(k, raw: memoryview, dtype: str, compute: str | None, scratch: Scratch) -> Any:
    """An input's slice as kernel k's array; with a compute dtype (TensorPlan.compute) other than its
    own, cast to it as mergekit casts every input first (torch's conversion: half to even)."""
    if compute is None or dtype == compute:
        return k.view(raw, dtype)
    cast = k.view(memoryview(bytearray(len(raw) // ITEMSIZE[dtype] * ITEMSIZE[compute])), compute)
    k.weighted_sum(cast, k.view(raw, dtype), [], scratch)
    return cast


def _apply(method, k, dest: memoryview, t: TensorPlan, operands: Operands, scratch: Scratch) -> Sums:
    """method.apply into dest (bytes of t.dtype). With a compute dtype other than t.dtype, the method
    writes a buffer of the compute dtype, cast to t.dtype after (mergekit's `.to(out_dtype)`); the
    non-finite outputs are then the cast's, those the cast makes counted as made by the arithmetic.
    A method whose result is float32 whatever the compute dtype (`Method.result_float32`) writes
    dest itself: its one rounding is the cast's."""
    if t.compute is None or t.compute == t.dtype or method.result_float32:
        # a float32 result rounds once to t.dtype as its cast would: no buffer between
        return method.apply(k, k.view(dest, t.dtype), operands, scratch)
    mid = k.view(memoryview(bytearray(len(dest) // ITEMSIZE[t.dtype] * ITEMSIZE[t.compute])), t.compute)
    s = method.apply(k, mid, operands, scratch)
    cast = k.weighted_sum(k.view(dest, t.dtype), mid, [], scratch)
    return s._replace(nonfinite=cast.nonfinite, new_nonfinite=s.new_nonfinite + cast.new_nonfinite)


def _test_fault(var: str) -> None:
    """RAYMERGE_TEST_START=delay:SECONDS or exit: slow or kill a worker while it starts (tests only)."""
    how = os.environ.get(var, "")
    if how.startswith("delay:"):
        time.sleep(float(how[6:]))
    elif how == "exit":
        os._exit(3)
