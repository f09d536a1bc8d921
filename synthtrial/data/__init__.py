"""Readers for real acne image data sets (ACNE04) used to check and fine-tune the generator."""
