"""What the branch monitor's gradient-norm probes cost (nnunet_ext.trainers.monitor).

A probe step differentiates the segmentation and the labeled branch loss separately (two extra partial backward
passes); the unlabeled part costs nothing. The monitor probes ``monitor_probes`` (5) steps per epoch, so its
cost per epoch is ``probes * (t_probe - t_step) / (iterations * t_step)``. This script times real train steps of a
branch trainer (nnU-Net's loader, loss, optimizer), alternating plain and probe steps so that load on the machine
hits both alike, and prints that cost for nnU-Net's 250 iterations and for ``--iters``.

    python benchmarks/monitor_cost.py -d 989 -c 2d -p nnUNetCPUGNPlans -tr ssCPCSegTrainer --steps 20

Trains in a temporary nnUNet_results folder (nothing of yours is written); needs nnUNet_raw/preprocessed.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", required=True)
    parser.add_argument("-c", default="2d")
    parser.add_argument("-p", default="nnUNetCPUGNPlans")
    parser.add_argument("-tr", default="ssCPCSegTrainer")
    parser.add_argument("--steps", type=int, default=20, help="pairs of (plain, probe) steps timed")
    parser.add_argument("--iters", type=int, default=50, help="iterations per epoch to report besides 250")
    parser.add_argument("--out", default="benchmarks/results/monitor_cost.json")
    args = parser.parse_args()
    os.environ["nnUNet_results"] = tempfile.mkdtemp(prefix="monitor_cost_")
    os.environ.setdefault("nnUNet_n_proc_DA", "0")
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    torch.manual_seed(0)
    trainer = get_trainer_from_args(args.d, args.c, 0, args.tr, args.p, device=torch.device("cpu"))
    trainer.on_train_start()
    trainer.on_train_epoch_start()
    times: dict[bool, list[float]] = {False: [], True: []}
    for step in range(2 * args.steps + 2):
        probe = step % 2 == 1
        trainer.monitor.is_probe = lambda _iteration, probe=probe: probe
        batch = next(trainer.dataloader_train)
        start = time.perf_counter()
        trainer.train_step(batch)
        if step >= 2:  # the first pair warms up
            times[probe].append(time.perf_counter() - start)
    plain, probed = float(np.median(times[False])), float(np.median(times[True]))
    probes = type(trainer).monitor_probes
    rows = {iters: probes * (probed - plain) / (iters * plain) for iters in (250, args.iters)}
    result = {"trainer": args.tr, "plans": args.p, "configuration": args.c, "patch_size":
              list(trainer.configuration_manager.patch_size), "threads": torch.get_num_threads(),
              "step_s": plain, "probe_step_s": probed, "probe_step_ratio": probed / plain, "probes_per_epoch": probes,
              "epoch_overhead": {str(k): v for k, v in rows.items()}}
    print(f"| trainer | patch | step (s) | probe step (s) | ratio | per epoch, 250 it | per epoch, {args.iters} it |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {args.tr} | {result['patch_size']} | {plain:.3f} | {probed:.3f} | {probed / plain:.2f}x "
          f"| +{rows[250]:.1%} | +{rows[args.iters]:.1%} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    trainer.on_train_end()


if __name__ == "__main__":
    main()
