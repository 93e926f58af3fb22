"""``moelens analyze {stats,ftri,npmi} STORE --out DIR``: analysis tables as CSV, figures as offline HTML.

:func:`add_analyze_parser` adds the ``analyze`` command to the ``moelens`` parser;
:func:`run_analyze` runs it and returns the exit code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go


def add_analyze_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``analyze`` (with ``stats``, ``ftri``, ``npmi``) to ``subparsers``; returns its parser."""
    analyze = subparsers.add_parser("analyze", help="analyse a trace store: CSV tables and HTML figures")
    kinds = analyze.add_subparsers(dest="analysis", required=True)

    def common(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser.add_argument("store", type=Path, help="trace store directory (from `moelens collect`)")
        parser.add_argument("--out", required=True, type=Path, help="directory for the CSV tables and HTML figures")
        return parser

    stats = common(kinds.add_parser("stats", help="frequency, load balance, entropy, co-activation, transitions, stability"))
    stats.add_argument("--by", action="append", default=[], help="group by a prompt tag or 'position_class' (repeatable)")
    stats.add_argument("--compare", type=Path, help="a second store of the same prompts: routing stability against it")

    ftri = common(kinds.add_parser("ftri", help="fTRI contrast map: experts specific to a group of prompts"))
    ftri.add_argument("--tag", required=True, help="prompt tag defining the groups, e.g. domain")
    ftri.add_argument("--target", required=True, help="the tag value of the target group")
    ftri.add_argument("--reference", action="append", help="a reference tag value (repeatable; default all other values)")
    ftri.add_argument("--permutations", type=_permutations, default="auto",
                      help="most label permutations per feature: a number, or auto (default: 20 x features / 0.05)")
    ftri.add_argument("--seed", type=int, default=0)
    ftri.add_argument("--spec", type=int, metavar="N", help="also write spec.json dropping the N most target-specific experts (over all layers)")

    npmi = common(kinds.add_parser("npmi", help="nPMI association of experts with a token condition"))
    condition = npmi.add_mutually_exclusive_group(required=True)
    condition.add_argument("--marker", action="append", help="marker token; with a leading + or - (write --marker=-TOKEN) or repeated: a signed combined score")
    condition.add_argument("--regex", help="regular expression searched in the token strings")
    condition.add_argument("--where", action="append", metavar="COLUMN=VALUE", help="prompt tag condition (repeatable: all must hold)")
    npmi.add_argument("--min-count", type=int, default=5, help="minimum support: joint tokens (condition and expert)")
    npmi.add_argument("--spec", type=int, metavar="N", help="also write spec.json reweighting the top N experts (over all layers)")
    npmi.add_argument("--factor", type=float, default=64.0, help="reweighting factor for --spec (RICE's best value, 64)")
    for parser in (stats, ftri, npmi):
        parser.add_argument("--top", type=int, default=20, help="experts in the ranked bar chart")
    return analyze


def run_analyze(args: argparse.Namespace) -> int:
    """Run ``moelens analyze``; prints the files written and returns 0."""
    from moelens.store import scan_trace

    tables = scan_trace(args.store)
    args.out.mkdir(parents=True, exist_ok=True)
    written = {"stats": _stats, "ftri": _ftri, "npmi": _npmi}[args.analysis](tables, args)
    for path in written:
        print(path)
    return 0


def _save(out: Path, tables: dict[str, pd.DataFrame], figures: dict[str, go.Figure]) -> list[Path]:
    from moelens.analysis.figures import write_html

    paths = []
    for name, table in tables.items():
        path = out / f"{name}.csv"
        table.to_csv(path, index=False)
        paths.append(path)
    paths += [write_html(figure, out / f"{name}.html") for name, figure in figures.items()]
    return paths


def _stats(tables: Any, args: argparse.Namespace) -> list[Path]:
    from moelens.analysis import figures, stats

    frequency = stats.expert_frequency(tables, args.by)
    results = {
        "frequency": frequency,
        "load_balance": stats.load_balance(tables, args.by, frequency=frequency),
        "coactivation": stats.coactivation(tables, args.by),
    }
    if tables.weights:
        results["token_entropy"] = stats.token_entropy(tables, args.by)
    else:  # an imported store holds expert ids only: everything but the weight-based entropy still applies
        print(f"moelens: token_entropy skipped: {args.store} holds expert ids only (no routing weights)", file=sys.stderr)
    layers, num_experts = tables.layers, tables.experts
    if len(layers) > 1:
        results["transitions"] = stats.transitions(tables, args.by)
    if args.compare is not None:
        from moelens.store import scan_trace

        results["stability"] = stats.routing_stability(tables, scan_trace(args.compare), args.by)
    overall = stats.expert_frequency(tables) if args.by else frequency
    plots = {"frequency": figures.heatmap(overall, "frequency", title="selection frequency")}
    for layer in layers:
        plots[f"coactivation_layer{layer}"] = figures.coactivation_matrix(results["coactivation"], layer, num_experts=num_experts)
    return _save(args.out, results, plots)


def _permutations(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 'auto' or a whole number >= 0 (got {value!r})")
    return number


def _ftri(tables: Any, args: argparse.Namespace) -> list[Path]:
    from moelens.analysis import figures, ftri

    target = _typed_like(tables, args.tag, args.target, "tag")
    reference = [_typed_like(tables, args.tag, value, "tag") for value in args.reference] if args.reference else None
    table = ftri.ftri_scores(tables, args.tag, target, reference, permutations=args.permutations, seed=args.seed)
    plots = {
        "ftri_heatmap": figures.heatmap(table, "difference", title=f"fTRI: {args.tag} = {args.target} vs reference"),
        "ftri_top": figures.ranked_bars(table, "difference", n=args.top),
    }
    paths = _save(args.out, {"ftri": table}, plots)
    if args.spec:
        paths.append(_write_spec(args.out, ftri.to_spec(table, args.spec)))
    return paths


def _npmi(tables: Any, args: argparse.Namespace) -> list[Path]:
    from moelens.analysis import figures, npmi

    signed = args.marker and (len(args.marker) > 1 or args.marker[0][:1] in "+-")
    if signed:
        table, value = npmi.npmi_combined(tables, args.marker, min_count=args.min_count), "score"
    elif args.marker:
        table, value = npmi.npmi_scores(tables, markers=args.marker, min_count=args.min_count), "npmi"
    elif args.regex:
        table, value = npmi.npmi_scores(tables, regex=args.regex, min_count=args.min_count), "npmi"
    else:
        pairs = [_split_condition(text) for text in args.where]
        where = {column: _typed_like(tables, column, value, "where") for column, value in pairs}
        table, value = npmi.npmi_scores(tables, where=where, min_count=args.min_count), "npmi"
    plots = {"npmi_heatmap": figures.heatmap(table, value), "npmi_top": figures.ranked_bars(table, value, n=args.top)}
    paths = _save(args.out, {"npmi": table}, plots)
    if args.spec:
        paths.append(_write_spec(args.out, npmi.to_spec(table, args.spec, factor=args.factor)))
    return paths


def _split_condition(text: str) -> tuple[str, str]:
    column, sep, value = text.partition("=")
    if not sep or not column:
        raise ValueError(f"--where takes COLUMN=VALUE, got {text!r}")
    return column, value


def _typed_like(tables: Any, column: str, value: str, role: str) -> Any:
    """The command-line string ``value`` converted to the type of the prompts column (numbers stay numbers)."""
    from moelens.analysis.stats import check_tags, one_row

    check_tags(tables, [column], role)
    (kind,) = one_row(tables, "SELECT data_type FROM information_schema.columns WHERE table_name = 'prompts' AND column_name = ?", [column])
    if any(word in kind for word in ("INT", "DECIMAL", "DOUBLE", "FLOAT")):
        return float(value) if any(c in value for c in ".eE") else int(value)
    if kind == "BOOLEAN":
        return value.lower() in ("1", "true", "yes")
    return value


def _write_spec(out: Path, spec: Any) -> Path:
    path = out / "spec.json"
    path.write_text(spec.to_json())
    return path
