"""Measure how strongly each branch pulls on the encoder, to choose the CPC loss weight.

For a planned network on real (demo) patches at initialisation, computes the encoder gradient norm of
nnU-Net's segmentation loss and of each unweighted branch loss (median over a few batches), and the
CPC weights that make CPC's encoder gradient equal to the segmentation loss's (the default, 0.05) or to
the paper's 0.1-weighted VAE's. Prints a table and writes JSON.

    python benchmarks/cpc_weight.py -d 990 -p nnUNetCPUGNPlans --batches 8
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch


def encoder_grad_norm(loss: torch.Tensor, encoder: torch.nn.Module) -> float:
    """L2 norm of d loss / d encoder parameters."""
    grads = torch.autograd.grad(loss, [p for p in encoder.parameters()], retain_graph=True, allow_unused=True)
    return float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))


def main() -> None:
    """Load batches through nnU-Net's own loader and transforms, then compare gradient norms."""
    from nnunetv2.run.run_training import get_trainer_from_args

    from nnunet_ext.branches import BoundaryBranch, CPCBranch, VAEBranch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", required=True)
    parser.add_argument("-p", default="nnUNetCPUGNPlans")
    parser.add_argument("-c", default="3d_fullres")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/results/cpc_weight.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    os.environ.setdefault("nnUNet_n_proc_DA", "0")
    trainer = get_trainer_from_args(args.d, args.c, 0, "nnUNetTrainer", args.p, device=torch.device("cpu"))
    trainer.initialize()
    train_loader, _ = trainer.get_dataloaders()
    net, patch = trainer.network, trainer.configuration_manager.patch_size
    heads = trainer.label_manager.num_segmentation_heads
    branches = {"VAE": VAEBranch.from_encoder(net.encoder, patch, trainer.num_input_channels, heads, weight=1.0),
                "Boundary": BoundaryBranch.from_encoder(net.encoder, patch, trainer.num_input_channels, heads),
                "CPC": CPCBranch.from_encoder(net.encoder, patch, trainer.num_input_channels, heads, weight=1.0)}
    norms: dict[str, list[float]] = {k: [] for k in ["segmentation", *branches]}
    values: dict[str, list[float]] = {k: [] for k in norms}
    for i in range(args.batches):
        batch = next(train_loader)
        x, target = batch["data"], batch["target"]
        skips = net.encoder(x)
        seg = trainer.loss(net.decoder(skips), target)
        norms["segmentation"].append(encoder_grad_norm(seg, net.encoder))
        values["segmentation"].append(seg.item())
        masks = target[0][:, :heads].float()
        for name, branch in branches.items():
            loss = branch(x, skips, masks, net.encoder)
            norms[name].append(encoder_grad_norm(loss, net.encoder))
            values[name].append(loss.item())
        print(f"batch {i + 1}/{args.batches}", flush=True)
    med = {k: float(np.median(v)) for k, v in norms.items()}
    vae_weight = 0.1
    cpc_weight = vae_weight * med["VAE"] / med["CPC"]
    cpc_weight_seg = med["segmentation"] / med["CPC"]
    rows = [(k, float(np.mean(values[k])), med[k], med[k] / med["segmentation"]) for k in norms]
    print("\n| loss (unweighted) | value | encoder grad norm (median) | / segmentation |\n|---|---|---|---|")
    for name, value, norm, ratio in rows:
        print(f"| {name} | {value:.4f} | {norm:.4g} | {ratio:.3f} |")
    print(f"\nCPC weight giving the encoder gradient of the segmentation loss: {cpc_weight_seg:.3g}")
    print(f"CPC weight giving the encoder gradient of the 0.1-weighted VAE: {cpc_weight:.3g}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"dataset": trainer.plans_manager.dataset_name, "plans": args.p, "patch_size": list(patch),
                   "norm_op": trainer.configuration_manager.network_arch_init_kwargs["norm_op"],
                   "batches": args.batches, "grad_norm_median": med,
                   "loss_mean": {k: float(np.mean(v)) for k, v in values.items()},
                   "cpc_weight_matching_segmentation": cpc_weight_seg,
                   "cpc_weight_matching_vae": cpc_weight}, f, indent=2)


if __name__ == "__main__":
    main()
