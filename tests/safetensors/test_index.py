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
