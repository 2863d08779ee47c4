"""A hospital's site config and the check of its local images before it joins a federation."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedprompt.data.image_set import CorruptImageError, DataError, DatasetNotFoundError, ImageSet
from fedprompt.data.registry import load_dataset

SITE_FORMATS = ("image_folder", "biomedcoop")
FORMAT_OPTIONS = {
    "image_folder": ("test_fraction", "val_fraction", "seed"),
    "biomedcoop": ("dir",),
}
DEVICES = ("cpu", "cuda", "auto")


class SiteConfigError(DataError):
    """A site config that cannot be used; the message names the key and the fix."""


@dataclass(frozen=True)
class SiteConfig:
    """What one hospital's SuperNode reads: who it is, where its images are, how to run.

    Attributes:
        name: The site's name, as the coordinating centre registered it.
        data_format: ``image_folder`` or ``biomedcoop``.
        data_path: The folder the format's reader starts from.
        classnames: The federation's class list, in label order.
        device: ``cpu``, ``cuda`` or ``auto``.
        state_dir: Where the site keeps what must survive runs (its privacy ledger).
        backbone_path: A local copy of BiomedCLIP, for federations run with ``backbone=local_dir``.
        require_secure_aggregation: Send a trained prompt only inside Flower's SecAgg+, so the
            server never sees this site's prompt alone, whatever the run asks.
        options: The format's own keys (``test_fraction``, ``dir``, ...).
        source: The config file this came from.
    """

    name: str
    data_format: str
    data_path: Path
    classnames: list[str]
    device: str = "cpu"
    state_dir: Path | None = None
    backbone_path: Path | None = None
    require_secure_aggregation: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None


def _path(value: Any, base: Path) -> Path:
    """A path from the config, taken relative to the config file's folder."""
    path = Path(os.path.expanduser(str(value)))
    return path if path.is_absolute() else (base / path).resolve()


def load_site_config(path: str | os.PathLike) -> SiteConfig:
    """Read and check a site config file (``sites/site.example.yaml`` is the template).

    Raises:
        SiteConfigError: A missing file, a missing or malformed key; the message says which.
    """
    source = Path(path).expanduser().resolve()
    if not source.is_file():
        raise SiteConfigError(
            f"Site config {source} does not exist; copy sites/site.example.yaml there and fill "
            "it in."
        )
    try:
        raw = yaml.safe_load(source.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise SiteConfigError(
            f"Site config {source} is not valid YAML ({str(err).splitlines()[0]}); compare it "
            "with sites/site.example.yaml."
        ) from err
    if not isinstance(raw, dict):
        raise SiteConfigError(
            f"Site config {source} must be a YAML mapping of keys; compare it with "
            "sites/site.example.yaml."
        )
    base = source.parent
    data = raw.get("data")
    missing = [
        key
        for key, present in (
            ("site_name", raw.get("site_name")),
            ("data", isinstance(data, dict)),
            ("data.path", isinstance(data, dict) and data.get("path")),
            ("classnames", raw.get("classnames")),
        )
        if not present
    ]
    if missing:
        raise SiteConfigError(
            f"Site config {source} lacks {', '.join(missing)}; every key of "
            "sites/site.example.yaml without a default must be set."
        )
    assert isinstance(data, dict)
    data_format = str(data.get("format", "image_folder"))
    if data_format not in SITE_FORMATS:
        raise SiteConfigError(
            f"Site config {source} has data.format {data_format!r}; use one of "
            f"{', '.join(SITE_FORMATS)}."
        )
    classnames = raw["classnames"]
    if not isinstance(classnames, list) or not all(isinstance(c, str) for c in classnames):
        raise SiteConfigError(
            f"Site config {source}: classnames must be a YAML list of names, as the "
            "coordinating centre sent them."
        )
    device = str(raw.get("device", "cpu"))
    if device not in DEVICES and not device.startswith("cuda:"):
        raise SiteConfigError(
            f"Site config {source} has device {device!r}; use cpu, cuda, cuda:<n> or auto."
        )
    if data_format == "biomedcoop" and not data.get("dir"):
        raise SiteConfigError(
            f"Site config {source} uses data.format biomedcoop without data.dir; set it to the "
            "folder under data.path that holds split_<dir>.json (e.g. BTMRI)."
        )
    unknown = sorted(set(data) - {"format", "path", *FORMAT_OPTIONS[data_format]})
    if unknown:
        raise SiteConfigError(
            f"Site config {source} has data keys {unknown} that format {data_format} does not "
            f"use; its keys are path and {', '.join(FORMAT_OPTIONS[data_format])}."
        )
    state_dir = raw.get("state_dir", "state")
    backbone_path = raw.get("backbone_path")
    require_secure = raw.get("require_secure_aggregation", False)
    if not isinstance(require_secure, bool):
        raise SiteConfigError(
            f"Site config {source} has require_secure_aggregation {require_secure!r}; use true "
            "or false."
        )
    return SiteConfig(
        name=str(raw["site_name"]),
        data_format=data_format,
        data_path=_path(data["path"], base),
        classnames=list(classnames),
        device=device,
        state_dir=_path(state_dir, base) if state_dir else None,
        backbone_path=_path(backbone_path, base) if backbone_path else None,
        require_secure_aggregation=require_secure,
        options={key: data[key] for key in FORMAT_OPTIONS[data_format] if key in data},
        source=source,
    )


def site_dataset_config(site: SiteConfig) -> dict[str, Any]:
    """The dataset config ``load_dataset`` reads for this site's images."""
    return {
        "name": site.name,
        "format": site.data_format,
        "root": str(site.data_path),
        "classnames": list(site.classnames),
        **site.options,
    }


def check_federation_classnames(site: SiteConfig, federation: Sequence[str]) -> None:
    """Stop when the site's class list is not exactly the federation's, in the same order.

    Raises:
        SiteConfigError: The lists differ; the message shows both.
    """
    if list(site.classnames) != list(federation):
        raise SiteConfigError(
            f"Site {site.name} lists the classes {site.classnames} but the federation trains "
            f"on {list(federation)}; copy the coordinating centre's list, in its order, into "
            f"classnames in {site.source}."
        )


@dataclass
class SiteReport:
    """What ``fedprompt site check`` found: counts per split and class, and every problem.

    ``modes`` counts the readable images by how they are stored (``describe_mode``: mode, bit
    depth, what decoding does to them), so staff can see that 16-bit scans were rescaled rather
    than clipped.
    """

    site: str
    classnames: list[str]
    counts: dict[str, list[int]] = field(default_factory=dict)
    modes: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the site can join: nothing in ``problems``."""
        return not self.problems


def _decode_all(
    images: ImageSet, modes: Counter[str], on_image: Callable[[], None] | None
) -> list[str]:
    """Decode every image, counting the modes they are stored in; return each decoding error."""
    errors = []
    for i in range(len(images)):
        try:
            images[i]
            modes[images.stored_mode(i)] += 1
        except (CorruptImageError, DatasetNotFoundError) as err:
            errors.append(str(err))
        if on_image is not None:
            on_image()
    return errors


def check_site(
    site: SiteConfig,
    federation_classnames: Sequence[str] | None = None,
    on_image: Callable[[], None] | None = None,
) -> SiteReport:
    """Validate a site's images before it joins: readable, labelled within the class list, split.

    Every image is decoded once. ``on_image`` is called after each (a progress bar). An empty
    test split is a warning, not a problem: such a site trains but cannot be evaluated.
    """
    report = SiteReport(site=site.name, classnames=list(site.classnames))
    if federation_classnames is not None:
        try:
            check_federation_classnames(site, federation_classnames)
        except SiteConfigError as err:
            report.problems.append(str(err))
    try:
        splits = load_dataset(site_dataset_config(site))
    except DataError as err:
        report.problems.append(str(err))
        return report
    # The readers refuse a label outside the class list (an unknown class folder, a split-file
    # label past the list), so what reaches here is labelled within it.
    named = {"train": splits.train, "val": splits.val, "test": splits.test}
    for split, images in named.items():
        if images is None:
            continue
        report.counts[split] = [int(n) for n in images.class_counts()]
        if len(images) == 0 and split == "test":
            report.warnings.append(
                f"The test split of {site.data_path} holds no images: this site will train but "
                "its evaluation will be recorded as 'no test images'; add test images to "
                "measure the model here."
            )
        elif len(images) == 0:
            report.problems.append(
                f"The {split} split of {site.data_path} holds no images; add images or fix "
                "data.path."
            )
        absent = [c for c, n in zip(site.classnames, report.counts[split], strict=True) if not n]
        if absent and len(images):
            report.warnings.append(f"The {split} split has no images of {absent}.")
        unreadable = _decode_all(images, report.modes, on_image)
        report.problems += unreadable
    return report


def format_report(report: SiteReport) -> str:
    """A table of image counts per class and split, then the problems, for hospital IT staff."""
    splits = list(report.counts)
    width = max([len("class"), *(len(c) for c in report.classnames)])
    lines = [f"Site {report.site}: {len(report.classnames)} classes"]
    if splits:
        lines.append("  " + "class".ljust(width) + "".join(f"{s:>8}" for s in splits))
        for index, name in enumerate(report.classnames):
            counts = "".join(f"{report.counts[s][index]:>8}" for s in splits)
            lines.append("  " + name.ljust(width) + counts)
        totals = "".join(f"{sum(report.counts[s]):>8}" for s in splits)
        lines.append("  " + "total".ljust(width) + totals)
    if report.modes:
        found = ", ".join(f"{mode} x {n}" for mode, n in report.modes.most_common())
        lines.append(f"  image modes: {found}")
    lines += [f"  warning: {w}" for w in report.warnings]
    if report.ok:
        lines.append("OK: every image is readable and labelled; this site can join.")
    else:
        lines.append(f"{len(report.problems)} problem(s); fix them before joining:")
        lines += [f"  - {p}" for p in report.problems]
    return "\n".join(lines)
