"""Merge methods, one module each, found by name.

To add a method: a module here with a `Method` subclass (its name, passes, recipe kinds and
elementwise rule, its parameters), and one line in `METHODS` below.
"""

from __future__ import annotations

from raymerge.methods.base import ELEMENTWISE, PASS_ORDER, Method, Operands, Parameter, RecipeKind, Vector
from raymerge.methods.sparse import DareLinear, DareTies, Ties
from raymerge.methods.sum import Sum
from raymerge.methods.task_arithmetic import Linear, TaskArithmetic

METHODS: dict[str, Method] = {m.name: m for m in (Sum(), TaskArithmetic(), Linear(), Ties(), DareLinear(), DareTies())}
# The methods a raymerge merge or apply may combine its vectors with (`method:`, --method).
COMBINING = ("sum", "ties", "dare_linear", "dare_ties")
# Every recipe kind (a command, a recipe file's `kind:`), by name.
RECIPES: dict[str, RecipeKind] = {r.name: r for m in METHODS.values() for r in m.recipes}

__all__ = ["COMBINING", "ELEMENTWISE", "METHODS", "PASS_ORDER", "RECIPES", "Method", "Operands", "Parameter",
           "RecipeKind", "Vector"]
