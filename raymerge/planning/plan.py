"""The frozen plan: pure data made before any tensor byte moves. Imports nothing of raymerge.

A Plan says, for every output tensor, where its bytes go (shard, offset), which method makes
them and from which operands (an anchor and weighted differences of input tensors), and cuts
every output shard into Items: contiguous byte ranges that a worker produces independently
(they are idempotent).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

HEADER = -1  # Piece.tensor value for the serialized safetensors header of a shard


@dataclass(frozen=True, slots=True)
class InputFile:
    """One input shard file."""

    role: str  # "base", "chat", "cp", ...
    url: str
    size: int
    fingerprint: str  # ETag or mtime, plus the header digest: what resume compares
    version: str = ""  # what reads are pinned to: the ETag (S3, sent as If-Match), the commit sha (Hub), "" (local)


@dataclass(frozen=True, slots=True)
class RowMap:
    """A vocabulary tensor's rows in the output's vocabulary, gathered from inputs' rows
    (planning.vocabulary): each run (row, count, parts) covers output rows [row, row + count):
    parts () zeros; one part (file, byte start, dtype) the rows from there on, in order; several
    (count 1) the mean of those rows, added in turn in the Source's dtype, then divided.
    With `mean_of` (mergekit's pad_to_multiple_of), the runs cover rows [0, mean_of) and every
    row from there on is their mean over each column (ops.gather.ColumnMean)."""

    row_elements: int
    runs: tuple[tuple[int, int, tuple[tuple[int, int, str], ...]], ...]
    mean_of: int | None = None


@dataclass(frozen=True, slots=True)
class Source:
    """Where one input tensor's bytes lie."""

    file: int  # index into Plan.files
    dtype: str  # safetensors dtype name
    start: int  # absolute byte offset in the file
    nbytes: int  # the bytes used: the whole tensor, or the prefix a limited Term reads
    rows: RowMap | None = None  # gathered by row (a tokenizer's vocabulary): its bytes are assembled, `start` unused


@dataclass(frozen=True, slots=True)
class Term:
    """`scale * (a - b)`, or `scale * a` when b is None (a stored vector).

    With `limit`, the term applies to the tensor's first `limit` elements only (the rows all
    inputs share when cp's vocabulary was expanded); the other elements keep the anchor's value.
    """

    scale: float
    a: Source
    b: Source | None
    limit: int | None = None
    values: tuple[tuple[str, float], ...] = ()  # the method's other per-vector parameters for this tensor

    def param(self, name: str, default: float) -> float:
        return next((v for k, v in self.values if k == name), default)

    @property
    def density(self) -> float:
        """The fraction of its elements a sparsifying method (TIES, DARE) keeps: 1.0 unless given."""
        return self.param("density", 1.0)


@dataclass(frozen=True, slots=True)
class RowOverride:
    """Output row `row` is set to `source` (one row of another input), cast to the output dtype."""

    row: int
    source: Source


@dataclass(frozen=True, slots=True)
class TensorPlan:
    """One output tensor: its method (raymerge.methods) applied to the anchor and the terms, in
    float32, rounded once (or, with `compute`, at mergekit's compute dtype); then the override rows."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    shard: int
    start: int  # absolute byte offset in the output shard file
    nbytes: int
    anchor: Source | None  # None: the accumulator starts at zero (extracting a vector)
    terms: tuple[Term, ...]
    overrides: tuple[RowOverride, ...] = ()
    rule: str = "sum"  # why it has these terms: sum, copy, skip, vocab-overlap, vocab-skip, ...
    method: str = "sum"  # the name of its method in raymerge.methods.METHODS
    params: tuple[tuple[str, float | bool], ...] = ()  # the method's parameters, (name, value), for this tensor
    # mergekit's compute dtype ("BF16", "F16"): the inputs are cast to it, the method rounds to it as
    # mergekit does, and the result is cast to `dtype`. None: float32, rounded once to `dtype`.
    compute: str | None = None

    @property
    def is_copy(self) -> bool:
        """True when the output bytes are the anchor's bytes unchanged."""
        return (not self.terms and not self.overrides and self.anchor is not None
                and self.anchor.dtype == self.dtype and self.compute in (None, self.dtype))

    @property
    def row_elements(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def sources(self) -> set[Source]:
        """Every input slice its arithmetic reads: the anchor, the terms' operands, the override rows."""
        found = {self.anchor, *(s for term in self.terms for s in (term.a, term.b)), *(o.source for o in self.overrides)}
        return {s for s in found if s is not None}

    @property
    def dtypes(self) -> set[str]:
        """Every dtype its arithmetic touches."""
        return {self.dtype, *(s.dtype for s in self.sources), *([self.compute] if self.compute else [])}


@dataclass(frozen=True, slots=True)
class Piece:
    """A slice of one tensor inside an item: elements [begin, end). For HEADER: bytes."""

    tensor: int
    begin: int
    end: int


@dataclass(frozen=True, slots=True)
class Item:
    """Bytes [start, end) of one output shard: one unit of work, and one S3 multipart part."""

    id: int
    shard: int
    part: int  # 1-based part number within the shard
    start: int
    end: int
    pieces: tuple[Piece, ...]

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class ShardPlan:
    """One output shard file: its final name, its size, and its exact header bytes."""

    name: str
    size: int
    header: bytes  # 8-byte length prefix + padded JSON
    tensors: tuple[int, ...]
    items: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class AuxFile:
    """A small file written at commit: `source` copied, or merged with `patch_from` (see commit.aux)."""

    name: str
    source: str  # URL
    patch_from: str | None = None  # URL of the chat model's file whose chat template / EOS are taken


@dataclass(frozen=True, slots=True)
class Plan:
    files: tuple[InputFile, ...]
    tensors: tuple[TensorPlan, ...]
    shards: tuple[ShardPlan, ...]
    items: tuple[Item, ...]
    aux_files: tuple[AuxFile, ...]
    hash: str
    # A frankenmerge's layers (planning.slices): per output layer, (role, input layer) of each input
    # it is made from; (): a whole-model merge, every layer from the same layer of every input.
    layers: tuple[tuple[tuple[str, int], ...], ...] = ()
    card: tuple[str, ...] = ()  # the model card and recipe copy the commit writes (commit.card); (): --no-card
    # The output tokenizer's files (a mergekit tokenizer source: planning.vocabulary), written at
    # commit in place of the anchor's, and the vocabulary size config.json then declares.
    tokenizer: tuple[tuple[str, bytes], ...] = ()
    vocab_size: int | None = None
    eos_ids: tuple[int, ...] | None = None  # generation_config's eos_token_id then (the chat model's EOS tokens)

    @property
    def output_bytes(self) -> int:
        return sum(s.size for s in self.shards)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def read_bytes(self) -> int:
        """Bytes of input tensor data the workers read, once each (a source that several operands
        of a tensor share, such as a mergekit recipe's base, is read once)."""
        total = 0
        for t in self.tensors:
            total += sum(s.nbytes for s in t.sources)
        return total
