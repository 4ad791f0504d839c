"""The chat vector's method: `round(anchor + sum_i scale_i * (a_i - b_i))`, in float32, in the
vectors' order, rounded once (Huang et al., Chat Vector). Its recipes: merge (cp plus scaled
chat - base differences), extract (chat - base alone, stored as a vector) and apply (cp plus
scaled stored vectors)."""

from __future__ import annotations

from typing import Any

from raymerge.methods.base import SCALE, Method, Operands, RecipeKind


class Sum(Method):
    name = "sum"
    parameters = (SCALE,)
    combining = True
    recipes = (
        RecipeKind("merge", "sum", "out = cp + sum_i scale_i * (chat_i - base)", vectors="chat", anchor="cp",
                   minus="base", aux="cp", template=True, methods=True, manifest_kind="chat vector merge", example="""example:
  raymerge merge --base s3://models/llama2-7b --chat s3://models/llama2-7b-chat \\
                 --cp s3://models/llama2-7b-zh-cp --out s3://models/llama2-7b-zh-chat --scale 0.5
  # two chat models against one base, one --scale each, in order:
  raymerge merge --base ./base --chat ./chat-a --scale 0.5 --chat ./chat-b --scale 0.5 --cp ./cp --out ./out
"""),
        RecipeKind("extract", "sum", "store the chat vector chat - base (float32 by default)", vectors="chat",
                   anchor=None, minus="base", aux="chat", manifest_kind="chat vector", example="""example:
  raymerge extract --base s3://models/llama2-7b --chat s3://models/llama2-7b-chat --out s3://vectors/llama2-chat
""", single=True, tunable=False),
        RecipeKind("apply", "sum", "out = cp + sum_i scale_i * vector_i", vectors="vector", anchor="cp",
                   minus=None, aux="cp", template=True, methods=True, manifest_kind="chat vector apply", example="""example:
  raymerge apply --cp ./llama2-zh-cp --vector ./vec-chat --scale 0.5 --vector ./vec-math --scale 0.5 --out ./out
"""),
    )

    def apply(self, kernel: Any, out: Any, operands: Operands, scratch: Any) -> Any:
        return kernel.weighted_sum(out, operands.anchor, [(v.scale, v.a, v.b) for v in operands.vectors], scratch)
