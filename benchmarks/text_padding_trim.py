"""Times CoOp's text-feature pass on BiomedCLIP's architecture, trimmed vs padded to 256 tokens.

Usage: python benchmarks/text_padding_trim.py [--quick] [--repeats 7] [--warmup 2] [--threads N]

Runs on ``biomedclip-random`` (BiomedCLIP's architecture with random weights, no download) on the
CPU, with the four BTMRI class prompts. Both variants run in the same process, interleaved, and the
median of the repeats is reported, for the forward pass alone (evaluation) and for forward plus
backward to the context (one CoOp training step's text-tower cost).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from common import BTMRI_CLASSES, interleaved_seconds, median

from fedprompt.backbones import load_backbone
from fedprompt.text import PromptTextEncoder


def _medians(runs: dict[str, Callable[[], None]], repeats: int, warmup: int) -> dict[str, float]:
    return {name: median(t) for name, t in interleaved_seconds(runs, repeats, warmup).items()}


def _forward(encoder: PromptTextEncoder, ctx: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            encoder.encode(ctx)

    return run


def _forward_backward(encoder: PromptTextEncoder, ctx: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        ctx.grad = None
        encoder.encode(ctx).square().sum().backward()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 repeats after 1 warm-up")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.warmup = 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)

    backbone = load_backbone("biomedclip-random", device="cpu")
    trimmed = PromptTextEncoder(backbone, BTMRI_CLASSES, trim=True)
    padded = PromptTextEncoder(backbone, BTMRI_CLASSES, trim=False)
    ctx = trimmed.init_context().requires_grad_(True)
    with torch.no_grad():
        difference = (trimmed.encode(ctx) - padded.encode(ctx)).abs().max().item()

    print(
        f"biomedclip-random ({backbone.num_parameters() / 1e6:.1f}M parameters), CPU, "
        f"{torch.get_num_threads()} threads, {len(BTMRI_CLASSES)} BTMRI prompts such as "
        f"{trimmed.prompts[0]!r}"
    )
    print(
        f"tokens per prompt: trimmed {trimmed.sequence_length}, padded {padded.sequence_length}; "
        f"max |feature difference| {difference:.2e}"
    )
    print(f"median of {args.repeats} repeats after {args.warmup} warm-up runs:")
    for label, make in (("forward", _forward), ("forward+backward", _forward_backward)):
        runs = {"trimmed": make(trimmed, ctx), "padded": make(padded, ctx)}
        seconds = _medians(runs, args.repeats, args.warmup)
        print(
            f"  {label:<17} trimmed {seconds['trimmed'] * 1e3:8.1f} ms   "
            f"padded {seconds['padded'] * 1e3:8.1f} ms   "
            f"speed-up x{seconds['padded'] / seconds['trimmed']:.1f}"
        )


if __name__ == "__main__":
    main()
