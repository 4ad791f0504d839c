"""Merge methods, one module each, found by name: the registry.

To add a method: a module here with a `Method` subclass, which declares its whole surface (its
parameters, its statistics passes and the facts they record, its recipe kinds, mergekit's
`merge_method` it serves) and computes its rule through a kernel, and one line in `METHODS` below.
The options, flags and API keywords of its parameters (config.OPTIONS), its recipe kinds and
commands, the order of the passes and the mapping of mergekit files are all made from here.
"""

from __future__ import annotations

from raymerge.methods.arcee_fusion import ArceeFusion
from raymerge.methods.base import (ELEMENTWISE, SCALE, Method, Operands, Parameter, Pass, RecipeKind, Vector,
                                   mergekit_kind)
from raymerge.methods.elementwise import Nearswap, Passthrough
from raymerge.methods.karcher import Karcher
from raymerge.methods.model_stock import ModelStock
from raymerge.methods.multislerp import Multislerp
from raymerge.methods.nuslerp import Nuslerp
from raymerge.methods.ram import Ram, RamplusTl
from raymerge.methods.sce import Sce
from raymerge.methods.slerp import Slerp
from raymerge.methods.sparse import Breadcrumbs, BreadcrumbsTies, DareLinear, DareTies, Della, DellaLinear, Ties
from raymerge.methods.sum import Sum
from raymerge.methods.task_arithmetic import Linear, TaskArithmetic

_ALL: tuple[Method, ...] = (Sum(), TaskArithmetic(), Linear(), Ties(), DareLinear(), DareTies(), Slerp(), Nuslerp(),
                            Multislerp(), Karcher(), ModelStock(), Nearswap(), Passthrough(), Breadcrumbs(),
                            BreadcrumbsTies(), Ram(), RamplusTl(), Sce(), Della(),
                            DellaLinear(), ArceeFusion())


def check_registry(methods: tuple[Method, ...]) -> dict[str, Method]:
    """The methods by name, failing loudly, at import, on declarations that would otherwise be
    half-used: a name declared twice, a parameter meaning two things, two passes in one place, a
    recipe kind of a method that is not registered."""
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise TypeError(f"methods registered twice: {sorted({n for n in names if names.count(n) > 1})}")
    for m in methods:
        for r in m.recipes:
            if r.method not in names:
                raise TypeError(f"method {m.name}: recipe kind {r.name} computes with {r.method}, which is not registered")
    seen: dict[str, Parameter] = {}
    for m in methods:
        for p in m.parameters:
            other = seen.setdefault(p.name, p)
            # One option per name: mergekit's name may differ by method (passthrough's `scale` is its
            # factor, the others' `weight`), what a value is may not.
            if (other.type, other.per_vector, other.schedulable) != (p.type, p.per_vector, p.schedulable):
                raise TypeError(f"method {m.name}: parameter {p.name} is declared otherwise by another method")
    passes: dict[str, Pass] = {}
    for m in methods:
        for p in m.statistics:
            if passes.setdefault(p.name, p) != p:
                raise TypeError(f"method {m.name}: pass {p.name} is declared otherwise by another method")
    orders = [p.order for p in passes.values()]
    if len(set(orders)) != len(orders) or ELEMENTWISE in passes:
        raise TypeError("two statistics passes share an order, or one is named elementwise")
    kinds = [r.name for m in methods for r in m.recipes]
    if len(set(kinds)) != len(kinds):
        raise TypeError(f"recipe kinds declared twice: {sorted({k for k in kinds if kinds.count(k) > 1})}")
    return {m.name: m for m in methods}


METHODS: dict[str, Method] = check_registry(_ALL)
# Every pass any method has, in the order a plan runs them: statistics passes first.
PASSES: dict[str, Pass] = {p.name: p for m in METHODS.values() for p in m.statistics}
PASS_ORDER: tuple[str, ...] = (*sorted(PASSES, key=lambda name: PASSES[name].order), ELEMENTWISE)
# The methods a raymerge merge or apply may combine its vectors with (`method:`, --method).
COMBINING: tuple[str, ...] = tuple(m.name for m in METHODS.values() if m.combining)
# Every recipe kind (a command, a recipe file's `kind:`), by name.
RECIPES: dict[str, RecipeKind] = {r.name: r for m in METHODS.values() for r in m.recipes}
# mergekit's merge_method names raymerge runs, each a recipe kind of the same name.
MERGEKIT: tuple[str, ...] = tuple(r.name for r in RECIPES.values() if r.mergekit)


def pass_named(name: str) -> Pass:
    """A statistics pass by name; a pass no method declares is a bug, never silently skipped."""
    if name not in PASSES:
        raise KeyError(f"statistics pass {name!r} is declared by no method (methods.PASSES: {', '.join(PASSES)})")
    return PASSES[name]


def parameters_named(name: str) -> list[tuple[Method, Parameter]]:
    """Every method that takes parameter `name`, with its declaration."""
    return [(m, p) for m in METHODS.values() for p in m.parameters if p.name == name]


def kind_methods(kind: RecipeKind) -> list[Method]:
    """The methods a recipe kind may compute with: its own, or with --method every combining one."""
    return [METHODS[n] for n in COMBINING] if kind.methods else [METHODS[kind.method]]


__all__ = ["COMBINING", "ELEMENTWISE", "MERGEKIT", "METHODS", "PASSES", "PASS_ORDER", "RECIPES", "SCALE", "Method",
           "Operands", "Parameter", "Pass", "RecipeKind", "Vector", "kind_methods", "mergekit_kind", "parameters_named",
           "pass_named"]
