"""Data preparation: synthetic phantoms, scan-area detection, readers and the dataset builder."""
