"""What a merge method is: its declarations, plus a small rule.

A method names itself (the plan records the name in every TensorPlan) and declares its whole
surface: its parameters (`Parameter`), its statistics passes and the facts they record (`Pass`;
docs/ARCHITECTURE.md: passes) and the recipe kinds that ask for it (`RecipeKind`). It computes one
piece of a tensor's output from its named operands with a kernel (raymerge.ops.kernel). Nothing
else in raymerge knows a formula: the planner lays out operands, the worker reads them and calls
`statistic` and `apply`; the registry (raymerge.methods) makes options, kinds and the pass order
from the declarations.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from raymerge.untrusted import shown

ELEMENTWISE = "elementwise"  # the pass that writes the output bytes; every method has it, last
_COUNT = 2**62  # a fact that counts elements or names one: below the bound of every JSON count


@dataclass(frozen=True)
class Pass:
    """A statistics pass (docs/ARCHITECTURE.md: passes), declared by the method that needs it.
    `methods.PASS_ORDER` runs every method's passes by `order`, the elementwise pass last; a pass
    no method declares is refused (`methods.pass_named`)."""

    name: str
    order: int  # where it runs among every method's statistics passes: lower first
    records: tuple[str, ...] = ()  # the facts its `reduce` records per term it works on
    optional: tuple[str, ...] = ()  # facts it may leave out (checked only where present)
    bits: tuple[str, ...] = ()  # facts that are float32 bits (or their high half): below 2**32
    only: str = ""  # where it runs for a tensor that lists it, if not always (Method.needs): the plan says so


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
    term: int = 0  # which of the tensor's terms it is (a term past its limit has no Vector in a piece)
    values: tuple[tuple[str, float], ...] = ()  # its per-vector parameters but scale (density, ...)

    def param(self, name: str, default: float) -> float:
        return param(self.values, name, default)

    @property
    def density(self) -> float:
        """The fraction of its elements a sparsifying method keeps (TIES, DARE): 1.0 unless given."""
        return self.param("density", 1.0)


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
    # mergekit's compute dtype (TensorPlan.compute): the arrays hold its values, and a method rounds
    # each operation to it (kernel.round_to) where mergekit computes in it. None: float32.
    compute: str | None = None
    shape: tuple[int, ...] = ()  # the whole tensor's (a method that works row by row needs its rows)
    # What the item's earlier passes kept of this piece (Method.keeps; docs/ARCHITECTURE.md: values
    # kept between passes): name -> array over the piece's elements (None: given up, steps.keep), or
    # a label; None: nothing kept.
    carried: Any = None
    keep: dict[str, Any] | None = None  # where this pass puts what it keeps; None: it keeps nothing

    def param(self, name: str, default: float) -> float:
        return param(self.params, name, default)

    def rounded(self, kernel: Any, x: Any) -> Any:
        """x (float32), rounded to the compute dtype in place, as mergekit's operation in it rounds; x."""
        if self.compute is not None:
            kernel.round_to(x, self.compute)
        return x

    def rows(self, lo: int, hi: int) -> Operands:
        """The operands of elements [lo, hi) of the piece (with nothing carried or kept)."""
        return Operands(self.anchor[lo:hi] if self.anchor is not None else None,
                        tuple(Vector(v.scale, v.a[lo:hi], v.b[lo:hi] if v.b is not None else None, v.term, v.values)
                              for v in self.vectors),
                        self.params, self.name, self.begin + lo, self.facts, self.compute, self.shape)


PARAMETER_TYPES = ("weight", "fraction", "flag", "number", "seed")  # how config checks a value


@dataclass(frozen=True)
class Parameter:
    """A parameter a method takes. It is a recipe key, a command's flag (--name) and an API keyword
    alike: config.OPTIONS makes one option of every name the methods declare (the same name means
    the same thing in every method that takes it, as `methods.check_registry` makes sure).

    type: weight (a number float32 can use as given), fraction (0 to 1), flag (true or false),
      number (finite), seed (an integer from 0 to 2**63 - 1).
    per_vector: one value per vector, in the vectors' order (Vector.values; scale: Vector.scale);
      else one value for the whole merge (Operands.params).
    schedulable: a value may vary by tensor: a gradient over the layers, or rules by tensor name
      (planning.schedule); per-vector parameters only.
    default: the value the method computes with when the recipe gives none.
    mergekit: mergekit's name for it in a configuration's `parameters`; None: mergekit has none.
    recorded: without a value given, the recipe records the default (the manifest then says which
      masks a seed drew).
    required: mergekit requires it in a configuration (a weight, slerp's t); raymerge's own recipes
      compute with the default where none is given."""

    name: str
    help: str
    type: str
    default: Any
    per_vector: bool = False
    schedulable: bool = False
    mergekit: str | None = None
    recorded: bool = False
    required: bool = False

    def default_to(self, value: Any) -> Parameter:
        """The same parameter with another method's default."""
        return dataclasses.replace(self, default=value)

    def other(self) -> Any:
        """A valid value other than the default: the parity checks vary every parameter with it."""
        if self.type == "flag":
            return not self.default
        if self.type == "seed":
            return self.default + 3
        return 0.75 if self.default != 0.75 else 0.5

    def __post_init__(self) -> None:
        # One value per vector is a list of numbers or schedules (weight, fraction); one in all, a
        # flag, a number or a seed: config parses each shape so, and nothing else.
        if self.type not in PARAMETER_TYPES or (self.schedulable and not self.per_vector) or \
                self.per_vector != (self.type in ("weight", "fraction")):
            raise TypeError(f"parameter {self.name}: type {self.type!r}, per_vector {self.per_vector}, "
                            f"schedulable {self.schedulable}: not a parameter config can check")


# Parameters several methods share (each may give another default: `default_to`).
SCALE = Parameter("scale", "the weight of each vector", "weight", 1.0, per_vector=True, schedulable=True,
                  mergekit="weight", required=True)
NORMALIZE = Parameter("normalize", "divide the weighted sum by the sum of the weights (with a sign consensus: per "
                      "element, of the agreeing ones)", "flag", False, mergekit="normalize")
LAMBDA = Parameter("lambda", "multiply the combined change by this", "number", 1.0, mergekit="lambda")


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
    mergekit: bool = False  # a mergekit configuration's `merge_method` of this name maps to it
    tunable: bool = True  # takes its method's parameters and --vocab (extract: the vector as it is)
    methods: bool = False  # --method chooses among the combining methods (merge, apply)
    anchor_optional: bool = False  # the anchor (and what the vectors are taken minus) may be left out
    count: int = 0  # takes exactly this many vector inputs (0: any number; `single`: one)
    at_least: int = 0  # takes at least this many vector inputs
    base_joins: bool = False  # mergekit's base_model is one of the models (appended where `models` omits it)


def mergekit_kind(name: str, anchor: str | None = "base", minus: str | None = "base", single: bool = False,
                  anchor_optional: bool = False, count: int = 0, at_least: int = 0,
                  base_joins: bool = False) -> RecipeKind:
    """The recipe kind of mergekit's `merge_method: name`: its models are the vectors, the base
    model (`base_model`) the anchor and what each is taken minus, as the method says; the output
    takes the base model's config and tokenizer. `single`: one model besides the base;
    `anchor_optional`: without a base_model, the models alone (nuslerp, multislerp); `count`: exactly
    this many models besides the base; `at_least`: at least this many; `base_joins`: the base model
    is one more model (karcher's group), its config and tokenizer the output's."""
    return RecipeKind(name, name, f"mergekit's {name}", vectors="model", anchor=anchor, minus=minus, aux="base",
                      manifest_kind=f"mergekit {name}", example="", command=False, mergekit=True, single=single,
                      anchor_optional=anchor_optional, count=count, at_least=at_least, base_joins=base_joins)


class Method(ABC):
    """A merge method: what it is (name, parameters, statistics passes, recipe kinds) and how it
    computes. One module in methods/ and one line in `methods.METHODS` add one."""

    name: ClassVar[str]
    parameters: ClassVar[tuple[Parameter, ...]] = ()
    statistics: ClassVar[tuple[Pass, ...]] = ()  # every statistics pass it may need, in the order they run
    recipes: ClassVar[tuple[RecipeKind, ...]] = ()
    combining: ClassVar[bool] = False  # merge and apply may combine their vectors with it (--method)
    mergekit_ignores: ClassVar[tuple[str, ...]] = ()  # mergekit parameters that change nothing in the result
    torch_scalars: ClassVar[bool] = False  # its `reduce` computes with torch, out of the driver (steps.in_torch)
    # mergekit's result is float32 whatever its compute dtype (a float32 tensor promotes it): the
    # worker casts the method's float32 result to the output dtype, with no rounding to the compute dtype.
    result_float32: ClassVar[bool] = False
    # its pieces hold whole rows of each tensor (the planner cuts items at row boundaries there)
    whole_rows: ClassVar[bool] = False
    # its chunks cost more in Python (a long fused program, several sums) than in arithmetic: the
    # kernel's wide chunks (numpy's 4 MiB rows instead of 1 MiB). The bits do not depend on them.
    wide_chunks: ClassVar[bool] = False

    def refuses(self, params: dict[str, Any]) -> str | None:
        """Why this method cannot run with these global parameters (a recipe's), or None."""
        return None

    def check(self, tensor: Any) -> str | None:
        """Why this method cannot compute one tensor of a plan (a TensorPlan with terms, its
        parameters resolved), or None: the planner refuses the plan with it."""
        return None

    def default(self, name: str) -> Any:
        """The default this method declares for its parameter `name`."""
        return next(p.default for p in self.parameters if p.name == name)

    def value(self, operands: Operands, name: str) -> Any:
        """A global parameter's value for a piece: the recipe's, else this method's default."""
        return operands.param(name, self.default(name))

    def passes_for(self, tensor: Any) -> tuple[str, ...]:
        """The passes one tensor (a TensorPlan with terms) needs, in PASS_ORDER: by default, all."""
        return (*(p.name for p in self.statistics), ELEMENTWISE)

    def needs(self, pass_name: str, facts: Any) -> bool:
        """Whether a tensor whose passes so far found `facts` still needs statistics pass `pass_name`
        (one of `passes_for`'s): by default, yes. An iterative method says no past convergence, and
        the driver skips the tensor's pieces in that pass."""
        return True

    def keeps(self, tensor: Any) -> float:
        """Bytes per element of the values this method keeps from one pass of a tensor to the next
        (Operands.keep, Operands.carried), at most (a fraction where it keeps a value per row): 0,
        nothing kept. A method that keeps values
        computes them again wherever none were carried (docs/ARCHITECTURE.md: values kept between
        passes): keeping saves time, never changes a bit."""
        return 0

    def needs_torch(self, tensor: Any) -> bool:
        """Whether `reduce` computes tensor's scalars with torch (`torch_scalars`): the run then
        starts torch's process while its workers start (steps.warm_torch)."""
        return self.torch_scalars

    def reads_inputs(self, pass_name: str, carried: Any, facts: Any = None) -> bool:
        """Whether statistics pass `pass_name` reads a piece's inputs, given what the earlier passes
        kept of it (Operands.carried) and its tensor's facts: one that finds all it needs there does
        not, and a worker then maps a local input without reading it (a remote one is read all the
        same)."""
        return True

    def spends(self, pass_name: str) -> tuple[str, ...]:
        """The names of the values kept by earlier passes that pass `pass_name` reads for the last
        time: the driver lets them go once it has run (their memory is the object store's)."""
        return ()

    def works_on(self, term: Any) -> bool:
        """Whether the statistics passes record facts for this term of a tensor (Term): by default
        every term that any piece reads."""
        return term.limit != 0

    def facts_problem(self, tensor: Any, facts: Any, passes: list[str]) -> str | None:
        """Why `facts` (read back from a journal or a manifest) are not what this method's `reduce`
        records for tensor's statistics `passes`, or None: one entry per term, null or an object;
        a term the passes work on has every fact they record; every fact in range (integer counts
        and float32 bits; a method with other facts overrides this)."""
        if not isinstance(facts, list):
            return "expected a list, one entry per vector"
        if len(facts) != len(tensor.terms):
            return f"{len(facts)} entries for {len(tensor.terms)} vectors"
        from raymerge.methods import pass_named  # the registry imports this module

        named = [pass_named(p) for p in passes]
        bits = {k for p in named for k in p.bits}
        for j, (term, f) in enumerate(zip(tensor.terms, facts)):
            if not (f is None or isinstance(f, dict)):
                return f"vector {j + 1}: expected null or an object"
            f = f or {}
            wanted = named if self.works_on(term) else []
            missing = [k for p in wanted for k in p.records if k not in f and k not in p.optional]
            if missing:
                return f"vector {j + 1} has no {', '.join(missing)}"
            for k, v in f.items():
                if not (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < (2**32 if k in bits else _COUNT)):
                    return f"vector {j + 1}'s {shown(k)} is {shown(v)}, out of range"
        return None

    @abstractmethod
    def apply(self, kernel: Any, out: Any, operands: Operands, scratch: Any) -> Any:
        """Write one piece of a tensor's output into `out` (an array of the kernel's type) and
        return the kernel's `Sums` of it."""

    def statistic(self, kernel: Any, pass_name: str, operands: Operands, scratch: Any) -> list:
        """A statistics pass's result for one piece: a list of small JSON values indexed by term
        (None for a term that needs nothing here)."""
        raise NotImplementedError(f"{self.name} has no statistics pass {pass_name}")

    def reduce(self, pass_name: str, tensor: Any, results: list[tuple[int, list]], facts: Any) -> Any:
        """The facts of a whole tensor after a statistics pass, from every piece's result as
        (the piece's first element, its result) and the facts of the passes before."""
        raise NotImplementedError(f"{self.name} has no statistics pass {pass_name}")
