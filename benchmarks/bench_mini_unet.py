"""What a finer latent grid costs the miniature build's UNet stage: training steps side by side in one run.

The mini family's UNet (``ipadapter.mini.build.new_unet``, random weights) at the shipped 8 x 8 latents
(32 px, ``vae_channels`` (16, 32, 32)) and at 16 x 16 (``--set "vae_channels=(16, 32)"``: one fewer VAE
downsampling), each doing the stage's work per step: a forward pass on a batch of noisy latents with 77 text
tokens, the epsilon loss, the backward pass and an AdamW step. The two run round-robin ``--repeats`` times
(``--steps`` steps each after one warm-up step, order rotated per round). Printed: median seconds per step of
each, the median of per-round ratios, and what the stage's ``unet_steps`` would take at that speed.

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
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shipped = BuildConfig(out="x")
    ways = {"8x8": shipped, "16x16": BuildConfig(out="x", vae_channels=(16, 32))}
    steps = {name: _trainer(config, args.batch) for name, config in ways.items()}
    for step in steps.values():
        step()  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    for round_ in range(args.repeats):
        names = list(ways)[round_ % 2 :] + list(ways)[: round_ % 2]
        for name in names:
            started = time.perf_counter()
            for _ in range(args.steps):
                steps[name]()
            seconds[name].append((time.perf_counter() - started) / args.steps)
    ratio = statistics.median(b / a for a, b in zip(seconds["8x8"], seconds["16x16"], strict=True))
    result = {
        "batch": args.batch,
        "threads": args.threads,
        "seconds_per_step": {name: statistics.median(s) for name, s in seconds.items()},
        "ratio_16x16_over_8x8": ratio,
        "stage_minutes": {
            name: statistics.median(s) * shipped.unet_steps / 60 for name, s in seconds.items()
        },
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for name in ways:
        print(f"{name:>6}: {result['seconds_per_step'][name]:.3f} s/step, "
              f"{shipped.unet_steps} steps = {result['stage_minutes'][name]:.1f} min")  # fmt: skip
    print(f"16x16 / 8x8: {ratio:.2f}x (median of per-round ratios)")


if __name__ == "__main__":
    main()
