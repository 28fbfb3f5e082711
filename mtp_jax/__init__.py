"""mtp_jax: training language models with Multi-Token Prediction in JAX/Flax."""
