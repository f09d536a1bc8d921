"""Readers for outside acne image data sets (ACNE04 folders, per-level folders).

In: a folder on disk. Out: validated tables of images, levels and boxes, for training graders and fine-tuning.
Owns: the ACNE04 layout contract (label files, VOC boxes, folds).
"""
