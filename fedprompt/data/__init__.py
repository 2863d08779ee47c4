"""Data layer: dataset readers, few-shot sampling and site partitioning (no Flower imports)."""

from fedprompt.data.biomedcoop import load_biomedcoop, read_biomedcoop
from fedprompt.data.download import download_dataset
from fedprompt.data.few_shot import few_shot_indices
from fedprompt.data.image_folder import load_image_folder
from fedprompt.data.image_set import (
    CorruptImageError,
    DataError,
    DatasetNotFoundError,
    DatasetSplits,
    ImageSet,
)
from fedprompt.data.medmnist_reader import load_medmnist
from fedprompt.data.partition import (
    SitePartition,
    assign_sites,
    dirichlet_partition,
    iid_partition,
    partition_labels,
    partitions_report,
    pathological_partition,
    read_partitions_json,
    write_partitions_json,
)
from fedprompt.data.registry import (
    DATASETS,
    DatasetInfo,
    dataset_info,
    default_config,
    list_datasets,
    load_dataset,
)
from fedprompt.data.synthetic import generate_synthetic, load_synthetic

__all__ = [
    "DATASETS",
    "CorruptImageError",
    "DataError",
    "DatasetInfo",
    "DatasetNotFoundError",
    "DatasetSplits",
    "ImageSet",
    "SitePartition",
    "assign_sites",
    "dataset_info",
    "default_config",
    "dirichlet_partition",
    "download_dataset",
    "few_shot_indices",
    "generate_synthetic",
    "iid_partition",
    "list_datasets",
    "load_biomedcoop",
    "load_dataset",
    "load_image_folder",
    "load_medmnist",
    "load_synthetic",
    "partition_labels",
    "partitions_report",
    "pathological_partition",
    "read_biomedcoop",
    "read_partitions_json",
    "write_partitions_json",
]
