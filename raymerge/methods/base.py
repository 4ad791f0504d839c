"""What a merge method is: data, plus a small elementwise rule.

A method names itself (the plan records the name in every TensorPlan), declares its parameters,
lists the passes its plan
needs (statistics passes that reduce whole-tensor facts first, then the elementwise pass; see
docs/ARCHITECTURE.md: passes) and the recipe kinds that ask for it, and computes one piece of a tensor's output from
its named operands with a kernel (raymerge.ops.kernel). Nothing else in raymerge knows a formula:
the planner lays out operands, the worker reads them and calls `apply`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

ELEMENTWISE = "elementwise"  # the pass that writes the output bytes; every method has it, last
# Every pass any method has, in the order a plan runs them: statistics passes first.
PASS_ORDER = ("magnitude-high", "magnitude-low", "l1-norm", ELEMENTWISE)


def param(params: tuple[tuple[str, Any], ...], name: str, default: Any) -> Any:
    """A parameter's value in (name, value) pairs (TensorPlan.params, Operands.params), or `default`."""
    return next((v for k, v in params if k == name), default)


@dataclass(frozen=True, slots=True)
class Vector:
    """One vector among a piece's operands: `scale * (a - b)`, or `scale * a` when b is None (a
    stored vector). Shorter than the piece when the vector covers the tensor's first rows only."""

    scale: float
    a: Any  # an array of the kernel's type
    b: Any | None
    density: float = 1.0  # the fraction of its elements a sparsifying method keeps (TIES, DARE)
    term: int = 0  # which of the tensor's terms it is (a term past its limit has no Vector in a piece)


@dataclass(frozen=True, slots=True)
class Operands:
    """What one piece of a tensor is computed from, by name (arrays of the kernel's type), the
    tensor's method parameters (TensorPlan.params), and where the piece lies: the tensor's name,
    its first element, and the facts the statistics passes found of the whole tensor."""

    anchor: Any | None  # None: the result starts at zero (extracting a vector)
    vectors: tuple[Vector, ...]
    params: tuple[tuple[str, float], ...] = ()
    name: str = ""
    begin: int = 0
    facts: Any = None  # what Method.reduce made of the tensor's statistics; None without

    def param(self, name: str, default: float) -> float:
        return param(self.params, name, default)

    def rows(self, lo: int, hi: int) -> Operands:
        """The operands of elements [lo, hi) of the piece."""
        return Operands(self.anchor[lo:hi] if self.anchor is not None else None,
                        tuple(Vector(v.scale, v.a[lo:hi], v.b[lo:hi] if v.b is not None else None, v.density,
                                     v.term)
                              for v in self.vectors),
                        self.params, self.name, self.begin + lo, self.facts)


@dataclass(frozen=True)
class Parameter:
    """A parameter a method takes: one value per vector, in the vectors' order, or one in all."""

    name: str
    help: str
    default: float
    per_vector: bool = True


@dataclass(frozen=True)
class RecipeKind:
    """One way to ask for a method: a command (`raymerge merge`) and a recipe file's `kind:`. It
    names its inputs by the recipe keys that hold them."""

    name: str
    method: str
    summary: str  # what it computes, in one line: the command's help
    vectors: str  # the key listing the vector inputs ("chat", "vector", "model"), one scale each
    anchor: str | None  # the key of the anchor ("cp", "base"); None: the sum starts at zero
    minus: str | None  # the key of the checkpoint each vector input is taken minus ("base"), if any
    aux: str  # the key whose config and tokenizer files the output takes (a list key: its first)
    manifest_kind: str  # what the manifest calls the output
    example: str  # the command's example, for --help
    single: bool = False  # takes exactly one vector input
    template: bool = False  # the output takes the first vector input's chat template and EOS
    command: bool = True  # a command of its own; False: only a recipe file's kind (a mergekit recipe's)


class Method(ABC):
    name: ClassVar[str]
    parameters: ClassVar[tuple[Parameter, ...]] = ()
    passes: ClassVar[tuple[str, ...]] = (ELEMENTWISE,)  # statistics passes first, the elementwise one last
    recipes: ClassVar[tuple[RecipeKind, ...]] = ()

    numpy_only: ClassVar[bool] = False  # its rule is written with numpy: CPU workers, numpy's dtypes

    def passes_for(self, tensor: Any) -> tuple[str, ...]:
        """The passes one tensor (a TensorPlan with terms) needs, in PASS_ORDER."""
        return self.passes

    @abstractmethod
    def apply(self, kernel: Any, out: Any, operands: Operands, scratch: Any) -> Any:
        """Write one piece of a tensor's output into `out` (an array of the kernel's type) and
        return the kernel's `Sums` of it."""

    def statistic(self, pass_name: str, operands: Operands, scratch: Any) -> list:
        """A statistics pass's result for one piece: a list of small JSON values indexed by term
        (None for a term that needs nothing here)."""
        raise NotImplementedError(f"{self.name} has no statistics pass {pass_name}")

    def reduce(self, pass_name: str, tensor: Any, results: list[tuple[int, list]], facts: Any) -> Any:
        """The facts of a whole tensor after a statistics pass, from every piece's result as
        (the piece's first element, its result) and the facts of the passes before."""
        raise NotImplementedError(f"{self.name} has no statistics pass {pass_name}")
