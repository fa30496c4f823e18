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

    # vLLM's --api-key KEY does not protect vinterp's routes, and vLLM users type it out of
    # habit: refuse it rather than pass a secret on to vLLM (and never echo the key)
    if any(a == "--api-key" or a.startswith("--api-key=") for a in args.vllm_args):
        print("vinterp serve: --api-key is vLLM's option; vinterp takes its keys from "
              "--api-keys FILE (one key a line) or VINTERP_API_KEYS (comma-separated keys)",
              file=sys.stderr)
        return 2
    return serve_main(args, args.vllm_args)


def add_serve_parser(subparsers: argparse._SubParsersAction) -> None:
    """``vinterp serve``: the OpenAI-compatible intervention server (options not listed here
    go to vLLM's engine, e.g. ``--max-model-len 2048``)."""
    from vinterp_server.serve import add_arguments

    # allow_abbrev=False: unknown options go to vLLM, so a prefix of one of ours must not be
    # taken as ours (vLLM's --api-key KEY became --api-keys, reading the key as a file name)
    p = subparsers.add_parser(
        "serve", help="run the OpenAI-compatible intervention server", allow_abbrev=False,
        description="Run vinterp's server: one AsyncLLM engine with the plugin. Options not "
                    "listed below go to vLLM (engine and front end), e.g. --max-model-len.")
    add_arguments(p)
    p.set_defaults(func=_serve, vllm_args=[])


def _int_range(spec: str) -> list[int]:
    """``8:20`` (8..19, as a Python slice), ``8:20:2``, ``8,10,12`` or ``8``."""
    try:
        if ":" in spec:
            parts = [int(x) for x in spec.split(":")]
            if len(parts) not in (2, 3):
                raise ValueError
            return list(range(*parts))
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad layer list {spec!r}: use START:STOP (stop excluded), START:STOP:STEP or "
            "a comma list such as 8,10,12") from None


def _scale_list(spec: str) -> list[float]:
    """``-8:8:9`` (9 evenly spaced values from -8 to 8, both included) or ``-4,0,4``."""
    try:
        if ":" in spec:
            lo, hi, n = spec.split(":")
            lo_f, hi_f, num = float(lo), float(hi), int(n)
            if num < 1:
                raise ValueError
            if num == 1:
                return [lo_f]
            return [round(lo_f + (hi_f - lo_f) * i / (num - 1), 6) for i in range(num)]
        return [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad scale list {spec!r}: use LO:HI:N (N values, both ends included) or a "
            "comma list such as -4,0,4") from None


def _steer_model(args: argparse.Namespace) -> object:
    """The local LanguageModel for ``steer train``/``eval`` (not with --server)."""
    import os

    if args.backend == "vllm":
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vinterp import LanguageModel

    kw = {"max_model_len": args.max_model_len} if args.backend == "vllm" else {}
    return LanguageModel(args.model, backend=args.backend, **kw)


TRAIN_MODEL = "smollm2-135m"   # ``steer train``'s model when neither --model nor --server


def _train_model_name(args: argparse.Namespace) -> str:
    """``steer train``'s model: ``--model``, else the one ``--server`` serves, else
    :data:`TRAIN_MODEL`. ``--model`` has no parser default because a default would hide the
    server's model: the client would then tokenize with another model's tokenizer and label
    the vector with that model's name."""
    if args.model:
        return str(args.model)
    if args.server:
        from vinterp.evals.sweep import server_model

        return server_model(args.server, args.api_key)
    return TRAIN_MODEL


def _steer_train(args: argparse.Namespace) -> int:
    from vinterp.steering.datasets import data_path, read_prompts
    from vinterp.steering.train import train_vector

    pos = read_prompts(args.pos or data_path("sentiment_positive.txt"))
    neg = read_prompts(args.neg or data_path("sentiment_negative.txt"))
    args.model = _train_model_name(args)
    if args.server:
        from vinterp.evals.sweep import remote_language_model

        model = remote_language_model(args.model, args.server, args.api_key)
        kw = {"remote": args.server, **({"api_key": args.api_key} if args.api_key else {})}
    else:
        model, kw = _steer_model(args), {}
    vec = train_vector(model, pos, neg, layers=args.layers, method=args.method,
                       position=args.position, **kw)
    vec.save(args.output)
    norms = ", ".join(f"{k}: {v:.2f}" for k, v in vec.norms.items())
    print(f"{args.output}: {vec.method} vector, layers {vec.layers}, hidden size "
          f"{vec.hidden_size}, from {len(pos)} positive / {len(neg)} negative prompts; "
          f"norms {{{norms}}}")
    return 0


def _steer_eval(args: argparse.Namespace) -> int:
    from vinterp.evals.sweep import sweep
    from vinterp.steering.datasets import read_ab_questions, read_prompts
    from vinterp.steering.vectors import SteeringVector

    vec = SteeringVector.load(args.vector)
    prompts = read_prompts(args.prompts) if args.prompts else None
    questions = read_ab_questions(args.ab) if args.ab else None
    if args.server:
        target: object = args.server
        model = args.model
    else:
        model = None
        if args.model is None:
            args.model = vec.model
        if args.model is None:
            raise ValueError("the vector does not say which model it is for: pass --model")
        target = _steer_model(args)
    rows = sweep(target, vec, layers=args.layers, scales=args.scales, prompts=prompts,
                 max_tokens=args.max_tokens, metrics=args.metrics, out_dir=args.output,
                 ab_questions=questions, ab_mode=args.ab_mode,
                 batch_cells=args.batch_cells, model=model,
                 api_key=args.api_key, progress=not args.quiet)
    print(f"{args.output}: {len(rows)} cells; summary.md, summary.csv, heatmap_*.png")
    return 0


def _steer_show(args: argparse.Namespace) -> int:
    from vinterp.evals.show import show

    print(show(args.dir))
    return 0


def _steer_errors(func: Callable[[argparse.Namespace], int]
                  ) -> Callable[[argparse.Namespace], int]:
    """Bad input (files, sizes, layers) and a server that is down or refuses (``--server``)
    become one error line and exit code 2."""
    def run(args: argparse.Namespace) -> int:
        import httpx

        from vinterp.backends.remote import RemoteError

        try:
            return func(args)
        # RemoteError already says which server and what it answered (401, 429, 5xx, down);
        # httpx.HTTPError: a request made without the remote backend's wrapping
        except (ValueError, FileNotFoundError, KeyError, RemoteError, httpx.HTTPError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            print(f"vinterp steer: error: {msg}", file=sys.stderr)
            return 2
    return run


def add_steer_parser(subparsers: argparse._SubParsersAction) -> None:
    """``vinterp steer train|eval|show``: steering vectors and layer x scale sweeps."""
    import re

    steer = subparsers.add_parser("steer", help="train steering vectors and sweep them")
    sub = steer.add_subparsers(dest="steer_command", required=True)

    def target_args(p: argparse.ArgumentParser, shown_default: str) -> None:
        # no parser default: with --server the default is the served model, which only the
        # server knows (each subcommand resolves it: _train_model_name, sweep's _target)
        p.add_argument("--model", default=None,
                       help=f"model name or HF directory (default: {shown_default}; with "
                            "--server: the server's)")
        p.add_argument("--backend", choices=["hf", "vllm"], default="vllm",
                       help="local backend (default vllm)")
        p.add_argument("--max-model-len", type=int, default=1024,
                       help="vllm backend's max model length (default 1024)")
        p.add_argument("--server", metavar="URL", help="run on a vinterp server instead")
        p.add_argument("--api-key", help="the server's API key (default $VINTERP_API_KEY)")

    t = sub.add_parser("train", help="train a vector from contrastive prompt files")
    t.add_argument("--pos", metavar="FILE",
                   help="positive prompts, one a line (default: the shipped sentiment set)")
    t.add_argument("--neg", metavar="FILE", help="negative prompts, one a line")
    t.add_argument("--layers", type=_int_range, default=None,
                   help="START:STOP (stop excluded), START:STOP:STEP or 8,10 (default all)")
    t.add_argument("--method", choices=["mean_diff", "pca", "logistic"], default="mean_diff")
    t.add_argument("--position", choices=["last", "mean"], default="last")
    t.add_argument("-o", "--output", required=True, metavar="FILE.safetensors")
    target_args(t, TRAIN_MODEL)
    t.set_defaults(func=_steer_errors(_steer_train))

    e = sub.add_parser("eval", help="sweep a vector over layers x scales")
    # "-8:8:9" is a value, not an option
    e._negative_number_matcher = re.compile(r"^-\d+$|^-\d*\.\d+$|^-[\d.]+[:,][-\d.:,]*$")
    e.add_argument("--vector", required=True, metavar="FILE")
    e.add_argument("--layers", type=_int_range, default=None,
                   help="START:STOP (stop excluded), ... (default: the vector's layers)")
    e.add_argument("--scales", type=_scale_list, default=_scale_list("-8:8:9"),
                   help="LO:HI:N, both ends included, or a comma list (default -8:8:9)")
    e.add_argument("--prompts", metavar="FILE",
                   help="neutral prompts, one a line (default: the shipped 50)")
    e.add_argument("--ab", metavar="FILE",
                   help="A/B questions, JSONL (default: the shipped 40)")
    e.add_argument("--ab-mode", choices=["text", "letter"], default="text",
                   help="ab metric: score the answers' text (default) or the next token "
                        "A vs B (CAA's letter form; needs a model that answers A/B)")
    e.add_argument("--max-tokens", type=int, default=32)
    e.add_argument("--metrics", default="ab,behavior,fluency")
    e.add_argument("--batch-cells", type=int, default=None,
                   help="cells per batch (default: the whole grid at once)")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    e.add_argument("-o", "--output", required=True, metavar="DIR")
    target_args(e, "the vector's")
    e.set_defaults(func=_steer_errors(_steer_eval))

    s = sub.add_parser("show", help="best cell per metric and the effect/fluency Pareto front")
    s.add_argument("dir", metavar="DIR")
    s.set_defaults(func=_steer_errors(_steer_show))


SUBCOMMAND_GROUPS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_models_parser, add_serve_parser, add_steer_parser]


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
