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


def test_cuts_round_up_to_row_boundaries_where_a_slot_has_rows():
    # the F32 tensor as 2 rows of 5 elements (20 bytes each): a cut inside it moves to the next row
    slots = [Slot(16, 40, 4, unit=20), Slot(56, 14, 2)]
    assert cut_points(70, 16, slots, 10) == [0, 10, 36, 56, 66, 70]
    assert all((c - 16) % 20 == 0 for c in cut_points(70, 16, slots, 10) if 16 < c < 56)
    # a one-row tensor (a unit of its whole size) is never cut
    assert cut_points(70, 16, [Slot(16, 40, 4, unit=40), Slot(56, 14, 2)], 5) == [0, 5, 10, 15, 56, 62, 68, 70]


def test_della_plans_items_of_whole_rows(tmp_path):
    """The planner gives della's tensors items that hold whole rows, however small the items."""
    from raymerge.config import build_recipe
    from raymerge.planning.build import make_plan
    from tests.conftest import make_llama_trio

    models = make_llama_trio(str(tmp_path), roles=("base", "chat", "chat2"))
    values = {"base": models["base"], "model": [models["chat"], models["chat2"]], "out": str(tmp_path / "out"),
              "item_size": "4KiB", "density": [0.3, 0.5]}
    for method, whole in (("della", True), ("ties", False)):
        recipe, options = build_recipe(f"{method}", {**values, "epsilon": [0.1, 0.1]} if method == "della" else values)
        plan = make_plan(recipe, options)
        splits = 0
        for item in plan.items:
            for piece in item.pieces:
                if piece.tensor >= 0 and plan.tensors[piece.tensor].terms:
                    shape = plan.tensors[piece.tensor].shape
                    row = shape[-1] if len(shape) > 1 else shape[0]
                    splits += piece.begin % row != 0 or piece.end % row != 0
        assert (splits == 0) == whole, method


def test_pieces_cover_header_and_element_ranges():
    slots = [Slot(16, 40, 4), Slot(56, 14, 2)]
    assert pieces_of(0, 24, 16, slots, first=5) == (Piece(HEADER, 0, 16), Piece(5, 0, 2))
    assert pieces_of(24, 60, 16, slots, first=5) == (Piece(5, 2, 10), Piece(6, 0, 2))
    assert pieces_of(60, 70, 16, slots, first=5) == (Piece(6, 2, 7),)
