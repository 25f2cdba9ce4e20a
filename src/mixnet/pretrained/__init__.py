"""Pretrained weights: the registry (data), verified downloads, and checkpoint reading, filling and saving."""
