"""The ``fedprompt`` command: run simulations, tables and studies; inspect configs; fetch data."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from omegaconf import OmegaConf

from fedprompt.config import compose_config, list_choices
from fedprompt.config_schema import check_config
from fedprompt.terminal import FLOWER_LOG, INTERRUPTED
from fedprompt.text.author_descriptions import author_datasets
from fedprompt.user_errors import USER_ERRORS


def _with_output_dir(experiment: str, overrides: list[str]) -> list[str]:
    """Fix the results folder here, so the Flower processes write where the user is.

    A resumed run writes on into the folder it resumes, given to every process as an absolute
    path.
    """
    from fedprompt.federation.orchestration import output_dir_for

    cfg = compose_config(experiment, overrides)
    folder = output_dir_for(cfg)
    if not cfg.resume:
        return [*overrides, f"output_dir={folder}"]
    from fedprompt.federation.checkpoint import resumable_checkpoint

    resumed = [*overrides, f"resume={folder}", f"output_dir={folder}"]
    # Nothing to resume, or other settings than the run's, stops here, before Flower starts.
    resumable_checkpoint(folder, compose_config(experiment, resumed))
    return resumed


def _simulate(args: argparse.Namespace) -> int:
    from fedprompt.federation.local_simulation import check_before_flower, simulate

    check_config(compose_config(args.experiment, list(args.overrides)))
    overrides = _with_output_dir(args.experiment, list(args.overrides))
    cfg = compose_config(args.experiment, overrides)
    check_before_flower(cfg)  # a missing dataset, a too small DP site: before Flower starts
    flower_log = Path(str(cfg.output_dir)) / FLOWER_LOG
    code = simulate(args.experiment, overrides, cfg, flower_log=flower_log, verbose=args.verbose)
    if code == INTERRUPTED:  # simulate has said so, and how to resume
        return code
    summary_path = Path(str(cfg.output_dir)) / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    if summary.get("status") == "failed":
        print(
            f"fedprompt: the run failed: {summary['reason']} What it wrote is in "
            f"{cfg.output_dir}.",
            file=sys.stderr,
        )
        return code or 1
    if code != 0 or summary.get("status") != "completed":
        print(
            f"fedprompt: the run did not finish; what it wrote is in {cfg.output_dir}, and "
            f"Flower's log {flower_log} says why (look for [fedprompt] or ERROR).",
            file=sys.stderr,
        )
        return code or 1
    final = summary["final"]
    print(
        f"fedprompt: {summary['experiment']} finished in {summary['wall_seconds']:.1f} s: "
        f"accuracy {100 * final['accuracy']:.1f}% ({final['source']}), balanced "
        f"{100 * final['balanced_accuracy']:.1f}%, macro-F1 {100 * final['macro_f1']:.1f}% on "
        f"{summary['dataset']}; results in {cfg.output_dir}"
    )
    return 0


def _show_config(args: argparse.Namespace) -> int:
    cfg = compose_config(args.experiment, list(args.overrides))
    check_config(cfg)
    print(OmegaConf.to_yaml(cfg), end="")
    return 0


def _download(args: argparse.Namespace) -> int:
    from fedprompt.data.download import download_dataset

    cfg = compose_config(None, [f"dataset={args.dataset}", f"dataset.root={args.root}"])
    path = download_dataset(OmegaConf.to_container(cfg.dataset, resolve=True), args.root)
    print(f"fedprompt: {args.dataset} is ready in {path}")
    return 0


def _descriptions(args: argparse.Namespace) -> int:
    from fedprompt.data.registry import DATASETS
    from fedprompt.text.author_descriptions import download_author_descriptions

    path = download_author_descriptions(args.dataset, DATASETS[args.dataset].classnames or ())
    print(
        f"fedprompt: the authors' {args.dataset} descriptions are in {path}; use them with "
        "method.descriptions=authors"
    )
    return 0


def _save_backbone(args: argparse.Namespace) -> int:
    from fedprompt.backbones import save_local_copy

    path = save_local_copy(args.directory, **({"source": args.source} if args.source else {}))
    print(f"fedprompt: BiomedCLIP saved to {path}; use backbone=local_dir backbone.path={path}")
    return 0


def _site_check(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from fedprompt.data.site_check import check_site, format_report, load_site_config

    site = load_site_config(args.config)
    expected = None
    if args.experiment:
        names = compose_config(args.experiment, list(args.overrides)).dataset.classnames
        expected = None if names is None else list(names)
    with tqdm(desc=f"reading {site.name}'s images", unit="image", leave=False) as bar:
        report = check_site(site, expected, on_image=bar.update)
    print(format_report(report))
    return 0 if report.ok else 1


def _review_app(args: argparse.Namespace) -> int:
    from fedprompt.federation.app_approval import AppNotApproved, review

    trusted = Path(args.trusted_apps) if args.trusted_apps else None
    try:
        approved, report = review(Path(args.app), trusted)
    except AppNotApproved as err:
        print(f"fedprompt: {err}", file=sys.stderr)
        return 2
    print(report)
    return 0 if approved else 1


def _out_folder(out: str | None, kind: str) -> Path:
    from fedprompt.experiments.grid import default_out

    return Path(out).expanduser().resolve() if out else default_out(kind)


def _interrupted(out: Path) -> int:
    print(
        f"fedprompt: interrupted; finished points are kept in {out}: repeat the command to resume.",
        file=sys.stderr,
    )
    return 130


def _table(args: argparse.Namespace) -> int:
    from fedprompt.experiments.table import run_table, table_grid

    overrides = list(args.overrides)
    grid = table_grid(
        args.experiment,
        overrides,
        methods=args.methods,
        datasets=args.datasets,
        shots=args.shots,
        base_to_novel=args.base_to_novel,
        base_to_novel_shots=args.base_to_novel_shots,
        seeds=args.seeds,
        recipe=args.recipe,
        partitions=args.partitions,
        personalization=args.personalization,
    )
    out = _out_folder(args.out, "table")
    try:
        outcomes, markdown, table_csv, plot = run_table(args.experiment, grid, overrides, out)
    except KeyboardInterrupt:
        return _interrupted(out)
    plot_words = f"; each site's global and personalized accuracy in {plot}" if plot else ""
    print(f"fedprompt: table in {markdown} and {table_csv}{plot_words}")
    return 0 if all(outcome.ok for outcome in outcomes) else 1


def _privacy_study(args: argparse.Namespace) -> int:
    from fedprompt.experiments.privacy_study import run_privacy_study

    out = _out_folder(args.out, "study-privacy")
    try:
        outcomes, written = run_privacy_study(args.experiment, list(args.overrides), out)
    except KeyboardInterrupt:
        return _interrupted(out)
    names = ", ".join(str(path.relative_to(out)) for path in written)
    print(f"fedprompt: privacy study in {out}: {names}")
    return 0 if all(outcome.ok for outcome in outcomes) else 1


def _add_grid_commands(commands: argparse._SubParsersAction) -> None:
    """``fedprompt table`` and ``fedprompt study privacy``: grids of simulations, resumable."""
    table = commands.add_parser(
        "table",
        help="methods x datasets x protocols x seeds, centralized beside federated: table.md/.csv",
    )
    table.add_argument("experiment", choices=list_choices("experiment"))
    table.add_argument(
        "--methods", metavar="NAME,...", help="comma list (default: the experiment's method)"
    )
    table.add_argument(
        "--datasets", metavar="NAME,...", help="comma list (default: the experiment's dataset)"
    )
    table.add_argument(
        "--shots", metavar="K,...", help="few-shot protocols, images per class, e.g. 1,2,4,8,16"
    )
    table.add_argument(
        "--base-to-novel",
        action="store_true",
        help="add the base-to-novel protocol (base, novel, HM)",
    )
    table.add_argument(
        "--base-to-novel-shots",
        type=int,
        default=16,
        metavar="K",
        help="images per base class in base-to-novel (default 16)",
    )
    table.add_argument(
        "--seeds", default="1,2,3", metavar="S,...", help="comma list (default 1,2,3)"
    )
    table.add_argument(
        "--recipe",
        metavar="NAME",
        help="configs/recipe choice for the centralized cells only, e.g. paper (the authors' "
        "training values), to set them beside the papers' numbers",
    )
    table.add_argument(
        "--partitions",
        metavar="NAME[+scanner],...",
        help="federated cells per partition, e.g. iid,dirichlet,dirichlet+scanner (+scanner: "
        "each site's simulated scanner; default: the experiment's partition)",
    )
    table.add_argument(
        "--personalization",
        metavar="NAME,...",
        help="federated cells per personalization scheme, e.g. none,promptfolio; adds "
        "personalized and global-at-the-sites columns and per_site_accuracy.png",
    )
    table.add_argument(
        "--out", metavar="DIR", help="study folder (default runs/table-<date>-<time>)"
    )
    table.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    table.set_defaults(func=_table)

    study = commands.add_parser("study", help="studies: sweeps of simulations").add_subparsers(
        dest="study", required=True
    )
    privacy = study.add_parser(
        "privacy",
        help="accuracy and membership inference against epsilon: privacy.csv/.md and plots",
    )
    privacy.add_argument("experiment", choices=list_choices("experiment"))
    privacy.add_argument(
        "--out", metavar="DIR", help="study folder (default runs/study-privacy-<date>-<time>)"
    )
    privacy.add_argument(
        "overrides",
        nargs="*",
        help="Hydra overrides in sweep grammar, e.g. privacy.epsilon=inf,8,4,2,1 seed=1,2 "
        "(privacy.epsilon defaults to inf,8,4,2,1; inf means no DP)",
    )
    privacy.set_defaults(func=_privacy_study)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface; overrides are Hydra's ``key=value`` syntax."""
    parser = argparse.ArgumentParser(prog="fedprompt", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    simulate = commands.add_parser(
        "simulate", help="run an experiment through Flower's simulation engine"
    )
    simulate.add_argument("experiment", choices=list_choices("experiment"))
    simulate.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. federation.rounds=5")
    simulate.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help=f"show all of Flower's output (it always goes to {FLOWER_LOG} in the results folder)",
    )
    simulate.set_defaults(func=_simulate)

    show = commands.add_parser("config", help="print the composed config of an experiment")
    show.add_argument("experiment", choices=list_choices("experiment"))
    show.add_argument("overrides", nargs="*")
    show.set_defaults(func=_show_config)

    data = commands.add_parser("data", help="datasets").add_subparsers(dest="action", required=True)
    download = data.add_parser("download", help="download a dataset where a public source exists")
    download.add_argument("dataset", choices=list_choices("dataset"))
    download.add_argument("--root", required=True, help="folder that will hold the dataset")
    download.set_defaults(func=_download)
    descriptions = data.add_parser(
        "descriptions", help="download the authors' class descriptions into fedprompt's cache"
    )
    descriptions.add_argument("dataset", choices=author_datasets())
    descriptions.set_defaults(func=_descriptions)

    site = commands.add_parser("site", help="a hospital's site").add_subparsers(
        dest="action", required=True
    )
    check = site.add_parser(
        "check",
        help="check a site's images before it joins: readable, labelled, split; counts per class",
    )
    check.add_argument("config", help="the site config (sites/site.example.yaml is the template)")
    check.add_argument(
        "--experiment",
        choices=list_choices("experiment"),
        help="also check that the site's class list is this experiment's",
    )
    check.add_argument("overrides", nargs="*", help="Hydra overrides for --experiment")
    check.set_defaults(func=_site_check)
    review_app = site.add_parser(
        "review-app",
        help="before approving an app: what it runs, its files, who signed it, whether this site "
        "would run it",
    )
    review_app.add_argument("app", help="the .fab file the centre sent, or an app folder")
    review_app.add_argument(
        "--trusted-apps", help="this site's list of app signers, e.g. /etc/fedprompt/trusted-apps"
    )
    review_app.set_defaults(func=_review_app)

    backbone = commands.add_parser("backbone", help="backbones").add_subparsers(
        dest="action", required=True
    )
    save = backbone.add_parser(
        "save-local", help="save BiomedCLIP to a folder for offline use (needs the network once)"
    )
    save.add_argument("directory")
    save.add_argument(
        "--source",
        help="local-dir:/path to re-home an existing copy (default: BiomedCLIP from the hub)",
    )
    save.set_defaults(func=_save_backbone)
    _add_grid_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedprompt`` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may follow options (`table quickstart --seeds 1 federation.rounds=2`); argparse
    # leaves those after the first option unparsed.
    if extra and (not hasattr(args, "overrides") or any(x.startswith("-") for x in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return int(args.func(args))
    except USER_ERRORS as err:
        print(f"fedprompt: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
