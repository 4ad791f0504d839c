"""The command line: parse flags into a recipe, hand it to the API. Errors become one line and
exit status 2 (bad input) or 1 (a failed run); `--debug` shows the traceback."""

from __future__ import annotations

import argparse
import json
import logging
import os
import stat
import sys

from raymerge import __version__
from raymerge.config import OPTIONS, recipe_from_flags
from raymerge.errors import InputError, RaymergeError
from raymerge.methods import MERGEKIT, RECIPES
from raymerge.storage.localfs import kind, write_regular
from raymerge.storage.urls import redact
from raymerge.text import listed, one_line

EXAMPLES = {  # the recipe kinds' examples are their own (raymerge.methods)
    "plan": """example:
  raymerge plan --base ./base --chat ./chat --cp ./cp --json | jq .output_bytes
  raymerge plan --recipe mergekit.yml      # each tensor's method and scales, per layer; TIES's passes
""",
    "run": """example:
  raymerge run recipe.yaml        # kind: merge|extract|apply, plus the command's flags as keys
  raymerge run recipe.yaml --out s3://models/try2 --workers 8 --resume    # flags win over the file's keys
  raymerge run mergekit.yml --out ./merged      # a mergekit file, run in mergekit's order
""",
    "verify": """example:
  raymerge verify s3://models/llama2-7b-zh-chat --recompute 5    # exit 0: sound; 1: names shard and tensors
""",
    "inspect": """example:
  raymerge inspect ./out --plot change.png
""",
    "demo": """example:
  raymerge demo                 # makes a tiny Llama trio in a temp folder, merges it on a local Ray
  raymerge demo --dir ./demo    # keep the trio and the output in ./demo
""",
}


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")


def _add_options(p: argparse.ArgumentParser, kind: str, planning: bool = False) -> None:
    """A recipe kind's flags, from config.OPTIONS; `planning`: only those that can change a plan.
    Flags left out stay None, so that they are not in the recipe (its defaults hold)."""
    for o in OPTIONS:
        if not o.takes(kind) or (planning and not o.plans):
            continue
        # A run needs --out; a plan goes without, and may come from --recipe (build_recipe checks the rest).
        _add_flag(p, o, required=not planning and (o.needed(kind) or o.key == "out"))


def _add_flag(p: argparse.ArgumentParser, o, required: bool = False) -> None:
    extra = dict(o.cli)
    flag = extra.pop("flag", o.flag)
    p.add_argument(flag, dest=o.key, required=required, default=None, help=o.help, **extra)


# The inputs a recipe file names; `raymerge run` takes every other flag, which wins over the file's key.
INPUT_KEYS = ("base", "chat", "cp", "vector", "model")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line like every other error (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"raymerge: error: {one_line(message)}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="raymerge", description="Chat-vector merges of LLM checkpoints, "
                                     "streamed by range from local disk or S3 and computed on Ray.")
    parser.add_argument("--version", action="version", version=f"raymerge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, help: str, example: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, epilog=example,
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    for how in (h for h in RECIPES.values() if h.command):
        p = command(how.name, how.summary, how.example)
        _add_options(p, how.name)
        p.add_argument("--report", metavar="FILE.json",
                       help="save the run report (bytes, times, GB/s, retries, memory)")
        _add_common(p)
    p = command("plan", "print the plan of a merge or a recipe file; reads headers only, writes nothing",
                EXAMPLES["plan"])
    p.add_argument("--recipe", metavar="FILE", help="plan this recipe file (raymerge's or mergekit's) instead")
    _add_options(p, "merge", planning=True)
    p.add_argument("--json", action="store_true", help="print the whole plan as JSON")
    _add_common(p)
    p = command("run", "run a YAML recipe (kind: " + ", ".join(RECIPES) + ", and the command's flags as keys) or a "
                f"mergekit configuration (merge_method: {', '.join(MERGEKIT[:-1])} or {MERGEKIT[-1]}); --out "
                "and the other flags given here win over the file's keys", EXAMPLES["run"])
    p.add_argument("recipe", help="the recipe file")
    for o in OPTIONS:  # every flag a hint may name, but the inputs: the file names them
        if not o.flag_only and o.key not in INPUT_KEYS:
            _add_flag(p, o)
    p.add_argument("--report", metavar="FILE.json", help="save the run report (bytes, times, GB/s, retries, memory)")
    _add_common(p)
    p = command("verify", "check a checkpoint against its manifest: shards, headers, index, checksums",
                EXAMPLES["verify"])
    p.add_argument("checkpoint", help="a checkpoint written by raymerge (local path or URL)")
    p.add_argument("--recompute", default=0, metavar="N",
                   help="also compute N random items again from the inputs and compare the bytes")
    p.add_argument("--storage-options", help="JSON of fsspec options")
    _add_common(p)
    p = command("inspect", "summarize the per-tensor change a run recorded, per layer; optionally plot it",
                EXAMPLES["inspect"])
    p.add_argument("checkpoint", help="a checkpoint written by raymerge (local path or URL)")
    p.add_argument("--plot", metavar="FILE.png", help="draw relative change per layer and tensor type")
    p.add_argument("--storage-options", help="JSON of fsspec options")
    _add_common(p)
    p = command("demo", "make a tiny Llama trio, merge it on a local Ray and check every bit", EXAMPLES["demo"])
    p.add_argument("--dir", help="folder for the trio and the output (default: a new temp folder)")
    p.add_argument("--workers", help="worker actors (default: the machine's CPUs)")  # text: merge's --workers checks it
    _add_common(p)
    return parser


def recipe_values(args: argparse.Namespace) -> dict:
    """The flags given, as the keys of a recipe file (flags left out are not in it)."""
    return recipe_from_flags({o.key: getattr(args, o.key) for o in OPTIONS if getattr(args, o.key, None) is not None})


def _report(result, path: str | None = None) -> None:
    if path:
        _write_report(path, json.dumps(result.report(), indent=1).encode())
    print(f"raymerge: {result.kind}: wrote {result.output_bytes / 1e9:.2f} GB in {len(result.shards)} shards to "
          f"{result.out}; execute {result.execute_seconds:.1f}s ({result.gbps:.2f} GB/s, "
          f"{result.steady_gbps:.2f} GB/s steady), "
          f"{result.seconds:.1f}s in all")
    print(f"  read {result.read_bytes / 1e9:.2f} GB; {result.items} items ({result.items_done_before} done before, "
          f"{result.items_retried} retried)")
    if result.pass_seconds:
        print("  statistics passes: " + ", ".join(f"{n} {t:.1f}s" for n, t in result.pass_seconds.items()))
    if result.peak_rss:
        print("  peak memory per worker: " + ", ".join(f"{w} {b / 2**20:.0f} MiB" for w, b in sorted(result.peak_rss.items())))
    if result.nonfinite:
        print(f"  inf/NaN output elements in {len(result.nonfinite)} tensors (committed with --allow-nonfinite, or "
              "taken from inputs that hold them): " + listed(f"{n} {c}" for n, (c, _) in result.nonfinite.items()))


def _write_report(path: str, data: bytes) -> None:
    """The report, into a regular file only: a FIFO given as the path must not block a finished run
    (`check_writable` refused one before the run; this is for a path changed since)."""
    try:
        write_regular(path, data)
    except OSError as e:
        raise RaymergeError(f"--report {path}: the run is committed, but its report could not be written "
                            f"({e.strerror or e}); give a regular file's path") from e


def check_writable(path: str | None, flag: str) -> None:
    """Refuse, before any work, a path for a report or a plot that is no regular file or whose folder
    is missing (exit 2)."""
    if path is None:
        return
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise InputError(f"{flag} {path}: its folder does not exist; create it or give another path") from None
        return
    except (OSError, ValueError) as e:
        reason = getattr(e, "strerror", None) or e
        raise InputError(f"{flag} {path}: cannot use it ({reason}); give another path") from e
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{flag} {path}: is {kind(st.st_mode)}, not a regular file; give a file's path")


def _check_report_is_no_input(path: str | None, recipe) -> None:
    """The report replaces whatever file has its name: never an input's (guard.check_not_input)."""
    from raymerge.commit.guard import check_not_input
    from raymerge.api import input_roles

    if path is not None:
        check_not_input(path, list(input_roles(recipe)), flag="--report")


def _run_kind(args: argparse.Namespace) -> int:
    from raymerge.api import run
    from raymerge.config import build_recipe

    check_writable(args.report, "--report")
    recipe, run_options = build_recipe(args.command, recipe_values(args))
    _check_report_is_no_input(args.report, recipe)
    _report(run(recipe, run_options), args.report)
    return 0


def _run_file(args: argparse.Namespace) -> int:
    from raymerge.api import run
    from raymerge.config import load_recipe_file
    from raymerge.execution.session import prefer_loopback

    check_writable(args.report, "--report")
    recipe, run_options = load_recipe_file(args.recipe, recipe_values(args))
    _check_report_is_no_input(args.report, recipe)
    prefer_loopback(run_options.address or os.environ.get("RAY_ADDRESS"))
    _report(run(recipe, run_options), args.report)
    return 0


def _plan(args: argparse.Namespace) -> int:
    from raymerge.api import describe, make_plan
    from raymerge.config import build_recipe, load_recipe_file

    if args.recipe:
        info = describe(make_plan(*load_recipe_file(args.recipe, recipe_values(args))))
    else:
        info = describe(make_plan(*build_recipe("merge", recipe_values(args))))
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"plan {info['plan_hash'][:16]}: {len(info['tensors'])} tensors, {len(info['shards'])} shards, "
          f"{len(info['items'])} items")
    print(f"  output: {info['output_bytes']:,} bytes; to read: {info['read_bytes']:,} bytes "
          f"from {len(info['inputs'])} input files")
    for s in info["shards"]:
        print(f"  {s['name']}: {s['size']:,} bytes, {s['tensors']} tensors, {s['items']} items")
    for line in layer_summary(info["layers"]):
        print("  " + line)
    for line in scale_summary(info["tensors"]):
        print("  " + line)
    for p in info["passes"]:
        only = f" (only {p['only']})" if p.get("only") else ""
        print(f"  pass {p['name']}: {p['items']} items, reads {p['read_bytes']:,} bytes{only}")
    for name, m in info["methods"].items():
        given = ", ".join(f"{k}={v}" for k, v in m["given"].items())
        print(f"  method {name}: {', '.join(m['passes'])}" + (f" ({given})" if given else ""))
    return 0


def layer_summary(layers: list[dict]) -> list[str]:
    """A frankenmerge's layers: a line per run of output layers taken from consecutive layers of the
    same inputs, e.g. `layers 8-15 <- chat 4-11, cp 4-11`."""
    runs: list[list] = []  # [first output layer, last, sources of the first]
    for entry in layers:
        now = [(s["role"], s["layer"]) for s in entry["from"]]
        if runs:
            first, last, start = runs[-1]
            if [r for r, _ in start] == [r for r, _ in now] and all(
                    i == i0 + entry["layer"] - first for (_, i0), (_, i) in zip(start, now)):
                runs[-1][1] = entry["layer"]
                continue
        runs.append([entry["layer"], entry["layer"], now])

    def span(a: int, b: int) -> str:
        return f"{a}" if a == b else f"{a}-{b}"

    return [f"layers {span(first, last)} <- " + ", ".join(f"{role} {span(i, i + last - first)}" for role, i in start)
            for first, last, start in runs]


def scale_summary(tensors: list[dict]) -> list[str]:
    """The resolved scales, per layer: one column per vector, a range where a layer's tensors
    differ; one line when every tensor has the same scales."""
    by_layer: dict[int | None, list[set[float]]] = {}
    for t in tensors:
        if t["scales"]:  # tensors without terms (copied, skipped) have no scale
            columns = by_layer.setdefault(t["layer"], [set() for _ in t["scales"]])
            for column, scale in zip(columns, t["scales"]):
                column.add(scale)

    def shown(values: set[float]) -> str:
        return f"{min(values):g}" if len(values) == 1 else f"{min(values):g}..{max(values):g}"

    if not by_layer:
        return []
    overall = [set().union(*c) for c in zip(*by_layer.values())]
    if all(len(c) == 1 for c in overall):
        return ["scales: " + " | ".join(shown(c) for c in overall) + " (every tensor)"]
    lines = ["scales per layer (one column per vector):"]
    for layer in sorted(k for k in by_layer if k is not None):
        lines.append(f"  layer {layer:>3}: " + " | ".join(shown(c) for c in by_layer[layer]))
    if None in by_layer:
        lines.append("  other    : " + " | ".join(shown(c) for c in by_layer[None]))
    return lines


def _inspect(args: argparse.Namespace) -> int:
    from raymerge.config import parse_storage_options
    from raymerge.inspect import inspect_checkpoint

    check_writable(args.plot, "--plot")
    summary = inspect_checkpoint(args.checkpoint, parse_storage_options(args.storage_options), args.plot)
    print("\n".join(one_line(line) for line in summary.splitlines()))  # names from the stats table
    return 0


def _verify(args: argparse.Namespace) -> int:
    from raymerge.api import verify
    from raymerge.config import parse_count, parse_storage_options

    args.recompute = parse_count(args.recompute, "--recompute", minimum=0)  # the flag's text, checked
    problems = verify(args.checkpoint, parse_storage_options(args.storage_options), args.recompute)
    for p in problems[:20]:  # each names a shard and tensors from the checkpoint's own headers
        print(f"raymerge verify: FAIL: {one_line(p)}")
    if len(problems) > 20:
        print(f"raymerge verify: FAIL: and {len(problems) - 20} more problems")
    if problems:
        return 1
    print(f"raymerge verify: OK: {args.checkpoint}" + (f" ({args.recompute} items recomputed)" if args.recompute else ""))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from raymerge.demo import run_demo

    return run_demo(args.dir, args.workers)


class _OneLineFormatter(logging.Formatter):
    """Log messages quote names from checkpoints: one line each, control characters escaped."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = one_line(record.message)
        return super().formatMessage(record)


def configure_logging(verbose: int, quiet: bool) -> None:
    """Progress (execute, commit, done) by default; phase details with -v; debug with -vv; -q: warnings."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter("%(asctime)s raymerge %(levelname)s %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("raymerge")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if verbose >= 2 else logging.INFO if verbose else logging.WARNING)
    logger.propagate = False
    logging.getLogger("raymerge.progress").setLevel(logging.WARNING if quiet else logging.NOTSET if verbose
                                                    else logging.INFO)


COMMANDS = {**{kind: _run_kind for kind, how in RECIPES.items() if how.command}, "plan": _plan,
            "run": _run_file, "inspect": _inspect, "verify": _verify, "demo": _demo}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose, args.quiet)
    if args.command in (*(k for k, h in RECIPES.items() if h.command), "demo"):  # `run`: once its file is read
        from raymerge.execution.session import prefer_loopback

        prefer_loopback(getattr(args, "address", None) or os.environ.get("RAY_ADDRESS"))
    try:
        return COMMANDS[args.command](args)
    except RaymergeError as e:
        if args.debug:
            raise
        print(f"raymerge: error: {redact(str(e))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("raymerge: interrupted; nothing was committed", file=sys.stderr)
        return 130
