"""The two networks of VAR: the multi-scale VQ-VAE (vqvae.py) and the next-scale transformer (var.py)."""
