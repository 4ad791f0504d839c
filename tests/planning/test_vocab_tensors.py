"""Which tensors hold a vocabulary's rows (ops.rules.is_vocab_tensor)."""

from __future__ import annotations

from raymerge.ops.rules import is_vocab_tensor

NAMES = ("model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight", "lm_head.weight")


def test_named_embeddings_decide_and_rows_alone_do_not_take_a_layer_of_the_same_height():
    """mergekit's test models have as many vocabulary rows as hidden units (64): a layer's 64-row
    weight is no vocabulary tensor where the checkpoint names its embedding and head."""
    config = {"vocab_size": 64}
    assert is_vocab_tensor(NAMES[0], (64, 64), config, NAMES)
    assert is_vocab_tensor(NAMES[2], (64, 64), config, NAMES)
    assert not is_vocab_tensor(NAMES[1], (64, 128), config, NAMES)


def test_without_named_embeddings_rows_matching_the_vocab_size_decide():
    names = ("transformer.tok.w", "transformer.blocks.0.w")
    assert is_vocab_tensor(names[0], (64, 32), {"vocab_size": 64}, names)
    assert not is_vocab_tensor(names[1], (32, 32), {"vocab_size": 64}, names)
    assert not is_vocab_tensor(names[0], (64,), {"vocab_size": 64}, names)
