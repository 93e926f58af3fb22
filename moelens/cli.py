"""The ``moelens`` command line: ``collect``, ``import``, ``analyze``, ``prune``, ``families``, ``zoo``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _json_mapping(text: str) -> dict[str, Any]:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error.msg} at column {error.colno}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _auto_or_json(text: str) -> str | dict[str, Any]:
    return _json_mapping(text) if text.lstrip().startswith("{") else text


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1 (got {text})")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more (got {text})")
    return value


def _layer_list(text: str) -> list[int]:
    """``1,2,3`` or ``3-60`` or ``1,3-5``: the layer indices, in the order written."""
    layers: list[int] = []
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            layers += list(range(int(first), int(last) + 1)) if dash else [int(first)]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected layer indices like 1,2,3 or 3-60, got {text!r}") from None
    return layers


_ZOO_SCRIPTS = {
    "build-corpus": "build the multi-domain training corpus of moelens-tiny (module moelens.training.corpus)",
    "train-tiny": "train moelens-tiny on a corpus built by build-corpus (module moelens.training.train)",
    "probes": "write the probe sets in data/probes (module moelens.training.probes)",
    "evidence": "measure moelens-tiny's specialization: NMI, targeted vs random ablation (module moelens.training.evidence)",
}
_ZOO_MODULES = {"build-corpus": "corpus", "train-tiny": "train", "probes": "probes", "evidence": "evidence"}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moelens", description="Look inside Mixture-of-Experts models and steer them.")
    commands = parser.add_subparsers(dest="command", required=True)

    collect = commands.add_parser("collect", help="trace prompts through a model into a Parquet trace store")
    collect.add_argument("model", help="checkpoint directory, 'moelens-tiny' or 'tiny:<family>'")
    collect.add_argument("prompts", help="prompt file: .txt (a prompt per line), .jsonl/.csv/.parquet with a `text` field")
    collect.add_argument("--out", required=True, type=Path, help="store directory to create (or continue with --resume)")
    collect.add_argument("--batch-size", type=_positive_int, default=8)
    collect.add_argument("--max-new-tokens", type=_non_negative_int, default=0, help="generate this many tokens per prompt (greedy) and trace them too")
    collect.add_argument("--full-logits", action="store_true", help="also store every router's full logits")
    collect.add_argument("--resume", action="store_true", help="continue an interrupted collection into --out")
    collect.add_argument("--truncate", action="store_true", help="cut prompts longer than the context instead of refusing them")
    collect.add_argument("--shard-size", type=_positive_int, default=64, help="prompts per shard (unit of crash safety)")
    collect.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ...")
    collect.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    collect.add_argument("--device-map", default=None, type=_auto_or_json,
                         help='auto (spread a large model over the devices) or a JSON {module: device} map; "disk" offloads')
    collect.add_argument("--max-memory", default=None, type=_json_mapping, help='JSON {device: size}, e.g. {"0": "70GiB", "cpu": "200GiB"}')
    collect.add_argument("--offload-folder", default=None, help="where weights offloaded to disk are kept")
    collect.add_argument("--intervention", type=Path, default=None, help="JSON intervention spec applied while tracing (recorded in the manifest)")
    collect.add_argument("--no-progress", action="store_true", help="no progress bar")

    imported = commands.add_parser(
        "import", help="import the routed experts vLLM or SGLang returned into a trace store (expert ids, no weights)",
        description="Import routed experts from serving engines (see moelens.engines): saved responses, or prompts sent to a live server.",
    )
    imported.add_argument("source", help="saved responses (.jsonl, one per line, or .json) or a server URL, e.g. http://localhost:8000")
    imported.add_argument("--out", required=True, type=Path, help="store directory to create")
    imported.add_argument("--model", required=True, help="the model's name, recorded in the manifest (for a live vLLM server: the served name)")
    imported.add_argument("--engine", choices=["vllm", "sglang"], help="the engine (default: recognised from the responses; needed with a URL)")
    imported.add_argument("--moe-layers", type=_layer_list, help="the model's MoE layer indices in order, e.g. 1,2,3 or 3-60 (default: from --config)")
    imported.add_argument("--config", type=Path, help="the model's config.json or checkpoint directory: MoE layers, experts, top-k")
    imported.add_argument("--num-experts", type=_positive_int, help="routed experts per MoE layer (default: from --config)")
    imported.add_argument("--top-k", type=_positive_int, help="experts per token (default: from --config or the responses)")
    imported.add_argument("--tokenizer", help="tokenizer directory: token strings and special tokens in the store")
    imported.add_argument("--engine-version", help="recorded in the manifest (a live server is asked)")
    imported.add_argument("--prompts", type=Path, help="with a URL: the prompt file to send (as for collect)")
    imported.add_argument("--max-new-tokens", type=_non_negative_int, default=0, help="with a URL: tokens to generate per prompt (greedy), as for collect")
    imported.add_argument("--shard-size", type=_positive_int, default=64, help="sequences per shard")

    prune = commands.add_parser("prune", help="write a checkpoint with the experts a keep spec leaves out physically removed")
    prune.add_argument("model", help="checkpoint directory, 'moelens-tiny' or 'tiny:<family>'")
    prune.add_argument("spec", type=Path, help='JSON spec: {"version": 2, "interventions": [{"kind": "keep", "experts": {"<layer>": [experts...]}}]}')
    prune.add_argument("--out", required=True, type=Path)

    families = commands.add_parser(
        "families", help="which MoE families of the installed transformers moelens traces and steers (builds a tiny model of each)"
    )
    families.add_argument("model_types", nargs="*", help="only these model types (default: every MoE model type)")

    from moelens.analysis.cli import add_analyze_parser

    add_analyze_parser(commands)

    zoo = commands.add_parser("zoo", help="the built-in models")
    zoo_commands = zoo.add_subparsers(dest="zoo_command", required=True)
    zoo_commands.add_parser("list", help="names moelens.load accepts besides a directory")
    save = zoo_commands.add_parser("save", help="write a zoo model as an ordinary Hugging Face checkpoint")
    save.add_argument("name")
    save.add_argument("out", type=Path)
    for name, help_text in _ZOO_SCRIPTS.items():
        # listed for --help; main() hands everything after the name to the script's own parser
        zoo_commands.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``moelens`` command line with ``argv`` (default ``sys.argv[1:]``); returns the exit
    code: 0 done, 2 a user error (one line on stderr saying what to do), 130 interrupted."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["zoo"] and argv[1:2] and argv[1] in _ZOO_SCRIPTS:
        # these scripts own their arguments (argparse cannot pass leading options through)
        return _run_zoo_script(argv[1], argv[2:])
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        with _messages_on_stderr():
            return _dispatch(args)
    except KeyboardInterrupt:
        print("moelens: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # user-facing errors become one clear line; bugs keep their traceback
        if not _is_user_error(error):
            raise
        print(f"moelens: error: {error}", file=sys.stderr)
        return 2


@contextmanager
def _messages_on_stderr() -> Iterator[None]:
    """Show moelens' INFO and WARNING log records (run summaries, repairs) on stderr for one command.

    The library only logs; a command line is where they should print. The handler writes to the
    stderr of the moment and is removed afterwards, so calling ``main`` repeatedly (tests, notebooks)
    never stacks handlers.
    """
    logger = logging.getLogger("moelens")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # the user's root handlers would print every record twice
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _is_user_error(error: Exception) -> bool:
    """moelens' own errors and bad input (their messages say what to do); anything else is a bug."""
    from moelens.errors import MoelensError

    return isinstance(error, (MoelensError, ValueError, FileNotFoundError))


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "collect":
        from moelens.collect import CollectOptions, collect

        options = CollectOptions(
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            full_logits=args.full_logits,
            resume=args.resume,
            truncate=args.truncate,
            shard_size=args.shard_size,
            device=args.device,
            dtype=args.dtype,
            device_map=args.device_map,
            max_memory=args.max_memory,
            offload_folder=args.offload_folder,
            progress=not args.no_progress,
        )
        intervention = _read_spec(args.intervention) if args.intervention else None
        collect(args.model, args.prompts, args.out, options, intervention=intervention)
        return 0
    if args.command == "import":
        from moelens.engines import import_routes

        import_routes(
            args.source,
            args.out,
            model=args.model,
            engine=args.engine,
            moe_layers=args.moe_layers,
            config=args.config,
            num_experts=args.num_experts,
            top_k=args.top_k,
            tokenizer=args.tokenizer,
            engine_version=args.engine_version,
            prompts=args.prompts,
            max_new_tokens=args.max_new_tokens,
            shard_size=args.shard_size,
        )
        return 0
    if args.command == "prune":
        from moelens.interventions.export import export_pruned
        from moelens.loading import load

        spec = _read_spec(args.spec)
        model, tokenizer = load(args.model)
        print(export_pruned(model, tokenizer, spec, args.out))
        return 0
    if args.command == "analyze":
        from moelens.analysis.cli import run_analyze

        return run_analyze(args)
    if args.command == "families":
        from moelens.zoo.families import family_reports, format_reports

        print(format_reports(family_reports(args.model_types or None)))
        return 0
    if args.command == "zoo":
        return _zoo(args)
    raise AssertionError(args.command)


def _read_spec(path: Path) -> Any:
    from moelens.interventions import Intervention

    if not path.is_file():
        raise FileNotFoundError(f"intervention spec {path} does not exist")
    return Intervention.read(str(path))


def _zoo(args: argparse.Namespace) -> int:
    if args.zoo_command == "list":
        from moelens.loading import zoo_names

        print("\n".join(zoo_names()))
    elif args.zoo_command == "save":
        from moelens.loading import save_zoo_model

        print(save_zoo_model(args.name, args.out))
    return 0


def _run_zoo_script(name: str, script_args: list[str]) -> int:
    import importlib

    module = importlib.import_module(f"moelens.training.{_ZOO_MODULES[name]}")
    return int(module.main(script_args) or 0)


if __name__ == "__main__":
    sys.exit(main())
