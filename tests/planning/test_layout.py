from raymerge.planning.plan import HEADER, Piece
from raymerge.planning.layout import Slot, cut_points, layout_shard, pieces_of, split_into_shards


def test_split_follows_hf_worked_example():
    gb = 10**9
    assert split_into_shards([6 * gb, 6 * gb, 2 * gb, 6 * gb, 2 * gb, 2 * gb], 5 * gb) == \
        [[0], [1], [2], [3], [4, 5]]
    assert split_into_shards([3, 3, 3, 1], 6) == [[0, 1], [2, 3]]
    assert split_into_shards([], 6) == [[]]


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
