"""The command line: parse flags into a recipe, hand it to the API. Errors become one line and
exit status 2 (bad input) or 1 (a failed run); `--debug` shows the traceback."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from raymerge import __version__
from raymerge.errors import RaymergeError
from raymerge.storage.urls import redact

EXAMPLES = {
    "merge": """example:
  raymerge merge --base s3://models/llama2-7b --chat s3://models/llama2-7b-chat \\
                 --cp s3://models/llama2-7b-zh-cp --out s3://models/llama2-7b-zh-chat --scale 0.5
  # two chat models against one base, one --scale each, in order:
  raymerge merge --base ./base --chat ./chat-a --scale 0.5 --chat ./chat-b --scale 0.5 --cp ./cp --out ./out
""",
    "extract": """example:
  raymerge extract --base s3://models/llama2-7b --chat s3://models/llama2-7b-chat --out s3://vectors/llama2-chat
""",
    "apply": """example:
  raymerge apply --cp ./llama2-zh-cp --vector ./vec-chat --scale 0.5 --vector ./vec-math --scale 0.5 --out ./out
""",
    "plan": """example:
  raymerge plan --base ./base --chat ./chat --cp ./cp --json | jq .output_bytes
""",
    "run": """example:
  raymerge run recipe.yaml        # kind: merge|extract|apply, plus the command's flags as keys
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


def _add_recipe(p: argparse.ArgumentParser, kind: str, out_required: bool = True) -> None:
    if kind in ("merge", "extract"):
        p.add_argument("--base", required=True, help="the base model the chat model was tuned from (URL)")
        p.add_argument("--chat", required=True, action="append",
                       help="the chat model (URL)" + ("; repeat for several, one --scale each" if kind == "merge" else ""))
    if kind in ("merge", "apply"):
        p.add_argument("--cp", required=True, help="the model continually pre-trained on the new language (URL)")
    if kind == "apply":
        p.add_argument("--vector", required=True, action="append",
                       help="a vector made by `raymerge extract` (URL); repeat for several, one --scale each")
    p.add_argument("--out", required=out_required, help="where the checkpoint goes (local path or s3://)")
    if kind in ("merge", "apply"):
        p.add_argument("--scale", action="append", help="weight of each vector, in order (default 1.0 each)")
        p.add_argument("--vocab", choices=("overlap", "skip", "error"),
                       help="embedding/head rows when cp's vocabulary is larger: overlap (default: shared rows "
                            "get the vector, cp's extra rows stay), skip (no vector), error")
        p.add_argument("--skip", action="append", metavar="REGEX", help="tensors copied from cp unchanged (repeatable)")
        p.add_argument("--no-chat-template", dest="chat_template", action="store_false", default=None,
                       help="keep cp's chat template and EOS instead of the chat model's")
    if kind == "merge":
        p.add_argument("--special-tokens", metavar="CP_ID:CHAT_ID,...",
                       help="set these rows of the output embedding and head to the chat model's rows")
    p.add_argument("--dtype", help="output dtype of float tensors (default: cp's; extract: float32)")
    p.add_argument("--shard-size", help="max output shard size, decimal units like HF (default 5GB)")
    p.add_argument("--item-size", help="bytes per work item (default 32MiB; S3 parts >= 5MiB)")
    p.add_argument("--storage-options", help="JSON of fsspec options for every URL, e.g. "
                   '\'{"client_kwargs": {"endpoint_url": "http://host:9000"}}\'')


def _add_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a private local Ray)")
    p.add_argument("--workers", type=int, help="worker actors (default: the cluster's CPUs / --cpus-per-worker)")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs per worker (default 1)")
    p.add_argument("--in-flight", type=int, help="items per worker at once (default 2)")
    p.add_argument("--gpus-per-worker", type=float, help="GPUs per worker: the arithmetic runs there (default 0)")
    p.add_argument("--worker-resource", metavar="NAME",
                   help="run workers only on nodes that advertise this custom Ray resource (e.g. ray start "
                        "--resources '{\"merge\": 16}')")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace a checkpoint (or an unfinished run) already at --out")
    p.add_argument("--report", metavar="FILE.json", help="save the run report (bytes, times, GB/s, retries, memory)")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue the unfinished run at --out: only items not yet done are done")
    p.add_argument("--allow-nonfinite", action="store_true", default=None,
                   help="commit even when finite inputs give inf/NaN output (F16 overflow); counts are in the "
                        "stats and the report")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line like every other error (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"raymerge: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="raymerge", description="Chat-vector merges of LLM checkpoints, "
                                     "streamed by range from local disk or S3 and computed on Ray.")
    parser.add_argument("--version", action="version", version=f"raymerge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, epilog=EXAMPLES[name],
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    for kind, text in (("merge", "out = cp + sum_i scale_i * (chat_i - base)"),
                       ("extract", "store the chat vector chat - base (float32 by default)"),
                       ("apply", "out = cp + sum_i scale_i * vector_i")):
        p = command(kind, text)
        _add_recipe(p, kind)
        _add_run(p)
        _add_common(p)
    p = command("plan", "print the plan of a merge; reads headers only, writes nothing")
    _add_recipe(p, "merge", out_required=False)
    p.add_argument("--json", action="store_true", help="print the whole plan as JSON")
    _add_common(p)
    p = command("run", "run a YAML recipe (kind: merge, extract or apply, and the command's flags as keys)")
    p.add_argument("recipe", help="the recipe file")
    _add_common(p)
    p = command("verify", "check a checkpoint against its manifest: shards, headers, index, checksums")
    p.add_argument("checkpoint", help="a checkpoint written by raymerge (local path or URL)")
    p.add_argument("--recompute", type=int, default=0, metavar="N",
                   help="also compute N random items again from the inputs and compare the bytes")
    p.add_argument("--storage-options", help="JSON of fsspec options")
    _add_common(p)
    p = command("inspect", "summarize the per-tensor change a run recorded, per layer; optionally plot it")
    p.add_argument("checkpoint", help="a checkpoint written by raymerge (local path or URL)")
    p.add_argument("--plot", metavar="FILE.png", help="draw relative change per layer and tensor type")
    p.add_argument("--storage-options", help="JSON of fsspec options")
    _add_common(p)
    p = command("demo", "make a tiny Llama trio, merge it on a local Ray and check every bit")
    p.add_argument("--dir", help="folder for the trio and the output (default: a new temp folder)")
    p.add_argument("--workers", type=int, help="worker actors (default: the machine's CPUs)")
    _add_common(p)
    return parser


RECIPE_FLAGS = ("base", "chat", "cp", "vector", "out", "scale", "vocab", "skip", "special_tokens", "chat_template",
                "dtype", "shard_size", "item_size", "storage_options", "address", "workers", "cpus_per_worker",
                "in_flight", "overwrite", "resume", "gpus_per_worker", "worker_resource", "allow_nonfinite")


def recipe_values(args: argparse.Namespace) -> dict:
    """The flags given, as the keys of a recipe file (flags left out are not in it)."""
    return {k: getattr(args, k) for k in RECIPE_FLAGS if getattr(args, k, None) is not None}


def _report(result, path: str | None = None) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result.report(), f, indent=1)
    print(f"raymerge: {result.kind}: wrote {result.output_bytes / 1e9:.2f} GB in {len(result.shards)} shards to "
          f"{result.out}; execute {result.execute_seconds:.1f}s ({result.gbps:.2f} GB/s, "
          f"{result.steady_gbps:.2f} GB/s steady), "
          f"{result.seconds:.1f}s in all")
    print(f"  read {result.read_bytes / 1e9:.2f} GB; {result.items} items ({result.items_done_before} done before, "
          f"{result.items_retried} retried)")
    if result.peak_rss:
        print("  peak memory per worker: " + ", ".join(f"{w} {b / 2**20:.0f} MiB" for w, b in sorted(result.peak_rss.items())))
    if result.nonfinite:
        print(f"  inf/NaN output elements in {len(result.nonfinite)} tensors (committed with --allow-nonfinite, or "
              "taken from inputs that hold them): " + ", ".join(f"{n} {c}" for n, (c, _) in list(result.nonfinite.items())[:5]))


def _run_kind(args: argparse.Namespace) -> int:
    from raymerge.api import run
    from raymerge.config import build_recipe

    _report(run(*build_recipe(args.command, recipe_values(args))), args.report)
    return 0


def _run_file(args: argparse.Namespace) -> int:
    from raymerge.api import run
    from raymerge.config import load_recipe_file
    from raymerge.session import prefer_loopback

    recipe, run_options = load_recipe_file(args.recipe)
    prefer_loopback(run_options.address or os.environ.get("RAY_ADDRESS"))
    _report(run(recipe, run_options))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from raymerge.api import describe, make_plan
    from raymerge.config import build_recipe

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
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from raymerge.config import parse_storage_options
    from raymerge.inspect import inspect_checkpoint

    print(inspect_checkpoint(args.checkpoint, parse_storage_options(args.storage_options), args.plot))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from raymerge.commit.verify import verify
    from raymerge.config import parse_count, parse_storage_options

    parse_count(args.recompute, "--recompute", minimum=0)
    problems = verify(args.checkpoint, parse_storage_options(args.storage_options), args.recompute)
    for p in problems:
        print(f"raymerge verify: FAIL: {p}")
    if problems:
        return 1
    print(f"raymerge verify: OK: {args.checkpoint}" + (f" ({args.recompute} items recomputed)" if args.recompute else ""))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from raymerge.demo import run_demo

    return run_demo(args.dir, args.workers)


def configure_logging(verbose: int, quiet: bool) -> None:
    """Progress (execute, commit, done) by default; phase details with -v; debug with -vv; -q: warnings."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s raymerge %(levelname)s %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("raymerge")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if verbose >= 2 else logging.INFO if verbose else logging.WARNING)
    logger.propagate = False
    logging.getLogger("raymerge.progress").setLevel(logging.WARNING if quiet else logging.NOTSET if verbose
                                                    else logging.INFO)


COMMANDS = {"merge": _run_kind, "extract": _run_kind, "apply": _run_kind, "plan": _plan, "run": _run_file,
            "inspect": _inspect, "verify": _verify, "demo": _demo}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose, args.quiet)
    if args.command in ("merge", "extract", "apply", "demo"):  # `run` does it once its file is read
        from raymerge.session import prefer_loopback

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
