"""Feature-extraction throughput of the frozen image tower, in images per second.

Usage: python benchmarks/feature_extraction.py [--quick] [--images-per-class 8]
       [--batch-sizes 8 32] [--repeats 2] [--backbone biomedclip-random] [--device auto]
       [--threads N]

Measured on generated 224 px PNG files, through the same code the feature cache uses
(``encode_views``), for each batch size:

- tower only: pixels already decoded and preprocessed, ``Backbone.encode_images``;
- eval transform: decode, resize/crop, normalise, encode (what ``views=1`` caches);
- 4 augmented views: each image decoded once and cropped 4 ways (``views=4``), per view;
- with patch tokens: the eval transform plus fp16 patch tokens (methods that need them).

On CUDA the tower runs in bf16 autocast, batches are pinned and copied asynchronously.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from common import interleaved_seconds, machine_line, median, synthetic_images
from PIL import Image

from fedprompt.backbones import load_backbone
from fedprompt.data.augment import AugmentationSettings, SeededViewTransform
from fedprompt.data.features import ViewMaker, encode_views
from fedprompt.site_rounds import resolve_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 images, batch 8, 1 repeat")
    parser.add_argument("--images-per-class", type=int, default=8)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--backbone", default="biomedclip-random")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.quick:
        args.images_per_class, args.batch_sizes, args.repeats = 2, [8], 1
    if args.threads:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    backbone = load_backbone(args.backbone, device=device)
    augmentation = SeededViewTransform.for_backbone(
        backbone.model.visual.preprocess_cfg, AugmentationSettings()
    )

    def eval_view(image: Image.Image, identity: str, view: int) -> torch.Tensor:
        return backbone.preprocess(image)

    print(f"machine: {machine_line()}")
    print(
        f"{args.backbone} ({backbone.num_parameters() / 1e6:.1f}M parameters) on {device}; "
        f"{args.repeats} interleaved repeats after 1 warm-up; images per second, median (best):"
    )
    with tempfile.TemporaryDirectory() as tmp:
        images = synthetic_images(Path(tmp), args.images_per_class)
        count = len(images)
        for batch_size in args.batch_sizes:
            pixels = torch.stack(
                [backbone.preprocess(image) for image, _ in images.with_transform(None)]
            )

            def tower(batch_size: int = batch_size, pixels: torch.Tensor = pixels) -> None:
                for begin in range(0, count, batch_size):
                    backbone.encode_images(pixels[begin : begin + batch_size])
                if device.type == "cuda":
                    torch.cuda.synchronize()

            def run(
                views: list[int], maker: ViewMaker, tokens: bool = False, size: int = batch_size
            ) -> Callable[[], object]:
                return lambda: encode_views(
                    backbone, images, maker, views, patch_tokens=tokens, batch_size=size
                )

            runs = {
                "tower only": tower,
                "eval transform": run([0], eval_view),
                "4 augmented views": run([0, 1, 2, 3], augmentation),
                "with patch tokens": run([0], eval_view, tokens=True),
            }
            times = interleaved_seconds(runs, args.repeats, warmup=1)
            per_image = {"4 augmented views": 4 * count}
            parts = [
                f"{name} {per_image.get(name, count) / median(seconds):.2f} "
                f"({per_image.get(name, count) / min(seconds):.2f})"
                for name, seconds in times.items()
            ]
            parts[2] += " views/s"
            print(f"  batch {batch_size:3d} ({count} images): " + ", ".join(parts))


if __name__ == "__main__":
    main()
