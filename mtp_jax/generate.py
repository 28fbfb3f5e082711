"""Decoding with a fixed-capacity KV cache: one compiled prefill, one compiled decode step.

Plain decoding runs head 1's path, which for every head type is the decoder's n_layers blocks,
final norm and unembedding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtp_jax.mtp import MTPModel


def init_caches(model: MTPModel, batch: int, capacity: int, n_layers: int | None = None) -> list[dict]:
    shape = model.decoder.shape
    size = (batch, capacity, shape.n_heads, shape.head_dim)
    # Separate buffers per layer: the decode step donates (updates in place) every one of them.
    return [{"k": jnp.zeros(size, shape.dtype), "v": jnp.zeros(size, shape.dtype)}
            for _ in range(shape.n_layers if n_layers is None else n_layers)]


@functools.partial(nnx.jit, donate_argnums=2)
def decoder_step(model: MTPModel, tokens: jax.Array, caches: list[dict], index: jax.Array):
    """Run tokens [B, t] at positions index … index + t - 1 through all decoder layers.

    Returns head 1's logits for the last position [B, V] (float32) and the updated caches."""
    positions = index + jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    decoder = model.decoder
    h, caches = decoder.run_blocks(decoder.embed(tokens), positions, range(decoder.shape.n_layers), caches, index)
    logits = jnp.dot(decoder.final_norm(h[:, -1]), decoder.unembedding_matrix(), preferred_element_type=jnp.float32)
    return logits, caches


def choose(logits: jax.Array, key: jax.Array, temperature: float, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Next token [B] from logits [B, V]: greedy at temperature 0, else sampled."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1)
    logits = logits / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(ordered, axis=-1), axis=-1)
        # The smallest logit still inside the nucleus (the top token is always kept).
        cutoff = jnp.take_along_axis(ordered, jnp.sum(cumulative < top_p, axis=-1, keepdims=True), axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1)


def sample(model: MTPModel, prompt: list[int], *, max_new_tokens: int, temperature: float = 0.0,
           top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> list[int]:
    """Continue one prompt token by token; returns the new token ids."""
    capacity = len(prompt) + max_new_tokens
    caches = init_caches(model, 1, capacity)
    logits, caches = decoder_step(model, jnp.asarray([prompt], jnp.int32), caches, jnp.int32(0))
    key = jax.random.key(seed)
    out = []
    choose_fn = jax.jit(choose, static_argnums=(2, 3, 4))
    for i in range(max_new_tokens):
        key, sub = jax.random.split(key)
        token = choose_fn(logits, sub, temperature, top_k, top_p)
        out.append(token)
        if i + 1 < max_new_tokens:
            logits, caches = decoder_step(model, token[:, None].astype(jnp.int32), caches,
                                          jnp.int32(len(prompt) + i))
    return [int(t) for t in np.asarray(jnp.concatenate(out))]
