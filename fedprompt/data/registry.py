"""Known datasets (facts mirrored by ``configs/dataset/*.yaml``) and the ``load_dataset`` entry."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fedprompt.data.biomedcoop import load_biomedcoop
from fedprompt.data.image_folder import load_image_folder
from fedprompt.data.image_set import DataError, DatasetSplits
from fedprompt.data.medmnist_reader import load_medmnist
from fedprompt.data.natural_sites import load_manifest
from fedprompt.data.synthetic import DEFAULT_ROOT as SYNTHETIC_ROOT
from fedprompt.data.synthetic import load_synthetic

DATA_ROOT = "${oc.env:FEDPROMPT_DATA,data}"

LOADERS: dict[str, Callable[[Mapping[str, Any]], DatasetSplits]] = {
    "biomedcoop": load_biomedcoop,
    "medmnist": load_medmnist,
    "image_folder": load_image_folder,
    "manifest": load_manifest,
    "synthetic": load_synthetic,
}


@dataclass(frozen=True)
class DatasetInfo:
    """What the project knows about a dataset without reading it.

    Attributes:
        name: Config name (the yaml's file stem and its ``name`` key).
        format: Reader to use (a key of ``LOADERS``).
        classnames: Class names in label order (None: taken from the data).
        options: The format's own config keys (``dir``; ``flag``, ``size``; ...).
        root: Default ``root``; OmegaConf interpolations allowed.
        sizes: Train/val/test image counts of the full set, when known.
        modality: Imaging modality, for reports.
    """

    name: str
    format: str
    classnames: tuple[str, ...] | None
    options: dict[str, Any] = field(default_factory=dict)
    root: str = DATA_ROOT
    sizes: tuple[int, int, int] | None = None
    modality: str = ""


def _biomedcoop(
    name: str, dir_name: str, classnames: list[str], sizes: tuple[int, int, int], modality: str
) -> DatasetInfo:
    return DatasetInfo(
        name=name,
        format="biomedcoop",
        classnames=tuple(classnames),
        options={"dir": dir_name, "download": False},
        sizes=sizes,
        modality=modality,
    )


def _medmnist(
    name: str, flag: str, classnames: list[str], sizes: tuple[int, int, int], modality: str
) -> DatasetInfo:
    return DatasetInfo(
        name=name,
        format="medmnist",
        classnames=tuple(classnames),
        options={"flag": flag, "size": 28, "download": False},
        root=f"{DATA_ROOT}/medmnist",
        sizes=sizes,
        modality=modality,
    )


_INFOS = [
    _biomedcoop(
        "btmri",
        "BTMRI",
        ["glioma tumor", "meningioma tumor", "pituitary tumor", "normal brain"],
        (2854, 1141, 1717),
        "brain MRI",
    ),
    _biomedcoop(
        "busi",
        "BUSI",
        ["benign tumor", "malignant tumor", "normal scan"],
        (389, 155, 236),
        "breast ultrasound",
    ),
    _biomedcoop(
        "chmnist",
        "CHMNIST",
        [
            "adipose tissue",
            "complex stroma",
            "debris",
            "empty background",
            "immune cells",
            "normal mucosal glands",
            "simple stroma",
            "tumour epithelium",
        ],
        (2496, 1000, 1504),
        "colorectal histopathology",
    ),
    _biomedcoop(
        "covid_19",
        "COVID_19",
        ["covid lungs", "lung opacity lungs", "viral pneumonia lungs", "normal lungs"],
        (10582, 4232, 6351),
        "chest X-ray",
    ),
    _biomedcoop(
        "ctkidney",
        "CTKidney",
        ["cyst kidney", "kidney stone", "kidney tumor", "normal kidney"],
        (6221, 2487, 3738),
        "kidney CT",
    ),
    _biomedcoop(
        "dermamnist",
        "DermaMNIST",
        [
            "actinic keratosis",
            "basal cell carcinoma",
            "benign keratosis",
            "dermatofibroma",
            "melanoma",
            "melanocytic nevus",
            "vascular lesion",
        ],
        (7006, 1003, 2005),
        "dermatoscopy",
    ),
    _biomedcoop(
        "kneexray",
        "KneeXray",
        [
            "healthy knee",
            "doubtful osteoarthritis",
            "minimal osteoarthritis",
            "moderate osteoarthritis",
            "severe osteoarthritis",
        ],
        (5778, 826, 1656),
        "knee X-ray",
    ),
    _biomedcoop(
        "kvasir",
        "Kvasir",
        [
            "dyed lifted polyps",
            "dyed resection margins",
            "esophagitis",
            "normal cecum",
            "normal pylorus",
            "normal z line",
            "polyps",
            "ulcerative colitis",
        ],
        (2000, 800, 1200),
        "endoscopy",
    ),
    _biomedcoop(
        "lungcolon",
        "LungColon",
        [
            "colon adenocarcinoma",
            "colon benign tissue",
            "lung adenocarcinoma",
            "lung benign tissue",
            "lung squamous cell carcinoma",
        ],
        (12500, 5000, 7500),
        "lung and colon histopathology (LC25000)",
    ),
    _biomedcoop(
        "retina",
        "RETINA",
        ["diabetic retinopathy", "glaucoma", "cataract", "normal retina"],
        (2108, 841, 1268),
        "fundus photography",
    ),
    # No split file for OCTMNIST was available to check: these are MedMNIST's OCT labels in
    # MedMNIST's label order; the reader reports any difference from the real split file.
    _biomedcoop(
        "octmnist",
        "OCTMNIST",
        ["choroidal neovascularization", "diabetic macular edema", "drusen", "normal"],
        (97477, 10832, 1000),
        "retinal OCT",
    ),
    _medmnist(
        "breastmnist", "breastmnist", ["malignant", "normal, benign"], (546, 78, 156), "ultrasound"
    ),
    _medmnist(
        "pathmnist",
        "pathmnist",
        [
            "adipose",
            "background",
            "debris",
            "lymphocytes",
            "mucus",
            "smooth muscle",
            "normal colon mucosa",
            "cancer-associated stroma",
            "colorectal adenocarcinoma epithelium",
        ],
        (89996, 10004, 7180),
        "colon pathology",
    ),
    _medmnist(
        "medmnist_dermamnist",
        "dermamnist",
        [
            "actinic keratoses and intraepithelial carcinoma",
            "basal cell carcinoma",
            "benign keratosis-like lesions",
            "dermatofibroma",
            "melanoma",
            "melanocytic nevi",
            "vascular lesions",
        ],
        (7007, 1003, 2005),
        "dermatoscopy",
    ),
    _medmnist(
        "medmnist_octmnist",
        "octmnist",
        ["choroidal neovascularization", "diabetic macular edema", "drusen", "normal"],
        (97477, 10832, 1000),
        "retinal OCT",
    ),
    _medmnist(
        "pneumoniamnist", "pneumoniamnist", ["normal", "pneumonia"], (4708, 524, 624), "chest X-ray"
    ),
    _medmnist(
        "bloodmnist",
        "bloodmnist",
        [
            "basophil",
            "eosinophil",
            "erythroblast",
            "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
            "lymphocyte",
            "monocyte",
            "neutrophil",
            "platelet",
        ],
        (11959, 1712, 3421),
        "blood cell microscopy",
    ),
    _medmnist(
        "organamnist",
        "organamnist",
        [
            "bladder",
            "femur-left",
            "femur-right",
            "heart",
            "kidney-left",
            "kidney-right",
            "liver",
            "lung-left",
            "lung-right",
            "pancreas",
            "spleen",
        ],
        (34561, 6491, 17778),
        "abdominal CT",
    ),
    DatasetInfo(
        name="synthetic",
        format="synthetic",
        classnames=("red disc", "green square", "blue triangle", "yellow ring"),
        options={
            "num_classes": 4,
            "train_per_class": 16,
            "val_per_class": 4,
            "test_per_class": 16,
            "image_size": 64,
            "seed": 0,
        },
        root=SYNTHETIC_ROOT,
        sizes=(64, 16, 64),
        modality="synthetic",
    ),
    DatasetInfo(
        name="image_folder",
        format="image_folder",
        classnames=None,
        options={"test_fraction": 0.2, "val_fraction": 0.0, "seed": 0},
        root=f"{DATA_ROOT}/image_folder",
    ),
    DatasetInfo(
        name="manifest",
        format="manifest",
        classnames=None,
        options={"manifest": "manifest.csv", "test_fraction": 0.2, "seed": 0},
        root=f"{DATA_ROOT}/manifest",
    ),
]

DATASETS: dict[str, DatasetInfo] = {info.name: info for info in _INFOS}


def list_datasets() -> list[str]:
    """Names of the known datasets, each with a ``configs/dataset/<name>.yaml``."""
    return sorted(DATASETS)


def dataset_info(name: str) -> DatasetInfo:
    """Facts about a known dataset.

    Raises:
        DataError: For an unknown name.
    """
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(
            f"Unknown dataset {name!r}; known datasets are {list_datasets()}."
        ) from None


def default_config(name: str) -> dict[str, Any]:
    """The config of a known dataset as a plain dict, equal to its yaml file.

    Lets code without Hydra (the CLI's ``data download``, notebooks) build a config by name.
    """
    info = dataset_info(name)
    return {
        "name": info.name,
        "format": info.format,
        "root": info.root,
        "classnames": None if info.classnames is None else list(info.classnames),
        **info.options,
    }


def _plain(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A plain dict with interpolations resolved, from a dict or an OmegaConf DictConfig."""
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:
        return dict(cfg)
    if isinstance(cfg, DictConfig):
        return dict(OmegaConf.to_container(cfg, resolve=True))
    return dict(cfg)


def load_dataset(cfg: Mapping[str, Any] | str) -> DatasetSplits:
    """Read the dataset a config describes, dispatching on ``cfg["format"]``.

    Args:
        cfg: A ``configs/dataset/<name>.yaml`` config (dict or DictConfig), or the name of a
            known dataset, which uses its default config.

    Raises:
        DataError: For a missing or unknown format; readers raise DatasetNotFoundError,
            CorruptImageError and DataError as documented there.
    """
    config = default_config(cfg) if isinstance(cfg, str) else _plain(cfg)
    fmt = config.get("format")
    if fmt not in LOADERS:
        raise DataError(
            f"Dataset config {config.get('name', '?')!r} has format {fmt!r}; use one of "
            f"{sorted(LOADERS)}."
        )
    return LOADERS[fmt](config)
