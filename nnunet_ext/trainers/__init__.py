"""nnU-Net trainers of nnunet_ext; names follow :mod:`nnunet_ext.trainers.names`."""
