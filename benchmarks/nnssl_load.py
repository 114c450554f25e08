"""What ``-pretrained_weights`` loads from a full-size OpenMind-style checkpoint, and what it costs, on the CPU.

No OpenMind checkpoint can be downloaded here, so this writes one in nnssl's format with the exact ResEncL shapes
(nnssl's ``architecture_registry.get_res_enc_l``, 1 input channel, 1 output channel as in MAE pretraining) and
random weights, with an adaptation plan as nnssl's MAE trainer writes it (``arch_class_name`` ResEncL, no
kwargs, 1 mm spacing, ZScore, recommended patch 160^3). Then, for an MSD Task01-like plan (4 channels, 3 regions):
``like_pretrained_plans`` (what ``nnunet-ext plan --like-pretrained`` writes), ``check_fits`` (what the plan command
and the study check), and ``load_pretrained`` into the network nnU-Net builds from those plans (what
``nnUNetv2_train -pretrained_weights`` does through our trainers), with the record written. Prints counts, sizes
and seconds as JSON and writes them to ``benchmarks/results/nnssl_load.json``. About 10 s and 2.2 GB of memory on
one CPU core.

    OMP_NUM_THREADS=1 python benchmarks/nnssl_load.py
"""

import json
import os
import tempfile
import time

import torch
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_ext import nnssl
from nnunet_ext.files import write_json_atomic
from nnunet_ext.planners.like_pretrained import like_pretrained_plans
from nnunet_ext.pretrained import RECORD_FILE, check_fits, load_pretrained

OUT = "benchmarks/results/nnssl_load.json"
RESENC_L = dict(n_stages=6, features_per_stage=[32, 64, 128, 256, 320, 320], conv_op=torch.nn.Conv3d,
                kernel_sizes=[[3, 3, 3]] * 6, strides=[[1, 1, 1]] + [[2, 2, 2]] * 5,
                n_blocks_per_stage=[1, 3, 4, 6, 6, 6], n_conv_per_stage_decoder=[1, 1, 1, 1, 1], conv_bias=True,
                norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True})
ADAPTATION_PLAN = {
    "architecture_plans": {"arch_class_name": "ResEncL", "arch_kwargs": None, "arch_kwargs_requiring_import": None},
    "pretrain_plan": {"dataset_name": "Dataset001_OpenMind", "plans_name": "nnsslPlans",
                      "configurations": {"onemmiso": {"spacing": [1, 1, 1], "patch_size": [160, 160, 160],
                                                      "normalization_schemes": ["ZScoreNormalization"]}}},
    "pretrain_num_input_channels": 1, "recommended_downstream_patchsize": [160, 160, 160],
    "key_to_encoder": "encoder.stages", "key_to_stem": "encoder.stem",
    "keys_to_in_proj": ["encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0"], "key_to_lpe": None}
# the 3d_fullres entries like-pretrained planning reads, as nnU-Net plans MSD Task01 (4 MRI channels, 1 mm)
TASK01 = {"dataset_name": "Dataset001_BrainTumour", "plans_name": "nnUNetPlans", "configurations": {"3d_fullres": {
    "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
    "patch_size": [128, 128, 128], "median_image_size_in_voxels": [138, 169, 138], "spacing": [1.0, 1.0, 1.0],
    "normalization_schemes": ["ZScoreNormalization"] * 4, "use_mask_for_norm": [True] * 4, "architecture": {}}}}


def main() -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        source = ResidualEncoderUNet(input_channels=1, num_classes=1, **RESENC_L)
        checkpoint = os.path.join(folder, "checkpoint_final.pth")
        torch.save({"network_weights": source.state_dict(), "nnssl_adaptation_plan": ADAPTATION_PLAN,
                    "trainer_name": "BaseMAETrainer"}, checkpoint)
        plans = like_pretrained_plans(TASK01, nnssl.read_adaptation_plan(checkpoint))
        start = time.perf_counter()
        transfer = check_fits(checkpoint, plans, "3d_fullres", 4)
        check_s = time.perf_counter() - start
        manager = PlansManager(plans).get_configuration("3d_fullres")
        network = get_network_from_plans(manager.network_arch_class_name, manager.network_arch_init_kwargs,
                                         manager.network_arch_init_kwargs_req_import, 4, 3, deep_supervision=True)
        start = time.perf_counter()
        record = load_pretrained(network, checkpoint, lambda _: None, folder)
        load_s = time.perf_counter() - start
        entries = record["network"].values()
        loaded = {k for k, e in record["network"].items() if e["status"] in ("loaded", "adapted")}
        result = {
            "checkpoint_mb": round(os.path.getsize(checkpoint) / 2**20),
            "parameters_million": round(sum(p.numel() for p in network.parameters()) / 1e6, 1),
            "parameters_loaded_million": round(sum(p.numel() for k, p in network.named_parameters()
                                                   if k in loaded) / 1e6, 1),
            "file_tensors": len(record["file"]),
            "file_tensors_used": sum(e["status"] == "used" for e in record["file"].values()),
            "file_keys_used_as_other_names": sum("same_tensor_as" in e for e in record["file"].values()),
            "file_keys_unused": sum(e["status"] == "unused" for e in record["file"].values()),
            "network_keys": len(record["network"]), "summary": record["summary"],
            "keys_loaded": sum(e["status"] == "loaded" and "loaded_with" not in e for e in entries),
            "keys_adapted": sorted(k for k, e in record["network"].items() if e["status"] == "adapted"),
            "check_fits_s": round(check_s, 2), "load_pretrained_s": round(load_s, 2),
            "record_kb": round(os.path.getsize(os.path.join(folder, RECORD_FILE)) / 1024),
            "tensors_fitting": len(transfer.values)}
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    write_json_atomic(OUT, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
