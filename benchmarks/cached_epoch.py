"""One local epoch of CoOp on cached image features vs re-encoding the images every epoch.

Usage: python benchmarks/cached_epoch.py [--quick] [--images-per-class 16] [--batch-size 32]
       [--views 2] [--repeats 3] [--backbone biomedclip-random] [--threads N]

Both variants train the same CoOp learner (BTMRI class names) on the same generated 224 px PNG
images, in one process, taking turns, and the median of the repeats is reported:

- re-encoding: every epoch decodes the images, draws a fresh augmented view of each (seeded random
  resized crop and flip, as CoOp/BiomedCoOp train) and sends it through the frozen image tower,
  then runs the epoch's CoOp steps (``train_local``);
- cached: the same ``train_local`` epoch on the cached features of ``--views`` augmented views,
  one drawn per image per epoch; building that cache once is timed separately.

The best of the repeats is printed beside the median: on a machine shared with other jobs the
short cached epoch (small matrix products, thread synchronisation) suffers from contention far
more than the long batched encoding, and the best repeat is the closest to an idle machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import BTMRI_CLASSES, interleaved_seconds, machine_line, median, synthetic_images

from fedprompt.backbones import load_backbone
from fedprompt.data.augment import AugmentationSettings, SeededViewTransform
from fedprompt.data.features import FeatureCache, FeatureSettings, encode_views
from fedprompt.learners import create_learner
from fedprompt.training import train_local


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 images, 1 repeat")
    parser.add_argument("--images-per-class", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backbone", default="biomedclip-random")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.quick:
        args.images_per_class, args.batch_size, args.repeats = 4, 8, 1
    if args.threads:
        torch.set_num_threads(args.threads)

    backbone = load_backbone(args.backbone, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        images = synthetic_images(Path(tmp), args.images_per_class)
        labels = torch.as_tensor(images.labels)
        settings = FeatureSettings(cache_dir=None, views=args.views, batch_size=args.batch_size)
        augmentation = SeededViewTransform.for_backbone(
            backbone.model.visual.preprocess_cfg, AugmentationSettings()
        )
        train_cfg = {"lr": 0.002, "batch_size": args.batch_size, "local_epochs": 1}
        learner = create_learner("coop", backbone, BTMRI_CLASSES)

        start = time.perf_counter()
        cached = FeatureCache(settings).training_views(backbone, images)
        build_seconds = time.perf_counter() - start

        epoch = iter(range(args.views, 10**6))  # re-encoding draws a view never cached

        def reencoding() -> None:
            (features,), _ = encode_views(
                backbone, images, augmentation, [next(epoch)], batch_size=args.batch_size
            )
            train_local(learner, features, labels, train_cfg, seed=0)

        def on_cache() -> None:
            train_local(learner, cached.features, labels, train_cfg, seed=0)

        times = interleaved_seconds(
            {"re-encoding": reencoding, "cached": on_cache}, args.repeats, warmup=1
        )

    steps = -(-len(images) // args.batch_size)
    reencode, on_cached = median(times["re-encoding"]), median(times["cached"])
    best_reencode, best_cached = min(times["re-encoding"]), min(times["cached"])
    print(f"machine: {machine_line()}")
    print(
        f"{args.backbone} ({backbone.num_parameters() / 1e6:.1f}M parameters), CPU; "
        f"{len(images)} images of 224 px, batch {args.batch_size} ({steps} CoOp steps per epoch)"
    )
    print(f"{args.repeats} interleaved repeats after 1 warm-up each; median (best):")
    print(f"  one epoch re-encoding the images: {reencode:8.2f} s ({best_reencode:.2f} s)")
    print(f"  one epoch on cached features:     {on_cached:8.3f} s ({best_cached:.3f} s)")
    best_ratio = best_reencode / best_cached
    print(f"  speed-up per epoch: x{reencode / on_cached:.1f} (best x{best_ratio:.1f}); target 20")
    print(
        f"building the cache once ({args.views} views per image): {build_seconds:.2f} s, "
        f"repaid after {build_seconds / max(reencode - on_cached, 1e-9):.1f} epochs"
    )


if __name__ == "__main__":
    main()
