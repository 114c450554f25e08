"""Segmentation metrics (Dice, HD95 with a named empty-mask policy) and folder evaluation."""
