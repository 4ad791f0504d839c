"""Synthetic Llama-shaped checkpoints for the demo, the tests and the benchmarks.

Written with the `safetensors` package's own writer, so that raymerge reads what the ecosystem
writes, and sharded by raymerge's own rule (planning/layout.py: consecutive tensors per shard,
which is not quite Hugging Face's). Chat and cp are the base plus independent noise, as
after fine-tuning, so the chat vector is small against the weights, as in real models.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from raymerge.planning.layout import split_into_shards
from raymerge.planning.schedule import layer_of
from raymerge.safetensors.dtypes import numel
from raymerge.safetensors.index import INDEX_NAME, shard_name

ROLES = ("base", "chat", "cp")


@dataclass(frozen=True)
class LlamaShape:
    hidden: int = 64
    layers: int = 2
    vocab: int = 256
    intermediate: int = 172
    heads: int = 4
    kv_heads: int = 2

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) in the order LlamaForCausalLM's state dict has them."""
        h, kv = self.hidden, self.hidden // self.heads * self.kv_heads
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                    (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                    (p + "mlp.gate_proj.weight", (self.intermediate, h)),
                    (p + "mlp.up_proj.weight", (self.intermediate, h)),
                    (p + "mlp.down_proj.weight", (h, self.intermediate)),
                    (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    def config(self) -> dict:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
                "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
                "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
                "vocab_size": self.vocab, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
                "hidden_act": "silu", "rope_theta": 10000.0, "tie_word_embeddings": False,
                "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}

    @classmethod
    def of_size(cls, params: float) -> LlamaShape:
        """A Llama-like shape of roughly `params` parameters (hidden grows, 16 layers)."""
        layers, vocab = 16, 32000
        hidden = 256
        while True:
            nxt = hidden + 256
            inter = int(nxt * 8 / 3) // 64 * 64
            if 2 * vocab * nxt + layers * (4 * nxt * nxt + 3 * nxt * inter) > params:
                break
            hidden = nxt
        return cls(hidden, layers, vocab, int(hidden * 8 / 3) // 64 * 64, hidden // 128 or 1, hidden // 128 or 1)


def make_trio(root: str, shape: LlamaShape = LlamaShape(), shard_size: int = 5_000_000_000, seed: int = 0,
              dtype: str = "bfloat16", noise: float = 0.1) -> dict[str, str]:
    """Write base, chat and cp checkpoints under `root`; return role -> folder."""
    import torch
    from safetensors.torch import save_file

    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(seed)
    folders = {role: os.path.join(root, role) for role in ROLES}
    names = [n for n, _ in shape.tensors()]
    itemsize = torch.empty(0, dtype=torch_dtype).element_size()
    groups = split_into_shards([itemsize * numel(s) for _, s in shape.tensors()], shard_size)
    weight_map: dict[str, str] = {}
    for k, group in enumerate(groups):
        file = shard_name(k, len(groups))
        shards: dict[str, dict] = {role: {} for role in ROLES}
        for i in group:
            name, dims = shape.tensors()[i]
            base = torch.randn(dims, generator=gen) * 0.02
            if name.endswith("norm.weight"):
                base += 1.0
            shards["base"][name] = base.to(torch_dtype)
            # Tuning moves later layers more than early ones: the chat vector grows with depth.
            layer = layer_of(name)
            depth = 0.5 + layer / max(1, shape.layers - 1) if layer is not None else 1.0
            for role, factor in (("chat", depth), ("cp", 1.0)):
                shards[role][name] = (base + torch.randn(dims, generator=gen) * (0.02 * noise * factor)).to(torch_dtype)
            weight_map[name] = file
        for role in ROLES:
            os.makedirs(folders[role], exist_ok=True)
            save_file(shards[role], os.path.join(folders[role], file), metadata={"format": "pt"})
    total = sum(itemsize * numel(s) for _, s in shape.tensors())
    for role in ROLES:
        _write_aux(folders[role], shape, role)
        if len(groups) > 1:
            with open(os.path.join(folders[role], INDEX_NAME), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": {n: weight_map[n] for n in names}}, f)
    return folders


def _write_aux(folder: str, shape: LlamaShape, role: str) -> None:
    files = {
        "config.json": shape.config(),
        "generation_config.json": {"bos_token_id": 1, "eos_token_id": 2, "_from": role},
        "tokenizer_config.json": {"bos_token": "<s>", "eos_token": "</s>", "model_max_length": 256,
                                  "_from": role},
        "special_tokens_map.json": {"bos_token": "<s>", "eos_token": "</s>"},
    }
    for name, obj in files.items():
        with open(os.path.join(folder, name), "w") as f:
            json.dump(obj, f, indent=1)


def word_tokenizer(folder: str, plain: list[str], added: list[str] = (), template: str | None = None,
                   eos: str = "</s>") -> None:
    """Save into `folder` a word-level fast tokenizer over `plain` (ids in order, `<unk>` among
    them), `added` special tokens after, a chat template and an EOS token: the small tokenizers the
    tokenizer-source tests and bench/tokenizer_parity.py give synthetic checkpoints. Replaces the
    folder's tokenizer_config.json and special_tokens_map.json; writes generation_config.json with
    the EOS id. Needs the tokenizer libraries (raymerge[tokenizers])."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(plain)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")
    fast.add_special_tokens({"additional_special_tokens": list(added)} if added else {})
    fast.eos_token = eos
    fast.chat_template = template
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if os.path.exists(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
    fast.save_pretrained(folder)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": fast.convert_tokens_to_ids(eos)}, f)
