import pytest

from raymerge.planning.plan import HEADER, Piece
from raymerge.planning.layout import Slot, cut_points, layout_shard, pieces_of, split_into_shards


GB = 10**9
WORKED_EXAMPLE = [6 * GB, 6 * GB, 2 * GB, 6 * GB, 2 * GB, 2 * GB]  # the sizes of HF's docstring example, 5 GB shards


def test_split_keeps_consecutive_tensors_per_shard():
    # raymerge's rule (layout.split_into_shards): an oversized tensor closes the open shard.
    assert split_into_shards(WORKED_EXAMPLE, 5 * GB) == \
        [[0], [1], [2], [3], [4, 5]]
    assert split_into_shards([3, 3, 3, 1], 6) == [[0, 1], [2, 3]]
    assert split_into_shards([], 6) == [[]]


def test_hf_splits_the_same_sizes_otherwise():
    # What layout.split_into_shards' docstring and the README say Hugging Face does, checked on
    # the installed huggingface_hub so that the words cannot drift from it.
    hub = pytest.importorskip("huggingface_hub")
    state = {f"t{i}": size for i, size in enumerate(WORKED_EXAMPLE)}
    split = hub.split_state_dict_into_shards_factory(state, get_storage_size=lambda size: size,
                                                      filename_pattern="model{suffix}.safetensors",
                                                      max_shard_size=5 * GB)
    hf = [sorted(int(t[1:]) for t in tensors) for tensors in split.filename_to_tensors.values()]
    assert [[WORKED_EXAMPLE[i] // GB for i in shard] for shard in hf] == [[6], [6], [6], [2, 2], [2]]
    assert hf == [[0], [1], [3], [2, 4], [5]]  # shard 4 takes tensors from both sides of tensor 3
    assert hf != split_into_shards(WORKED_EXAMPLE, 5 * GB)


def test_layout_packs_tensors_after_header():
    header, starts = layout_shard([("a", "F32", (3,), 12), ("b", "BF16", (2, 2), 8)])
    assert len(header) % 8 == 0
    assert starts == [len(header), len(header) + 12]


def test_cuts_round_up_to_element_boundaries():
    # header 16 bytes, then an F32 tensor of 10 elements (40 bytes), then a BF16 tensor of 7 (14 bytes)
    slots = [Slot(16, 40, 4), Slot(56, 14, 2)]
    assert cut_points(70, 16, slots, 10) == [0, 10, 20, 32, 44, 56, 66, 70]
    # every cut lies on an element boundary of the tensor it falls in
    assert cut_points(70, 16, slots, 23) == [0, 24, 48, 70]


def test_pieces_cover_header_and_element_ranges():
    slots = [Slot(16, 40, 4), Slot(56, 14, 2)]
    assert pieces_of(0, 24, 16, slots, first=5) == (Piece(HEADER, 0, 16), Piece(5, 0, 2))
    assert pieces_of(24, 60, 16, slots, first=5) == (Piece(5, 2, 10), Piece(6, 0, 2))
    assert pieces_of(60, 70, 16, slots, first=5) == (Piece(6, 2, 7),)
