import pytest

from raymerge.errors import ResolveError
from raymerge.safetensors.index import is_safe_name, parse_index, shard_name


def test_shard_names_follow_hf():
    assert shard_name(0, 1) == "model.safetensors"
    assert shard_name(1, 3) == "model-00002-of-00003.safetensors"


@pytest.mark.parametrize("name", ["../x.safetensors", "/etc/passwd", "a/../../b", "..", "a\\b", ""])
def test_unsafe_shard_names_are_refused(name):
    assert not is_safe_name(name)
    with pytest.raises(ResolveError, match="refusing"):
        parse_index(b'{"weight_map": {"w": "%s"}}' % name.replace("\\", "\\\\").encode(), "idx")


def test_plain_names_are_accepted():
    assert parse_index(b'{"weight_map": {"w": "model-00001-of-00002.safetensors"}}', "idx") == \
        {"w": "model-00001-of-00002.safetensors"}
    with pytest.raises(ResolveError, match="weight_map"):
        parse_index(b'{"metadata": {}}', "idx")


@pytest.mark.parametrize("raw,match", [
    (b'{"weight_map": {"w": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}", "nested deeper than 64 levels"),
    (b'{"weight_map": {"w": 5}}', "refusing"),
    (b'{"weight_map": {"w": ["model.safetensors"]}}', "refusing"),
    (b'{"weight_map": {"": "model.safetensors"}}', "empty name"),
    (b'{"weight_map": {"w": "model.safetensors"}, "metadata": [1]}', "'metadata' is not an object"),
    (b'{"weight_map": {"w": "model.safetensors"}, "metadata": {"total_size": ' + b"1" * 5000 + b"}}",
     "an integer of 5000 digits"),
    (b'{"weight_map": {"\\udc00": "model.safetensors"}}', "lone surrogate"),
    (b"[]", "weight_map"),
])
def test_hostile_index_files_are_one_resolve_error(raw, match):
    with pytest.raises(ResolveError, match=match) as e:
        parse_index(raw, "model.safetensors.index.json")
    assert "\n" not in str(e.value)
