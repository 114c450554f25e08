"""A checkpoint is resumed only by the trainer that wrote it (nnunet_ext.checkpoints, ExtTrainer.load_checkpoint)."""

from __future__ import annotations

import pytest
import torch

from nnunet_ext.checkpoints import ForeignCheckpointError, check_written_by, written_by

WRITER = "EncDecTrainer_3labels_1epochs_2iters_noMirroring"
OTHER = "EncDecTrainer_4labels_1epochs_2iters_noMirroring"


def test_written_by_reads_the_name_nnunet_records_and_a_mismatch_names_both_and_the_folder(tmp_path):
    fold = tmp_path / f"{WRITER}__nnUNetPlans__3d_fullres" / "fold_0"
    fold.mkdir(parents=True)
    path = fold / "checkpoint_latest.pth"
    torch.save({"trainer_name": WRITER, "network_weights": {"w": torch.zeros(3)}}, path)
    assert written_by(str(path)) == WRITER
    check_written_by(WRITER, str(path), WRITER)  # its own trainer: accepted
    check_written_by(None, str(path), OTHER)  # a checkpoint that names no trainer: nothing to compare
    with pytest.raises(ForeignCheckpointError) as error:
        check_written_by(WRITER, str(path), OTHER)
    message = str(error.value)
    assert message.startswith(f"{path} was written by trainer {WRITER}, not {OTHER}")
    assert f"Rename the folder back to {WRITER}__nnUNetPlans__3d_fullres or move it away" in message
    torch.save([1, 2], tmp_path / "not_a_dict.pth")
    assert written_by(str(tmp_path / "not_a_dict.pth")) is None


@pytest.mark.slow
def test_a_trainer_refuses_another_trainers_checkpoint_before_loading_anything(make_trainer, tmp_path):
    writer = make_trainer(WRITER)
    writer.initialize()
    writer.current_epoch = 7
    path = str(tmp_path / "checkpoint_latest.pth")
    writer.save_checkpoint(path)

    other = make_trainer(OTHER)
    other.initialize()
    before = {k: v.clone() for k, v in other.network.state_dict().items()}
    with pytest.raises(ForeignCheckpointError, match=f"written by trainer {WRITER}, not {OTHER}"):
        other.load_checkpoint(path)
    assert other.current_epoch == 0
    assert all(torch.equal(v, before[k]) for k, v in other.network.state_dict().items())

    same = make_trainer(WRITER)  # the positive control: its own trainer resumes it
    same.load_checkpoint(path)
    assert same.current_epoch == 8  # nnU-Net records the epoch to resume at: the next one
    assert all(torch.equal(v, writer.network.state_dict()[k]) for k, v in same.network.state_dict().items())
