"""Dataset writers: MSD Task01 conversion and the synthetic demo dataset."""
