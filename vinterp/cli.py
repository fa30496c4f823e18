"""The ``vinterp`` command line.

Example:
    $ vinterp models pull smollm2-135m
    $ vinterp models list

Each subcommand group is a function ``add_<group>_parser(subparsers)`` that registers its
parser and sets ``func`` (called with the parsed args, returns an exit code); add a group by
writing one and listing it in ``SUBCOMMAND_GROUPS``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from vinterp.models.registry import (
    KNOWN_MODELS,
    ModelNotFoundError,
    check_known,
    list_models,
    pull,
)


def _models_pull(args: argparse.Namespace) -> int:
    names = list(KNOWN_MODELS) if "all" in args.names else args.names
    for name in names:
        check_known(name)  # fail before pulling anything
    for name in names:
        path = pull(name, force=args.force)
        print(f"{name}: {path}")
    return 0


def _models_list(args: argparse.Namespace) -> int:
    rows = list_models()
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        state = "ready" if r["provisioned"] else "not pulled"
        print(f"{r['name']:<{width}}  {state:<10}  {r['path']}")
        if args.verbose:
            print(f"{'':<{width}}  {r['description']}")
    return 0


def add_models_parser(subparsers: argparse._SubParsersAction) -> None:
    """``vinterp models pull|list``: the offline model cache."""
    models = subparsers.add_parser("models", help="provision and list offline models")
    sub = models.add_subparsers(dest="models_command", required=True)
    p = sub.add_parser("pull", help="provision known models into the cache ($VINTERP_HOME)")
    p.add_argument("names", nargs="+", metavar="NAME", help="model name(s), or `all`")
    p.add_argument("--force", action="store_true", help="rebuild even if present")
    p.set_defaults(func=_models_pull)
    ls = sub.add_parser("list", help="show known models and where they are")
    ls.add_argument("-v", "--verbose", action="store_true", help="also show descriptions")
    ls.set_defaults(func=_models_list)


def _serve(args: argparse.Namespace) -> int:
    from vinterp_server.serve import main as serve_main

    return serve_main(args, args.vllm_args)


def add_serve_parser(subparsers: argparse._SubParsersAction) -> None:
    """``vinterp serve``: the OpenAI-compatible intervention server (options not listed here
    go to vLLM's engine, e.g. ``--max-model-len 2048``)."""
    from vinterp_server.serve import add_arguments

    p = subparsers.add_parser(
        "serve", help="run the OpenAI-compatible intervention server",
        description="Run vinterp's server: one AsyncLLM engine with the plugin. Options not "
                    "listed below go to vLLM (engine and front end), e.g. --max-model-len.")
    add_arguments(p)
    p.set_defaults(func=_serve, vllm_args=[])


SUBCOMMAND_GROUPS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_models_parser, add_serve_parser]


def build_parser() -> argparse.ArgumentParser:
    """The full ``vinterp`` argument parser."""
    parser = argparse.ArgumentParser(prog="vinterp", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMAND_GROUPS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (2 for usage errors and unknown models)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest:
        if getattr(args, "command", None) != "serve":
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        args.vllm_args = rest
    try:
        return args.func(args)
    except ModelNotFoundError as e:
        print(f"vinterp: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
