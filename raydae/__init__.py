"""raydae: Decoupled Autoencoder (DAE) training and latent generative models on Ray."""

__version__ = "0.1.0"
