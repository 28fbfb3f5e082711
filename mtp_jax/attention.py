"""Implementations of causal softmax attention, all computing what `reference` computes.

`model.attend` is the one entry point and picks one of these by name (config `model.attention`):

  'xla'          the reference: one einsum for the [..., T, S] float32 scores, softmax, one einsum.
  'dot_product'  jax.nn.dot_product_attention: cuDNN's fused flash attention on an NVIDIA GPU in
                 bfloat16 or float16, XLA's composition of the same ops anywhere else.
  'blockwise'    plain JAX that never holds a whole [T, S] score matrix: queries in blocks, and
                 for each query block an online softmax over key blocks (Rabe & Staats 2021,
                 arXiv 2112.05682), skipping key blocks that no query of the block may see.
  'splash'       the Pallas splash-attention kernel for TPUs, for the uncached causal case;
                 untested (no TPU here), and every other call falls back to 'blockwise'.
  'auto'         per platform, see AUTO; resolved when the model is built (ModelShape).

Every implementation takes the same arguments (see `reference`) and honours `mask`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array

# What 'auto' picks per backend (benchmarks/NOTES.md §10). CPU: the reference, measured ~1.1x
# faster than 'blockwise' at T = 256 and 1024; 'blockwise' is the choice when memory binds (0.42x
# the temporaries at nano_125m). GPU: cuDNN's flash attention, as production stacks use (not
# measured here: benchmarks/device.sh compares it with the reference). TPU: 'blockwise' (not
# measured; it bounds memory) until the splash kernel has been run on a TPU.
AUTO = {"cpu": "xla", "gpu": "dot_product", "tpu": "blockwise"}


def resolve(name: str, platform: str | None = None) -> str:
    """The implementation 'auto' stands for on `platform` (default: jax.default_backend()); other
    names are returned as is."""
    return AUTO.get(platform or jax.default_backend(), "blockwise") if name == "auto" else name


def visible(q_positions: Array, k_positions: Array, mask: Array | None) -> Array:
    """Which keys each query may read, [..., T, S]: `mask` if given, else the positional causal
    rule (a query at position p reads the keys at positions <= p)."""
    if mask is not None:
        return mask
    return k_positions[..., None, :] <= q_positions[..., :, None]


def reference(
    q: Array, k: Array, v: Array, q_positions: Array, k_positions: Array, mask: Array | None = None, block_size: int = 0
) -> Array:
    """Softmax attention by position. q: [..., T, H]; k, v: [..., S, H] with the same leading
    dimensions; q_positions [..., T] and k_positions [..., S] broadcast against them; mask, when
    given, is a boolean array broadcastable to [..., T, S] (True = visible) that replaces the
    positional rule. Returns [..., T, H] in v's dtype. block_size is unused (one signature for all)."""
    scores = jnp.einsum("...th,...sh->...ts", q, k, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
    probs = jax.nn.softmax(jnp.where(visible(q_positions, k_positions, mask), scores, -1e30), axis=-1)
    return jnp.einsum("...ts,...sh->...th", probs.astype(v.dtype), v)


def dot_product(
    q: Array, k: Array, v: Array, q_positions: Array, k_positions: Array, mask: Array | None = None, block_size: int = 0
) -> Array:
    """jax.nn.dot_product_attention with the visibility as its boolean mask. It takes
    [B, T, N, H]: [B, N, T, H] inputs are transposed to it, any other leading dimensions are
    flattened into B with one head. cuDNN is asked for explicitly (JAX's default is XLA) where
    it applies: on GPU in a 16-bit dtype."""
    *lead, t, h = q.shape
    allowed = visible(q_positions, k_positions, mask)
    if len(lead) == 2:  # [B, N, T, H]: keep the heads as heads, the mask broadcast over them
        to_btnh = lambda a: a.swapaxes(1, 2)  # noqa: E731
        allowed = allowed.reshape((1,) * (4 - allowed.ndim) + allowed.shape)
    else:
        to_btnh = lambda a: a.reshape(-1, a.shape[-2], 1, h)  # noqa: E731
        allowed = jnp.broadcast_to(allowed, (*lead, t, k.shape[-2])).reshape(-1, 1, t, k.shape[-2])
    cudnn = jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
    out = jax.nn.dot_product_attention(
        to_btnh(q), to_btnh(k), to_btnh(v), mask=allowed, implementation="cudnn" if cudnn else None
    )
    return out.swapaxes(1, 2) if len(lead) == 2 else out.reshape(q.shape)


def _blocks(x: Array, axis: int, size: int, fill) -> Array:
    """x split along `axis` (a negative index) into blocks of `size`, the last padded with
    `fill`; the block index becomes the new leading axis: [..., L, ...] -> [L / size, ..., size, ...]."""
    pad = -x.shape[axis] % size
    if pad:
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, pad)
        x = jnp.pad(x, widths, constant_values=fill)
    shape = x.shape[: axis % x.ndim] + (x.shape[axis] // size, size) + x.shape[axis % x.ndim + 1 :]
    return jnp.moveaxis(x.reshape(shape), axis % x.ndim, 0)


def blockwise(
    q: Array,
    k: Array,
    v: Array,
    q_positions: Array,
    k_positions: Array,
    mask: Array | None = None,
    block_size: int = 512,
) -> Array:
    """Exact attention in blocks of `block_size` queries x `block_size` keys (Rabe & Staats
    2021). For each query block a scan over the key blocks keeps a running maximum, softmax
    denominator and weighted sum of values (the online softmax), so at most [..., bq, bk] scores
    exist at a time; a key block that no query of the block may see is skipped (a causal
    sequence skips about half). Each query block is rematerialised in the backward pass, so the
    gradient too needs no [T, S] matrix, for one extra forward pass of attention.

    A query that may see no key at all (which the positional rule never produces) gets zeros,
    where the reference averages every value (unless everything is one block, which the reference
    computes)."""
    *_, t, h = q.shape
    s = k.shape[-2]
    if t <= block_size and s <= block_size:  # one block: the reference computes it without the loops
        return reference(q, k, v, q_positions, k_positions, mask)
    bq, bk = min(block_size, t), min(block_size, s)
    never = jnp.iinfo(jnp.int32).max  # a padded key's position: later than every query
    q_blocks, qpos_blocks = _blocks(q, -2, bq, 0), _blocks(q_positions, -1, bq, 0)  # [nq, ..., bq, (H)]
    k_blocks, v_blocks = _blocks(k, -2, bk, 0), _blocks(v, -2, bk, 0)  # [nk, ..., bk, H]
    kpos_blocks = _blocks(k_positions.astype(jnp.int32), -1, bk, never)  # [nk, ..., bk]
    if mask is not None:
        mask = jnp.broadcast_to(mask, (*mask.shape[:-2], t, s))
    mask_blocks = None if mask is None else _blocks(mask, -2, bq, False)  # [nq, ..., bq, S]

    def query_block(args):
        qb, qpos, mask_b = args
        qb = qb / math.sqrt(h)
        mask_kb = None if mask_b is None else _blocks(mask_b, -1, bk, False)  # [nk, ..., bq, bk]

        def key_block(carry, kblock):
            kb, vb, kpos, allowed = kblock
            allowed = visible(qpos, kpos, allowed)  # [..., bq, bk]

            def update(carry):
                acc, m, denominator = carry  # [..., bq, H], [..., bq], [..., bq] float32
                scores = jnp.einsum("...th,...sh->...ts", qb, kb, preferred_element_type=jnp.float32)
                scores = jnp.where(allowed, scores, -jnp.inf)
                # The running maximum only keeps exp() in range; the result does not depend on it.
                m_new = jax.lax.stop_gradient(jnp.maximum(m, jnp.max(scores, axis=-1)))
                p = jnp.exp(scores - m_new[..., None])  # 0 where not allowed: m_new is finite
                correction = jnp.exp(m - m_new)
                acc = acc * correction[..., None] + jnp.einsum(
                    "...ts,...sh->...th", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32
                )
                return acc, m_new, denominator * correction + jnp.sum(p, axis=-1)

            return jax.lax.cond(jnp.any(allowed), update, lambda c: c, carry), None

        lead = jnp.broadcast_shapes(qb.shape[:-1], qpos.shape)  # [..., bq]
        init = (jnp.zeros((*lead, h), jnp.float32), jnp.full(lead, -1e30, jnp.float32), jnp.zeros(lead, jnp.float32))
        (acc, _, denominator), _ = jax.lax.scan(key_block, init, (k_blocks, v_blocks, kpos_blocks, mask_kb))
        return acc / jnp.where(denominator > 0, denominator, 1.0)[..., None]

    out = jax.lax.map(jax.checkpoint(query_block), (q_blocks, qpos_blocks, mask_blocks))  # [nq, ..., bq, H]
    out = jnp.moveaxis(out, 0, -3)
    return out.reshape(*out.shape[:-3], -1, h)[..., :t, :].astype(v.dtype)


def splash(
    q: Array,
    k: Array,
    v: Array,
    q_positions: Array,
    k_positions: Array,
    mask: Array | None = None,
    block_size: int = 512,
) -> Array:
    """The Pallas splash-attention kernel on TPU (as MaxText uses it), UNTESTED: no TPU was
    available. The kernel's mask is causal by index, which equals the positional rule when
    queries and keys are the same sequence, i.e. the same positions array (every uncached call
    here, where positions increase along the sequence); any other call (a KV cache, an explicit
    mask) falls back to 'blockwise'. Under a multi-device mesh it may need a shard_map."""
    if mask is not None or q_positions is not k_positions or q.ndim != 4 or q.shape != k.shape:
        return blockwise(q, k, v, q_positions, k_positions, mask, block_size)
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    _, n, t, h = q.shape  # [B, N, T, H]
    kernel = sa.make_splash_mha(sa.MultiHeadMask([sa.CausalMask((t, t))] * n), head_shards=1, q_seq_shards=1)
    return jax.vmap(kernel)(q / math.sqrt(h), k, v).astype(v.dtype)  # the kernel does not scale


IMPLEMENTATIONS = {"xla": reference, "dot_product": dot_product, "blockwise": blockwise, "splash": splash}
NAMES = ("auto", *IMPLEMENTATIONS)  # what model.attention may name
