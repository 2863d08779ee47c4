"""The ``fedprompt`` command: run simulations, inspect configs, fetch data and backbones."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from omegaconf import OmegaConf

from fedprompt.config import compose_config, list_choices
from fedprompt.data.sites import load_splits
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
    from fedprompt.federation.local_simulation import simulate

    overrides = _with_output_dir(args.experiment, list(args.overrides))
    cfg = compose_config(args.experiment, overrides)
    load_splits(cfg)  # a missing or malformed dataset stops here, before Flower starts
    code = simulate(args.experiment, overrides, cfg)
    summary_path = Path(str(cfg.output_dir)) / "summary.json"
    if code != 0 or not summary_path.exists():
        print(
            f"fedprompt: the run did not finish; what it wrote is in {cfg.output_dir}, and the "
            "Flower log above says why (look for [fedprompt] or ERROR).",
            file=sys.stderr,
        )
        return code or 1
    summary = json.loads(summary_path.read_text())
    final = summary["final"]
    print(
        f"fedprompt: {summary['experiment']} finished in {summary['wall_seconds']:.1f} s: "
        f"accuracy {100 * final['accuracy']:.1f}% ({final['source']}), balanced "
        f"{100 * final['balanced_accuracy']:.1f}%, macro-F1 {100 * final['macro_f1']:.1f}%; "
        f"results in {cfg.output_dir}"
    )
    return 0


def _show_config(args: argparse.Namespace) -> int:
    print(OmegaConf.to_yaml(compose_config(args.experiment, list(args.overrides))), end="")
    return 0


def _download(args: argparse.Namespace) -> int:
    from fedprompt.data.download import download_dataset

    cfg = compose_config(None, [f"dataset={args.dataset}", f"dataset.root={args.root}"])
    path = download_dataset(OmegaConf.to_container(cfg.dataset, resolve=True), args.root)
    print(f"fedprompt: {args.dataset} is ready in {path}")
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


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface; overrides are Hydra's ``key=value`` syntax."""
    parser = argparse.ArgumentParser(prog="fedprompt", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    simulate = commands.add_parser(
        "simulate", help="run an experiment through Flower's simulation engine"
    )
    simulate.add_argument("experiment", choices=list_choices("experiment"))
    simulate.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. federation.rounds=5")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedprompt`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except USER_ERRORS as err:
        print(f"fedprompt: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
