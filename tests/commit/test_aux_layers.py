"""commit.aux.with_layers: a frankenmerge's config.json."""

from __future__ import annotations

import json

import pytest

from raymerge.commit.aux import with_layers
from raymerge.errors import ResolveError


def _config(**extra) -> bytes:
    return json.dumps({"num_hidden_layers": 4, **extra}).encode()


def test_the_language_models_layer_count_and_layer_types_follow_the_slices():
    got = json.loads(with_layers(_config(layer_types=["full"] * 4, vision_config={"num_hidden_layers": 9}),
                                 [0, 1, 1, 2, 3, 3], "c"))
    assert got["num_hidden_layers"] == 6 and got["layer_types"] == ["full"] * 6
    assert got["vision_config"] == {"num_hidden_layers": 9}  # another stack's count is not the output's
    got = json.loads(with_layers(_config(layer_types=["s", "s", "s", "f"]), [3, 0, 3], "c"))
    assert got["layer_types"] == ["f", "s", "f"]
    nested = json.loads(with_layers(json.dumps({"text_config": {"num_hidden_layers": 4}}).encode(), [0, 1], "c"))
    assert nested["text_config"]["num_hidden_layers"] == 2


def test_layer_types_that_do_not_cover_the_sources_are_refused_not_written_stale():
    with pytest.raises(ResolveError, match="its layer_types name 2 layers"):
        with_layers(_config(layer_types=["s", "f"]), [0, 3], "c")
