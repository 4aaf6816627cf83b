"""What a finer latent grid costs the miniature build's UNet stage: training steps side by side in one run.

The mini family's UNet (``ipadapter.mini.build.new_unet``, random weights) in three layouts at 32 px:

- ``8x8``: the earlier shipped base, ``vae_channels`` (16, 32, 32), ``unet_channels`` (64, 128), cross-attention
  on the top level (``unet_attention`` (1, 0));
- ``16x16-attn``: the same UNet on 16 x 16 latents (``vae_channels`` (16, 32): one fewer VAE downsampling);
- ``16x16``: the shipped base (``BuildConfig``'s defaults): 16 x 16 latents, ``unet_channels`` (32, 64, 128)
  with ``unet_attention`` (0, 1, 0), a plain convolution level on top and cross-attention from 8 x 8 down.

Each does the stage's work per step: a forward pass on a batch of noisy latents with 77 text tokens, the epsilon
loss, the backward pass and an AdamW step. They run round-robin ``--repeats`` times (``--steps`` steps each after
one warm-up step, order rotated per round). Printed: median seconds per step of each, the median of per-round
ratios to ``8x8``, and what ``--unet-steps`` steps would take at that speed.

    python benchmarks/bench_mini_unet.py                 # batch 64 (the build's), 10 steps x 3 rounds, 2 threads
    python benchmarks/bench_mini_unet.py --repeats 5 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from ipadapter.mini.build import BuildConfig, new_unet

WAYS = {
    "8x8": {"vae_channels": (16, 32, 32), "unet_channels": (64, 128), "unet_attention": (1, 0)},
    "16x16-attn": {"vae_channels": (16, 32), "unet_channels": (64, 128), "unet_attention": (1, 0)},
    "16x16": {"vae_channels": (16, 32), "unet_channels": (32, 64, 128), "unet_attention": (0, 1, 0)},
}


def _trainer(config: BuildConfig, batch: int) -> Any:
    torch.manual_seed(0)
    unet = new_unet(config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.lr)
    side = unet.config.sample_size
    x = torch.randn(batch, 4, side, side)
    cond = torch.randn(batch, 77, config.width)
    t = torch.randint(0, 1000, (batch,))

    def step() -> None:
        loss = F.mse_loss(unet(x, t, encoder_hidden_states=cond).sample, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=BuildConfig(out="x").unet_batch)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per way per round")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--unet-steps", type=int, default=BuildConfig(out="x").unet_steps)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = {name: _trainer(BuildConfig(out="x", **way), args.batch) for name, way in WAYS.items()}
    for step in steps.values():
        step()  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in WAYS}
    names = list(WAYS)
    for round_ in range(args.repeats):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            started = time.perf_counter()
            for _ in range(args.steps):
                steps[name]()
            seconds[name].append((time.perf_counter() - started) / args.steps)
    result = {
        "batch": args.batch,
        "threads": args.threads,
        "seconds_per_step": {name: statistics.median(s) for name, s in seconds.items()},
        "ratio_to_8x8": {
            name: statistics.median(b / a for a, b in zip(seconds["8x8"], s, strict=True))
            for name, s in seconds.items()
        },
        "stage_minutes": {name: statistics.median(s) * args.unet_steps / 60 for name, s in seconds.items()},
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for name in WAYS:
        print(f"{name:>10}: {result['seconds_per_step'][name]:.3f} s/step ({result['ratio_to_8x8'][name]:.2f}x), "
              f"{args.unet_steps} steps = {result['stage_minutes'][name]:.1f} min")  # fmt: skip


if __name__ == "__main__":
    main()
