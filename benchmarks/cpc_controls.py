"""Controls for the CPC branch: does InfoNCE fall where there is structure to predict, and only there?

Trains a small 2D GroupNorm encoder (nnU-Net's PlainConvEncoder) and :class:`CPCBranch` from scratch with
Adam on synthetic images, and reports the mean InfoNCE of the last 50 steps divided by chance (ln G),
for three layouts of the prediction axis:

- ``paper``: the branch's own layout (context = first h positions, targets = last h, h = (g - 1) // 2;
  no context sub-patch shares a voxel with a target);
- ``overlap``: the layout before issue #8 (context = first g - g // 2 positions; the last context and the
  first target sub-patch share 16 voxels);
- ``copy``: the context also sees the first target position itself (a deliberate leak).

and three kinds of image:

- ``smooth``: Gaussian-filtered noise (sigma 10 px): neighbouring sub-patches are related, so a context
  can predict its targets (positive control);
- ``blocks``: every 16 x 16 block (the stride) an independent constant plus noise;
- ``gratings``: every 16 x 16 block an independent random grating (orientation, frequency, phase, contrast).

On block images nothing but shared voxels can be predicted, so the ``paper`` layout must stay at chance;
a control that also stays at chance under ``overlap`` and ``copy`` cannot detect a leak. Prints a table
and writes JSON.

    python benchmarks/cpc_controls.py --steps 300
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

BLOCK = 16


def smooth(rng: np.random.RandomState, n: int, shape: tuple[int, int], sigma: float = 10.0) -> np.ndarray:
    """Gaussian-filtered noise, unit std per image, (n, 1, *shape)."""
    x = np.stack([gaussian_filter(rng.standard_normal(shape), sigma) for _ in range(n)])[:, None]
    return (x / x.std(axis=(1, 2, 3), keepdims=True)).astype(np.float32)


def blocks(rng: np.random.RandomState, n: int, shape: tuple[int, int]) -> np.ndarray:
    """Independent constant 16 x 16 blocks plus a little noise, (n, 1, *shape)."""
    values = rng.standard_normal((n, 1, shape[0] // BLOCK, shape[1] // BLOCK)).astype(np.float32)
    x = values.repeat(BLOCK, 2).repeat(BLOCK, 3)
    return x + 0.1 * rng.standard_normal(x.shape).astype(np.float32)


def gratings(rng: np.random.RandomState, n: int, shape: tuple[int, int]) -> np.ndarray:
    """Independent random gratings in every 16 x 16 block, (n, 1, *shape)."""
    yy, xx = np.mgrid[:BLOCK, :BLOCK].astype(np.float32)
    x = np.zeros((n, 1, *shape), np.float32)
    for b in range(n):
        for i in range(shape[0] // BLOCK):
            for j in range(shape[1] // BLOCK):
                theta, f, phase, a = (rng.uniform(0, np.pi), rng.uniform(0.05, 0.35), rng.uniform(0, 2 * np.pi),
                                      rng.uniform(0.2, 2))
                x[b, 0, i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK] = \
                    a * np.sin(2 * np.pi * f * (np.cos(theta) * xx + np.sin(theta) * yy) + phase)
    return x


IMAGES = {"smooth": smooth, "blocks": blocks, "gratings": gratings}


def branch_with_layout(layout: str, spec, n_blocks: int):
    """A CPCBranch whose prediction-axis layout is the paper's or one of the leaky ones."""
    from nnunet_ext.branches.cpc import CPCBranch

    class Probe(CPCBranch):
        def layout(self, g: int) -> tuple[int, int]:
            if layout == "paper":
                return super().layout(g)
            offset = g - g // 2
            return (offset, offset) if layout == "overlap" else (offset + 1, offset)

    return Probe(spec, n_blocks=n_blocks)


def train(images, layout: str, shape: tuple[int, int], steps: int, batch: int, seed: int, n_blocks: int,
          lr: float) -> float:
    """Mean InfoNCE of the last 50 steps divided by chance."""
    from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder

    from nnunet_ext.branches import EncoderSpec, GroupNorm, cpc_grid

    torch.manual_seed(seed)
    rng = np.random.RandomState(seed)
    encoder = PlainConvEncoder(1, 4, (16, 32, 64, 64), torch.nn.Conv2d, 3, (1, 2, 2, 2), 2, True, GroupNorm,
                               {"eps": 1e-5, "affine": True}, None, None, torch.nn.LeakyReLU, {"inplace": True},
                               return_skips=True)
    branch = branch_with_layout(layout, EncoderSpec.of(encoder), n_blocks)
    optimizer = torch.optim.Adam([*encoder.parameters(), *branch.parameters()], lr)
    losses = []
    for _ in range(steps):
        loss = branch(torch.from_numpy(images(rng, batch, shape)), None, None, encoder)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return float(np.mean(losses[-50:]) / math.log(math.prod(cpc_grid(shape))))


def main() -> None:
    """Run every image kind x layout and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=2, default=[64, 64])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--n-blocks", type=int, default=4, help="ResBlocks of the context network")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/cpc_controls.json")
    args = parser.parse_args()
    shape = tuple(args.shape)
    results = {}
    print("| images | layout | InfoNCE / chance (last 50 steps) | s |\n|---|---|---|---|", flush=True)
    for name, images in IMAGES.items():
        for layout in ("paper", "overlap", "copy"):
            start = time.time()
            ratio = train(images, layout, shape, args.steps, args.batch, args.seed, args.n_blocks, args.lr)
            results[f"{name}/{layout}"] = ratio
            print(f"| {name} | {layout} | {ratio:.3f} | {time.time() - start:.0f} |", flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"arguments": vars(args), "loss_over_chance": results}, f, indent=2)


if __name__ == "__main__":
    main()
