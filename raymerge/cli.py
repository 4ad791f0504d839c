"""The command line: parse, then hand over to the API. Errors become one line and exit status 2
(bad input) or 1 (a failed run); `--debug` shows the traceback."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from raymerge import __version__
from raymerge.errors import RaymergeError

MERGE_EXAMPLE = """example:
  raymerge merge --base s3://models/llama2-7b --chat s3://models/llama2-7b-chat \\
                 --cp s3://models/llama2-7b-zh-cp --out s3://models/llama2-7b-zh-chat --scale 0.5
"""
PLAN_EXAMPLE = """example:
  raymerge plan --base ./base --chat ./chat --cp ./cp --json | jq .output_bytes
"""
DEMO_EXAMPLE = """example:
  raymerge demo                 # makes a tiny Llama trio in a temp folder, merges it on a local Ray
  raymerge demo --dir ./demo    # keep the trio and the output in ./demo
"""


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")


def _add_recipe(p: argparse.ArgumentParser, with_out: bool) -> None:
    p.add_argument("--base", required=True, help="the base model the chat model was tuned from (URL)")
    p.add_argument("--chat", required=True, help="the chat model (URL)")
    p.add_argument("--cp", required=True, help="the model continually pre-trained on the new language (URL)")
    p.add_argument("--out", required=with_out, help="where the merged checkpoint goes (local path or s3://)")
    p.add_argument("--scale", default="1.0", help="weight of the chat vector (default 1.0; the paper also uses 0.5)")
    p.add_argument("--dtype", help="output dtype of float tensors (default: the cp tensor's dtype)")
    p.add_argument("--shard-size", default="5GB", help="max output shard size, decimal units like HF (default 5GB)")
    p.add_argument("--item-size", default="32MiB", help="bytes per work item (default 32MiB; S3 parts >= 5MiB)")
    p.add_argument("--storage-options", help="JSON of fsspec options for every URL, e.g. "
                   '\'{"client_kwargs": {"endpoint_url": "http://host:9000"}}\'')


def _add_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a private local Ray)")
    p.add_argument("--workers", type=int, help="worker actors (default: the cluster's CPUs / --cpus-per-worker)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per worker (default 1)")
    p.add_argument("--in-flight", type=int, default=2, help="items per worker at once (default 2)")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint already at --out")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raymerge", description="Chat-vector merges of LLM checkpoints, "
                                     "streamed by range from local disk or S3 and computed on Ray.")
    parser.add_argument("--version", action="version", version=f"raymerge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("merge", help="out = cp + scale * (chat - base)", epilog=MERGE_EXAMPLE, formatter_class=fmt)
    _add_recipe(p, with_out=True)
    _add_run(p)
    _add_common(p)
    p = sub.add_parser("plan", help="print the plan of a merge; reads headers only, writes nothing",
                       epilog=PLAN_EXAMPLE, formatter_class=fmt)
    _add_recipe(p, with_out=False)
    p.add_argument("--json", action="store_true", help="print the whole plan as JSON")
    _add_common(p)
    p = sub.add_parser("demo", help="make a tiny Llama trio, merge it on a local Ray and check every bit",
                       epilog=DEMO_EXAMPLE, formatter_class=fmt)
    p.add_argument("--dir", help="folder for the trio and the output (default: a new temp folder)")
    p.add_argument("--workers", type=int, help="worker actors (default: the machine's CPUs)")
    _add_common(p)
    return parser


def _options(args: argparse.Namespace) -> dict:
    opts = dict(dtype=args.dtype, shard_size=args.shard_size, item_size=args.item_size,
                storage_options=args.storage_options)
    if args.command == "merge":
        opts.update(workers=args.workers, cpus_per_worker=args.cpus_per_worker, in_flight=args.in_flight,
                    address=args.address, overwrite=args.overwrite)
    return opts


def _merge(args: argparse.Namespace) -> int:
    from raymerge.api import merge

    result = merge(args.base, args.chat, args.cp, args.out, scale=args.scale, **_options(args))
    print(f"raymerge: wrote {result.output_bytes / 1e9:.2f} GB in {len(result.shards)} shards to {result.out} "
          f"in {result.seconds:.1f}s ({result.gbps:.2f} GB/s)")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from raymerge.api import describe, plan

    the_plan = plan(args.base, args.chat, args.cp, scale=args.scale, out=args.out, **_options(args))
    info = describe(the_plan)
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


def _demo(args: argparse.Namespace) -> int:
    from raymerge.demo import run_demo

    return run_demo(args.dir, args.workers)


def configure_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.INFO if verbose < 2 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s raymerge %(levelname)s %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("raymerge")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose, args.quiet)
    run = {"merge": _merge, "plan": _plan, "demo": _demo}[args.command]
    try:
        return run(args)
    except RaymergeError as e:
        if args.debug:
            raise
        print(f"raymerge: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("raymerge: interrupted; nothing was committed", file=sys.stderr)
        return 130
