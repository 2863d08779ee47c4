"""Cost of one DP-SGD step relative to a non-private step, for both clipping modes.

Usage: python benchmarks/dp_step_cost.py [--method coop] [--batch 32] [--repeats 5] [--warmup 1]
[--threads N] [--device cpu]

Runs on ``biomedclip-random`` (BiomedCLIP's architecture with random weights, no download) on the
CPU (or ``--device cuda``: every step ends with a CUDA synchronise, so it is timed whole), with
CoOp's four-token context and the four BTMRI class prompts, on a batch of random unit image
features (the image tower is frozen and cached, so it is not part of a step). A step is
zero_grad, the gradient, and an SGD step: the plain ``learner.loss`` backward; text-feature-space
clipping (Opacus head on T, one backward through the text encoder), where the method allows it;
exact per-sample clipping (``torch.func.vmap`` per-record gradients through the text encoder, or
one backward per record where the loss cannot run under vmap), plus the method's public terms.
``--method`` picks another CoOp-family method (its own loss is the non-private baseline). The
steps run interleaved and the median of the repeats is reported.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
from common import BTMRI_CLASSES, interleaved_seconds, median

from fedprompt.backbones import load_backbone
from fedprompt.learners import create_learner
from fedprompt.privacy import ExactClipping, TextFeatureClipping, resolve_clipping
from fedprompt.privacy.loss_split import public_loss


def _medians(runs: dict[str, Callable[[], None]], repeats: int, warmup: int) -> dict[str, float]:
    return {name: median(t) for name, t in interleaved_seconds(runs, repeats, warmup).items()}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="coop")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA GPU is visible; use --device cpu.")
    device = torch.device(args.device)

    backbone = load_backbone("biomedclip-random", device=str(device))
    learner = create_learner(args.method, backbone, BTMRI_CLASSES)
    generator = torch.Generator().manual_seed(0)
    features = F.normalize(torch.randn(args.batch, backbone.embed_dim, generator=generator), dim=-1)
    labels = torch.randint(len(BTMRI_CLASSES), (args.batch,), generator=generator)
    features, labels = features.to(device), labels.to(device)
    optimizer = torch.optim.SGD([learner.ctx], lr=0.002, momentum=0.9)
    settings = {
        "noise_multiplier": 1.0,
        "max_grad_norm": 1.0,
        "expected_batch_size": args.batch,
        "noise_generator": torch.Generator(device=device).manual_seed(1),
        "step_hook": lambda _: None,
    }

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def plain() -> None:
        optimizer.zero_grad(set_to_none=True)
        learner.loss(features, labels).backward()
        optimizer.step()
        synchronize()

    def private(clipper: TextFeatureClipping | ExactClipping) -> Callable[[], None]:
        def run() -> None:
            optimizer.zero_grad(set_to_none=True)
            clipper.private_gradient(features, labels, {})
            public = public_loss(learner)
            if public is not None:
                public.backward()
            optimizer.step()
            synchronize()

        return run

    runs: dict[str, Callable[[], None]] = {"non-private": plain}
    if resolve_clipping(learner, "auto") == "text_features":
        runs["dp text-feature clipping"] = private(TextFeatureClipping(learner, **settings))
    runs["dp exact per-sample"] = private(ExactClipping(learner, method="auto", **settings))
    learner.train()
    seconds = _medians(runs, args.repeats, args.warmup)
    print(
        f"biomedclip-random ({backbone.num_parameters() / 1e6:.1f}M parameters), "
        f"{_device_name(device)}; {args.method} n_ctx 4, {len(BTMRI_CLASSES)} classes, "
        f"{learner.prompt_encoder.sequence_length} tokens per prompt, batch {args.batch}; "
        f"median of {args.repeats}"
    )
    base = seconds["non-private"]
    for name, value in seconds.items():
        print(f"{name:26s} {1000 * value:9.1f} ms/step   x{value / base:.2f}")


if __name__ == "__main__":
    main()
