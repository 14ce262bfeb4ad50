"""`rankformer` command line: vocab build | vocab import-geneformer | tokenize | corpus show | stats |
pretrain | finetune genes | cells | predict genes | cells | model import-geneformer | embed |
perturb | perturb stats | serve | attach.

The job commands' flags are generated from their config dataclasses (:mod:`rankformer.config.flags`,
on jsonargparse): each accepts ``--config FILE.yaml``, flags given on the command line override it,
every option can also come from an environment variable (listed in ``--help``), and a wrong value
is an error naming the flag or field. ``rankformer --print_completion shtab-bash`` prints a shell
completion script. The same functions back `jobs/` (for `ray job submit`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, Literal

from rankformer.cluster import user_error_inside
from rankformer.config.corpus import TokenizeConfig, VocabBuildConfig
from rankformer.config.flags import (
    ActionYesNo,
    Namespace,
    add_config_arguments,
    build,
    collection_flags,
    command_parser,
    gathered,
    merged_values,
    values_of,
)
from rankformer.config.infer import EmbedConfig, PerturbConfig, PredictConfig
from rankformer.config.train import FinetuneCellsConfig, FinetuneGenesConfig, PretrainConfig
from rankformer.errors import InputError
from rankformer.words import counted


def _parser() -> Any:
    from rankformer import __version__
    from rankformer.config.serve import ServeConfig

    p = command_parser(
        prog="rankformer",
        description="Single-cell foundation models of the Geneformer kind, at corpus scale on Ray.",
        epilog="A typical run: vocab build (or import-geneformer) -> tokenize -> pretrain (or model "
        "import-geneformer) -> finetune | embed | perturb -> serve -> attach. `rankformer COMMAND --help` "
        "for each; every job command also takes --config FILE.yaml.",
    )
    p.add_argument("--version", action="version", version=f"rankformer {__version__}")
    sub = p.add_subcommands(dest="command", required=True)
    _vocab_parsers(sub)
    t = command_parser()
    add_config_arguments(t, TokenizeConfig, positional=("inputs",), skip=("carry",))
    t.add_argument(
        "--carry",
        type=dict[str, str] | None,
        metavar="OBS[:NAME]",
        help="obs column to carry into the corpus, optionally renamed (OBS:NAME); several, or repeated",
    )
    sub.add_subcommand("tokenize", t, help="rank-value encode INPUT files into a Parquet corpus")
    _corpus_parsers(sub)
    _training_parsers(sub)
    for name, cls, what in (
        ("embed", EmbedConfig, "cell or gene embeddings of a corpus"),
        ("perturb", PerturbConfig, "in silico perturbation of genes in cells"),
        ("serve", ServeConfig, "embedding and perturbation endpoints on Ray Serve"),
    ):
        c = command_parser()
        add_config_arguments(c, cls)
        sub.add_subcommand(name, c, help=what)
    _perturb_stats_parser(sub)
    _model_parsers(sub)
    _attach_parser(sub)
    return p


Subparsers = Any  # jsonargparse's subcommands action


def _attach_parser(sub: Subparsers) -> None:
    a = command_parser()
    a.add_argument("source", help=".h5ad or AnnData .zarr the corpus was tokenized from")
    a.add_argument("outs", nargs="+", metavar="OUT", help="finished embed, predict or perturb output folders")
    a.add_argument("--write", required=True, help="the annotated .h5ad to write (temp file, then renamed)")
    a.add_argument(
        "--key-added",
        help="obsm/obs/var key of the results (default X_rankformer for cell embeddings, rankformer for "
        "predictions and gene embeddings, rankformer_perturb for perturbations); one OUT only",
    )
    a.add_argument("--gene-id-column", default="ensembl_id", help="var column of gene ids (gene outputs)")
    sub.add_subcommand(
        "attach",
        a,
        help="write an annotated .h5ad: SOURCE's cells with embed, predict or perturb OUTs on them",
    )


def _dictionary_flags(p: Any, of: str) -> None:
    """Geneformer's pickled dictionaries, as both import commands take them."""
    p.add_argument("--token-dictionary", required=True, help=f"token_dictionary_*.pkl{of}")
    p.add_argument("--gene-median-dictionary", required=True, help="gene_median_dictionary_*.pkl")
    p.add_argument("--mapping-dictionary", help="ensembl_mapping_dict_*.pkl (aliases)")
    p.add_argument("--gene-name-dictionary", help="gene_name_id_dict_*.pkl (symbols for reports)")


def _group(sub: Subparsers, name: str, what: str) -> Subparsers:
    """A command of subcommands (`vocab build`, `finetune genes`...)."""
    g = command_parser()
    sub.add_subcommand(name, g, help=what)  # jsonargparse: a level is added before the next
    return g.add_subcommands(dest="command", required=True)


def _vocab_parsers(sub: Subparsers) -> None:
    vocab = _group(sub, "vocab", "build or import a gene vocabulary")
    b = command_parser()
    add_config_arguments(b, VocabBuildConfig, positional=("inputs",))
    vocab.add_subcommand("build", b, help="exact per-gene nonzero medians over INPUT files")
    g = command_parser()
    _dictionary_flags(g, "")
    g.add_argument("--out", required=True, help="vocabulary JSON to write")
    vocab.add_subcommand("import-geneformer", g, help="import Geneformer's pickled dictionaries")


def _corpus_parsers(sub: Subparsers) -> None:
    c = _group(sub, "corpus", "look inside a finished corpus")
    show = command_parser()
    show.add_argument("out", help="corpus folder (local or s3://)")
    show.add_argument("--cell", help="cell id (obs name) to show")
    show.add_argument("--row", type=int | None, help="or the corpus row, 0-based in manifest order")
    show.add_argument("--limit", type=int, default=40, help="genes to print")
    show.add_argument("--csv", help="write every gene's row to this CSV")
    c.add_subcommand("show", show, help="one cell's tokens in rank order, with how each value came about")
    st = command_parser()
    st.add_argument("out", help="corpus folder (local or s3://)")
    st.add_argument("--plot", help="length histogram PNG to write (default: <corpus name>_lengths.png)")
    st.add_argument(
        "--json", action=ActionYesNo(no_prefix="no-"), default=False, help="print the statistics as JSON"
    )
    c.add_subcommand("stats", st, help="cells, tokens, length distribution, drops, vocab and config")


def _training_parsers(sub: Subparsers) -> None:
    """pretrain, finetune genes|cells and predict genes|cells."""
    pre = command_parser()
    add_config_arguments(pre, PretrainConfig)
    sub.add_subcommand("pretrain", pre, help="masked-gene pretraining on Ray Train, tracked in MLflow")
    fine = _group(sub, "finetune", "fine-tune a classifier on Ray Train")
    fg = command_parser()
    add_config_arguments(fg, FinetuneGenesConfig)
    fine.add_subcommand("genes", fg, help="which other genes have feature X: gene classification, CV by gene")
    fc = command_parser()
    add_config_arguments(fc, FinetuneCellsConfig)
    fine.add_subcommand("cells", fc, help="cell classification from a carried obs label column")
    pr = _group(sub, "predict", "apply a fine-tuned classifier to another corpus")
    for what in ("genes", "cells"):
        c = command_parser()
        add_config_arguments(c, PredictConfig)
        pr.add_subcommand(what, c, help=f"predict {what} with a `finetune {what}` model")


def _perturb_stats_parser(sub: Subparsers) -> None:
    ps = command_parser()
    ps.add_argument("out", help="output folder of `rankformer perturb`")
    ps.add_argument("--goal-state", help="rank by the shift toward this state (default: 1 - cell_cosine)")
    ps.add_argument(
        "--rank-window",
        type=int,
        default=1,
        help="compare with other genes perturbed within this many rank positions (1: the same rank)",
    )
    ps.add_argument(
        "--by",
        type=Literal["perturbed-gene", "affected-gene"],
        default="perturbed-gene",
        help="perturbed-gene: each perturbation's effect on the cell, tested; affected-gene: for each "
        "perturbation, the genes whose states moved most (needs `perturb --per-gene`)",
    )
    ps.add_argument(
        "--top", type=int, default=100, help="--by affected-gene: genes kept per perturbation (0: all)"
    )
    ps.add_argument(
        "--mixture",
        action=ActionYesNo(no_prefix="no-"),
        default=False,
        help="also fit a two-component Gaussian mixture to the perturbations' mean effects: each one's "
        "posterior of being impactful (impact_posterior, impactful)",
    )
    ps.add_argument(
        "--rows-in-memory",
        type=int | None,
        help="rows the test holds at once (about 120 B each; default 2,000,000); the rest wait on local "
        "disk (12 B each)",
    )
    sub.add_subcommand("perturb-stats", ps, help="`perturb stats OUT`: per-gene effects, null test, FDR")


def _model_parsers(sub: Subparsers) -> None:
    mdl = _group(sub, "model", "bring models in")
    imp = command_parser()
    imp.add_argument("model_dir", help="Hugging Face checkpoint folder (config.json + weights)")
    _dictionary_flags(imp, " of the model")
    imp.add_argument("--out", required=True, help="rankformer model folder to write")
    imp.add_argument("--registered-model", help="also register it in MLflow under this name")
    imp.add_argument("--alias", default="current", help="registry alias")
    imp.add_argument("--tracking-uri", help="MLflow store (default MLFLOW_TRACKING_URI, else sqlite)")
    imp.add_argument("--experiment", default="rankformer", help="MLflow experiment of the import run")
    mdl.add_subcommand(
        "import-geneformer", imp, help="a published Geneformer checkpoint -> a rankformer model"
    )


# the config class behind each command, whose list and mapping flags take repeats and KEY=VALUE
_CONFIG_OF = {
    ("tokenize",): (TokenizeConfig, ("carry",)),
    ("vocab", "build"): (VocabBuildConfig, ()),
    ("pretrain",): (PretrainConfig, ()),
    ("finetune", "genes"): (FinetuneGenesConfig, ()),
    ("finetune", "cells"): (FinetuneCellsConfig, ()),
    ("predict", "genes"): (PredictConfig, ()),
    ("predict", "cells"): (PredictConfig, ()),
    ("embed",): (EmbedConfig, ()),
    ("perturb",): (PerturbConfig, ()),
}
_GROUPS = ("vocab", "corpus", "finetune", "predict", "model")


def _config_first(argv: list[str], start: int) -> list[str]:
    """``--config FILE`` (local or s3://) read here, so a missing or broken file is an error
    naming it, and given to the parser as its content before the other options: flags override
    the file wherever they stand (jsonargparse lays values over each other in command-line order)."""
    import json

    from rankformer.config.corpus import load_yaml

    rest, configs, i = argv[start:], [], 0
    while i < len(rest):
        word = rest[i]
        if word == "--config" and i + 1 < len(rest):
            path = rest[i + 1]
            del rest[i : i + 2]
        elif word.startswith("--config="):
            path = rest.pop(i).split("=", 1)[1]
        else:
            i += 1
            continue
        configs += ["--config", json.dumps(load_yaml(path))]
    return [*argv[:start], *configs, *rest]


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """The command line as one flat namespace: ``command`` (and ``<command>_command`` for a
    group's subcommand), each option by its name, and ``values`` (the nested options a config
    class is built from)."""
    argv = list(argv)
    if argv[:2] == ["perturb", "stats"]:
        argv = ["perturb-stats", *argv[2:]]
    words = argv[:2] if argv and argv[0] in _GROUPS else argv[:1]
    key = tuple(words)
    if key == ("serve",):
        from rankformer.config.serve import ServeConfig

        spec: tuple[type, tuple[str, ...]] | None = (ServeConfig, ())
    else:
        spec = _CONFIG_OF.get(key)
    if spec is not None:
        lists, maps = collection_flags(*spec)
        renames = frozenset({"--carry"} if key == ("tokenize",) else ())
        argv = [*words, *gathered(argv[len(words) :], lists, maps, renames)]
    ns = _parser().parse_args(_config_first(argv, len(words)))
    out = argparse.Namespace()
    path = []
    while isinstance(ns, Namespace) and isinstance(ns.get("command"), str):
        path.append(ns["command"])
        ns = ns[ns["command"]]
    out.command = path[0]
    if len(path) > 1:
        setattr(out, f"{path[0]}_command", path[1])
    values = values_of(ns)
    for k, v in values.items():
        setattr(out, k, v)
    out.values = values
    return out


def _parse_carry(items: list[str] | dict[str, str] | None) -> dict[str, str]:
    if isinstance(items, dict):
        return items
    out = {}
    for item in items or []:
        src, _, dst = item.partition(":")
        out[src] = dst or src
    return out


def tokenize_config(args: argparse.Namespace) -> TokenizeConfig:
    values = merged_values(args, TokenizeConfig)
    values["carry"] = _parse_carry(values.get("carry"))
    return build(TokenizeConfig, values)


def vocab_build_config(args: argparse.Namespace) -> VocabBuildConfig:
    return build(VocabBuildConfig, merged_values(args, VocabBuildConfig))


def pretrain_config(args: argparse.Namespace) -> PretrainConfig:
    return build(PretrainConfig, merged_values(args, PretrainConfig))


# commands that build one config dataclass from flags/--config and call one function with it:
# (command, subcommand) -> (module, config class, function)
CONFIG_JOBS = {  # (command, subcommand): (job module, module of its config class, class, function)
    ("finetune", "genes"): (
        "rankformer.classify.genes",
        "rankformer.config.train",
        "FinetuneGenesConfig",
        "run_finetune_genes",
    ),
    ("finetune", "cells"): (
        "rankformer.classify.cells",
        "rankformer.config.train",
        "FinetuneCellsConfig",
        "run_finetune_cells",
    ),
    ("embed", None): ("rankformer.embed.cells", "rankformer.config.infer", "EmbedConfig", "run_embed"),
    ("serve", None): ("rankformer.serve.app", "rankformer.config.serve", "ServeConfig", "run_serve"),
    ("perturb", None): ("rankformer.perturb.job", "rankformer.config.infer", "PerturbConfig", "run_perturb"),
}


def _config_job(args: argparse.Namespace) -> None:
    import importlib

    module, config_module, config_name, function = CONFIG_JOBS[
        (args.command, getattr(args, "finetune_command", None))
    ]
    config_cls = getattr(importlib.import_module(config_module), config_name)
    cfg = build(config_cls, merged_values(args, config_cls))
    _model_and_corpus_door(cfg)
    getattr(importlib.import_module(module), function)(cfg)


def _model_and_corpus_door(cfg: Any) -> None:
    """A job's model against its corpus, from their metadata alone, before the job's module (and
    torch) is imported: a wrong path or a model of another vocabulary is named in about a second.
    The job checks them again (the same light files)."""
    model, corpus = getattr(cfg, "model", None), getattr(cfg, "corpus", None)
    if not (isinstance(model, str) and isinstance(corpus, str)):
        return
    from rankformer.job.door import check_model_and_corpus
    from rankformer.tracking import resolve_uri

    track = getattr(cfg, "track", None)
    info, _ = check_model_and_corpus(model, corpus, resolve_uri(getattr(track or cfg, "tracking_uri", None)))
    if isinstance(cfg, FinetuneGenesConfig):  # the labels against the model's vocabulary
        from rankformer.classify.labels import vocabulary_labels

        vocabulary_labels(cfg, info.vocab)
    elif isinstance(cfg, FinetuneCellsConfig):  # the label and group columns in the corpus
        from rankformer.classify.data import cell_label_columns

        cell_label_columns(cfg)


def run(argv: Sequence[str] | None = None) -> int:
    args = parse(list(sys.argv[1:] if argv is None else argv))
    if (args.command, getattr(args, "finetune_command", None)) in CONFIG_JOBS:
        _config_job(args)
        return 0
    handlers: dict[str, Callable[[argparse.Namespace], int | None]] = {
        "corpus": _corpus_command,
        "pretrain": _pretrain,
        "perturb-stats": _perturb_stats,
        "model": _import_model,
        "predict": _predict,
        "tokenize": _tokenize,
        "vocab": _vocab,
        "attach": _attach,
    }
    return handlers[args.command](args) or 0


def _pretrain(args: argparse.Namespace) -> None:
    from rankformer.train.plan import plan

    cfg = pretrain_config(args)
    checked = plan(cfg)  # the door, before torch loads

    from rankformer.train.pretrain import run_pretrain

    run_pretrain(cfg, checked)


def _perturb_stats(args: argparse.Namespace) -> None:
    from rankformer.perturb.stats import ROWS_IN_MEMORY, perturb_stats

    budget = ROWS_IN_MEMORY if args.rows_in_memory is None else args.rows_in_memory
    if args.by == "affected-gene":
        from rankformer.perturb.affected import affected_stats

        table = affected_stats(args.out, args.top, budget)
        print(table.groupby("perturbed", sort=False).head(5).to_string(index=False))
        print(
            f"{table.perturbed.nunique():,} perturbations, their {len(table):,} most moved genes "
            f"(top {args.top or 'all'} each) -> {args.out}/affected.csv"
        )
        return
    res = perturb_stats(args.out, args.goal_state, args.rank_window, budget, args.mixture)
    print(res.head(20).to_string(index=False))
    untested = int(res.p_value.isna().sum())
    note = (
        f"; {untested:,} untested: no other gene was perturbed at their ranks (perturb more genes, "
        "e.g. --mode all, or widen the strata with --rank-window N)"
        if untested
        else ""
    )
    if args.mixture:
        note += f"; {int(res.impactful.sum()):,} impactful by the mixture model (posterior > 0.5)"
    print(
        f"{int(res.significant.sum())} of {len(res)} significant at FDR < 0.05{note} -> {args.out}/stats.csv"
    )


def _import_model(args: argparse.Namespace) -> None:
    from rankformer.model.imports import import_geneformer_model, register_import

    meta = import_geneformer_model(
        args.model_dir,
        args.token_dictionary,
        args.gene_median_dictionary,
        args.out,
        args.mapping_dictionary,
        args.gene_name_dictionary,
    )
    reg = ""
    if args.registered_model:
        v = register_import(args.out, args.tracking_uri, args.registered_model, args.alias, args.experiment)
        reg = f"; registered models:/{args.registered_model}@{args.alias} (v{v})"
    print(
        f"imported {args.model_dir}: {meta['layout']} layout, {meta['n_tokens']:,} tokens, "
        f"{meta['positions']} positions -> {args.out}{reg}"
    )


def _attach(args: argparse.Namespace) -> None:
    from rankformer.annotate import attach_files

    for done in attach_files(args.source, args.outs, args.write, args.key_added, args.gene_id_column):
        print(
            f"{done['job']}: {done['matched']:,} {done['unit']} with values, {done['unmatched']:,} without "
            f"-> {', '.join(done['slots'])}"
        )
    print(f"annotated AnnData -> {args.write}")


def _predict(args: argparse.Namespace) -> None:
    from rankformer.classify.predict import PredictConfig, run_predict

    run_predict(args.predict_command, build(PredictConfig, merged_values(args, PredictConfig)))


def _tokenize(args: argparse.Namespace) -> None:
    from rankformer.corpus.tokenize import run_tokenize

    run_tokenize(tokenize_config(args))


def _vocab(args: argparse.Namespace) -> None:
    if args.vocab_command == "build":
        from rankformer.corpus.medians import run_vocab_build

        run_vocab_build(vocab_build_config(args))
        return
    from rankformer.vocab.geneformer import import_geneformer

    vocab = import_geneformer(
        args.token_dictionary,
        args.gene_median_dictionary,
        args.mapping_dictionary,
        args.gene_name_dictionary,
    )
    digest = vocab.save(args.out)
    print(
        f"imported {len(vocab.gene_ids):,} genes, {len(vocab.aliases):,} aliases, specials "
        f"{sorted(vocab.specials, key=vocab.specials.__getitem__)} -> {args.out} ({digest[:19]})"
    )


def _corpus_command(args: argparse.Namespace) -> int:
    import json

    from rankformer.corpus import inspect

    if args.corpus_command == "show":
        table = inspect.explain_cell(args.out, args.cell, args.row)
        print(inspect.format_explanation(table, args.limit))
        if args.csv:
            table.to_csv(args.csv, index=False)
            print(f"all {len(table)} genes -> {args.csv}")
        return 0
    plot = args.plot or f"{os.path.basename(args.out.rstrip('/')) or 'corpus'}_lengths.png"
    stats = inspect.corpus_stats(args.out, plot)
    if args.json:
        print(json.dumps(stats, indent=1))
        return 0
    q = stats["length"]
    print(
        f"{stats['cells']:,} cells ({stats['cells_in']:,} read), {stats['tokens']:,} tokens in "
        f"{counted(stats['shards'], 'shard')}\nlength: mean {q['mean']:.0f}, min {q['min']:.0f}, "
        f"p5 {q['p5']:.0f}, "
        f"median {q['median']:.0f}, p95 {q['p95']:.0f}, max {q['max']:.0f}; {stats['at_max_length']:,} "
        f"cells at max_length {stats['config']['max_length']}"
    )
    for uri, d in stats["dropped"].items():
        print(
            f"dropped from {uri}: {d['no_vocabulary_gene']:,} without a vocabulary gene, "
            f"{d['filter_pass']:,} by filter_pass"
        )
    cfg = stats["config"]
    print(
        f"vocabulary {stats['vocab']['path']} ({stats['vocab']['hash'][:19]}"
        f"{', a copy kept in the corpus' if stats['vocab']['kept'] else ''}); layout {cfg['layout']}, "
        f"counts {cfg['read'].get('counts', 'X')}, carried {cfg['carry'] or 'none'}"
    )
    print(f"length histogram -> {stats['plot']}")
    return 0


def parse_error(exc: argparse.ArgumentError, argv: Sequence[str] | None) -> str:
    """The parser's complaint on one line, in flag words (``--level``, not ``embed.level``), with
    where the options are listed."""
    import re

    text = " ".join(str(exc).split())
    text = re.sub(
        r'Parser key "(?:[\w-]+\.)*([\w-]+)":', lambda m: f"--{m.group(1).replace('_', '-')}:", text
    )
    text = re.sub(
        r"required: ([\w.,\s-]+)",
        lambda m: (
            "required: "
            + ", ".join("--" + w.strip().split(".")[-1].replace("_", "-") for w in m.group(1).split(","))
        ),
        text,
    )
    words = [w for w in (sys.argv[1:] if argv is None else argv)[:2] if not w.startswith("-")]
    return f"{text} (`rankformer {' '.join(words)} --help` lists the options)".replace("  ", " ")


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("RANKFORMER_LOG", "WARNING"))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    try:
        return run(argv)
    except argparse.ArgumentError as exc:  # a bad flag or value, named by the parser
        print(f"rankformer: error: {parse_error(exc, argv)}", file=sys.stderr)
        return 2
    except SystemExit as exc:
        if exc.code in (0, None):  # --help, --version, --print_completion
            raise
        return exc.code if isinstance(exc.code, int) else 2
    except (InputError, FileNotFoundError) as exc:
        print(f"rankformer: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        cause = user_error_inside(exc)
        if cause is None:
            raise
        print(f"rankformer: error: {cause}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
