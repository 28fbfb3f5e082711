"""The decoder-only transformer trunk: embedding, RoPE attention blocks, final norm, unembedding.

Every parameter carries logical axis names in its `axes` metadata ('vocab', 'embed', 'heads',
'head_dim', 'mlp', 'norm'); `sharding.py` maps them to mesh axes. Nothing here knows about
devices or MTP: `mtp.py` composes these pieces into heads.

Attention optionally reads and writes a fixed-capacity KV cache passed in and returned
explicitly (no hidden state), which is what `decoding.py` uses.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtp_jax import attention

Array = jax.Array
ROPE_SCALINGS = ("none", "linear", "llama3")  # rope_frequencies


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The model's hyper-parameters (config.model plus the data's vocabulary size), with the code
    paths that depend on the platform chosen once, for the platform the model is built for
    (`platform`, default jax.default_backend(); a TPU topology compiled on this host passes 'tpu')."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    mlp_dim: int
    n_kv_heads: int = 0  # key/value heads (grouped-query attention); 0 = n_heads
    tie_embeddings: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    rope_theta: float = 10_000.0
    rope_scaling: str = "none"  # 'none', 'linear' or 'llama3' (rope_frequencies)
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3 only, as are the next two
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192
    head_dim: int = 0  # size of each attention head; 0 = d_model // n_heads
    qkv_bias: bool = False  # biases on the query, key and value projections (Qwen2)
    norm_eps: float = 1e-6  # RMSNorm's epsilon
    remat: bool = False  # recompute each block's activations in the backward pass (training only)
    attention: str = "auto"  # which attention implementation `attend` runs (attention.NAMES; 'auto' resolved)
    attention_block_size: int = 512  # queries and keys per block of the 'blockwise' implementation
    scan_layers: bool = False  # the trunk's blocks as one scan over stacked parameters
    fuse_projections: bool | None = None  # fused_projection for many rows (not a config field); None: on CPU
    platform: dataclasses.InitVar[str | None] = None  # resolves 'auto' attention and fuse_projections

    def __post_init__(self, platform: str | None):
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        platform = platform or jax.default_backend()
        object.__setattr__(self, "attention", attention.resolve(self.attention, platform))
        if self.fuse_projections is None:
            object.__setattr__(self, "fuse_projections", platform == "cpu")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @classmethod
    def from_config(cls, model_cfg, vocab_size: int, platform: str | None = None) -> ModelShape:
        derived = ("vocab_size", "fuse_projections")  # not config.model's
        return cls(
            vocab_size=vocab_size,
            platform=platform,
            **{f.name: model_cfg[f.name] for f in dataclasses.fields(cls) if f.name not in derived},
        )

    def fuses(self, x: Array, decoding: bool) -> bool:
        """Whether fused_projection fuses the projections of x [B, T, D]: where it was measured to
        pay (fuse_projections: on CPU), in passes without a KV cache (training, evaluation) of many
        rows. Decoding passes (a cache) use separate dots: forward only, they were faster at every
        row count measured (benchmarks/NOTES.md §14)."""
        return self.fuse_projections and not decoding and x.shape[0] * x.shape[1] >= 16


def normal_param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], dtype, std: float) -> nnx.Param:
    """A parameter drawn from N(0, std²) with its logical axis names (sharding.LOGICAL_RULES)."""
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype), axes=axes)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, param_dtype, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), axes=("norm",))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        # Normalise in float32 even under bfloat16 compute: the mean of squares loses too much.
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope_frequencies(shape: ModelShape) -> Array:
    """RoPE's angular frequency per pair of a head's dimensions [H/2]: theta^(-2i/H), then, as
    Hugging Face's rope types do, divided by rope_factor ('linear'), or by rope_factor only for
    wavelengths longer than rope_original_context / rope_low_freq_factor and interpolated up to
    those shorter than rope_original_context / rope_high_freq_factor ('llama3', Llama 3.1)."""
    half = shape.head_dim // 2
    freq = shape.rope_theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    if shape.rope_scaling == "linear":
        return freq / shape.rope_factor
    if shape.rope_scaling == "llama3":
        context, low, high = shape.rope_original_context, shape.rope_low_freq_factor, shape.rope_high_freq_factor
        wavelength = 2 * math.pi / freq
        scaled = jnp.where(wavelength > context / low, freq / shape.rope_factor, freq)
        smooth = (context / wavelength - low) / (high - low)
        smoothed = (1 - smooth) * scaled / shape.rope_factor + smooth * scaled
        medium = (wavelength >= context / high) & (wavelength <= context / low)
        return jnp.where(medium, smoothed, scaled)
    return freq


def rope(x: Array, positions: Array, freq: Array) -> Array:
    """Rotary position embedding. x: [B, N, T, H], positions: [B, T] (absolute), freq: [H/2]
    (rope_frequencies)."""
    angle = positions[..., None].astype(jnp.float32) * freq  # [B, T, H/2]
    sin, cos = jnp.sin(angle)[:, None], jnp.cos(angle)[:, None]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attend(
    q: Array,
    k: Array,
    v: Array,
    q_positions: Array,
    k_positions: Array,
    mask: Array | None = None,
    *,
    implementation: str = "xla",
    block_size: int = 512,
) -> Array:
    """Causal softmax attention by position: a query at position p reads the keys at positions
    <= p. q: [..., T, H]; k, v: [..., S, H]; q_positions [..., T] and k_positions [..., S]
    broadcast against the leading dimensions. `mask`, a boolean array broadcastable to
    [..., T, S] (True = visible), replaces the positional rule when given.

    `implementation` names one of attention.IMPLEMENTATIONS ('auto' resolved: ModelShape); all
    compute the same function (attention.py)."""
    return attention.IMPLEMENTATIONS[implementation](q, k, v, q_positions, k_positions, mask, block_size)


def fused_projection(x: Array, weights: list[nnx.Param], dtype, fuse: bool) -> list[Array]:
    """[x @ w for w in weights]. x: [B, T, D]; each weight [D, ...] is used as a [D, F] matrix.

    fuse=True computes them as one dot: the weights are concatenated (a copy of the parameters,
    small next to the activations) into one [ΣF, D] matrix that the dot reads transposed. On
    XLA-CPU that halves the MLP's forward and backward time against separate dots, chiefly
    because the weight gradients then need no transposed copy of each activation gradient
    (benchmarks/NOTES.md §5). The model fuses only where it was measured to pay (ModelShape.fuses):
    on CPU, in training and evaluation passes of many rows. Decoding passes are faster with separate
    dots (forward only, the fused dot pays its weight copy and gains nothing), and on accelerators the concatenation along the
    tensor-parallel axis would add collectives to every step."""
    d = x.shape[-1]
    matrices = [w[...].astype(dtype).reshape(d, -1) for w in weights]
    if not fuse:
        return [x @ m for m in matrices]
    y = jnp.einsum("btd,fd->btf", x, jnp.concatenate([m.T for m in matrices]))
    return jnp.split(y, np.cumsum([m.shape[1] for m in matrices])[:-1].tolist(), axis=-1)


class Attention(nnx.Module):
    def __init__(self, shape: ModelShape, *, rngs: nnx.Rngs):
        d, n, h, pd = shape.d_model, shape.n_heads, shape.head_dim, jnp.dtype(shape.param_dtype)
        std, kv = 0.02, shape.kv_heads
        self.wq = normal_param(rngs, (d, n, h), ("embed", "heads", "head_dim"), pd, std)
        self.wk = normal_param(rngs, (d, kv, h), ("embed", "heads", "head_dim"), pd, std)
        self.wv = normal_param(rngs, (d, kv, h), ("embed", "heads", "head_dim"), pd, std)
        # GPT-2's residual scaling keeps the residual stream's variance flat with depth.
        self.wo = normal_param(rngs, (n, h, d), ("heads", "head_dim", "embed"), pd, std / math.sqrt(2 * shape.n_layers))
        if shape.qkv_bias:
            self.bq, self.bk, self.bv = (
                nnx.Param(jnp.zeros((heads, h), pd), axes=("heads", "head_dim")) for heads in (n, kv, kv)
            )
        self.shape, self.dtype = shape, jnp.dtype(shape.dtype)
        self.implementation, self.block_size = shape.attention, shape.attention_block_size

    def __call__(
        self,
        x: Array,
        positions: Array,
        cache: dict | None = None,
        cache_index: Array | None = None,
        mask: Array | None = None,
    ) -> tuple[Array, dict | None]:
        """x: [B, T, D]; positions: [B, T]. With a cache ({'k','v'}: [B·N, S, H]) the new keys
        and values are written at cache_index and each query reads the slots <= its position,
        so stale slots past a rolled-back index are never read. mask (see `attend`) replaces
        that rule: [T, S] over cache slots with a cache, [T, T] without. With grouped-query
        attention (fewer key/value heads than query heads) the cache holds [B·N_kv, S, H]; without
        a cache each key/value head is repeated for its group of query heads just before `attend`.

        Layouts are chosen for XLA-CPU: q, k and v come from one fused dot, and the cache is
        [B·N, S, H], the shape the attention dots read, so that a step updates it in place (in
        [B, N, S, H], XLA copied the whole cache several times per step)."""
        b, t, _ = x.shape
        n, h = self.wq.shape[1:]
        kv = self.wk.shape[1]
        group = functools.partial(jnp.repeat, repeats=n // kv, axis=-3) if kv < n else lambda a: a

        fuse = self.shape.fuses(x, decoding=cache is not None)
        q, k, v = fused_projection(x, [self.wq, self.wk, self.wv], self.dtype, fuse)
        if self.shape.qkv_bias:
            q, k, v = (
                y + bias[...].astype(self.dtype).reshape(-1)
                for y, bias in zip((q, k, v), (self.bq, self.bk, self.bv), strict=True)
            )
        q, k, v = (y.reshape(b, t, -1, h).transpose(0, 2, 1, 3) for y in (q, k, v))  # [B, N or N_kv, T, H]
        freq = rope_frequencies(self.shape)
        q, k = rope(q, positions, freq), rope(k, positions, freq)
        settings = dict(implementation=self.implementation, block_size=self.block_size)
        if cache is None:
            same = positions[:, None]  # one array for queries and keys: attention.splash relies on it
            out = attend(q, group(k), group(v), same, same, mask, **settings)
        else:
            # Query head j reads key/value head j // g. Its group's g query heads are stacked
            # as g·T queries of that key/value head, [B·N_kv, g·T, H], so the attention dots read
            # the cache as it is instead of a copy repeated per query head.
            g = n // kv
            q, k, v = q.reshape(b * kv, g * t, h), k.reshape(b * kv, t, h), v.reshape(b * kv, t, h)
            k = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), cache_index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), cache_index, axis=1)
            cache = {"k": k, "v": v}
            out = attend(
                q,
                k.astype(q.dtype),
                v.astype(q.dtype),
                jnp.repeat(jnp.tile(positions, (1, g)), kv, axis=0),
                jnp.arange(k.shape[1]),
                None if mask is None else jnp.tile(mask, (g, 1)),
                **settings,
            )
            out = out.reshape(b, n, t, h)
        out = out.transpose(0, 2, 1, 3).reshape(b, t, n * h)
        return out @ self.wo[...].astype(self.dtype).reshape(n * h, -1), cache


class MLP(nnx.Module):
    """Gated (SwiGLU) MLP."""

    def __init__(self, shape: ModelShape, *, rngs: nnx.Rngs):
        d, m, pd = shape.d_model, shape.mlp_dim, jnp.dtype(shape.param_dtype)
        self.w_gate = normal_param(rngs, (d, m), ("embed", "mlp"), pd, 0.02)
        self.w_up = normal_param(rngs, (d, m), ("embed", "mlp"), pd, 0.02)
        self.w_down = normal_param(rngs, (m, d), ("mlp", "embed"), pd, 0.02 / math.sqrt(2 * shape.n_layers))
        self.shape, self.dtype = shape, jnp.dtype(shape.dtype)

    def __call__(self, x: Array, decoding: bool = False) -> Array:
        gate, up = fused_projection(x, [self.w_gate, self.w_up], self.dtype, self.shape.fuses(x, decoding))
        return (jax.nn.silu(gate) * up) @ self.w_down[...].astype(self.dtype)


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(self, shape: ModelShape, *, rngs: nnx.Rngs):
        pd = jnp.dtype(shape.param_dtype)
        self.attn_norm = RMSNorm(shape.d_model, param_dtype=pd, eps=shape.norm_eps)
        self.attn = Attention(shape, rngs=rngs)
        self.mlp_norm = RMSNorm(shape.d_model, param_dtype=pd, eps=shape.norm_eps)
        self.mlp = MLP(shape, rngs=rngs)

    def __call__(
        self,
        x: Array,
        positions: Array,
        cache: dict | None = None,
        cache_index: Array | None = None,
        mask: Array | None = None,
    ) -> tuple[Array, dict | None]:
        attn_out, cache = self.attn(self.attn_norm(x), positions, cache, cache_index, mask)
        x = x + attn_out
        return x + self.mlp(self.mlp_norm(x), decoding=cache is not None), cache


def stack_modules(modules: list[nnx.Module]) -> nnx.Module:
    """Modules of one structure as one module whose parameters carry a leading [len(modules)]
    axis, with the logical axis name 'layers' (which sharding maps to no mesh axis)."""
    state = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(m) for m in modules])
    for variable in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        variable.set_metadata(axes=("layers", *variable.get_metadata()["axes"]))
    return nnx.merge(nnx.graphdef(modules[0]), state)


class Decoder(nnx.Module):
    """Token embedding, `n_layers` blocks, final norm and unembedding (tied or not).

    With stacked_layers = L > 0 (model.scan_layers) the first L blocks are one `layer_stack`
    whose parameters have a leading [L] axis, run as one lax.scan: the program holds one block
    however deep the model is. `blocks` then holds the others, layer L + i at index i. Both
    layouts draw the same initial parameters from the same seed (`stack_layers` converts)."""

    def __init__(self, shape: ModelShape, *, rngs: nnx.Rngs, stacked_layers: int = 0):
        pd = jnp.dtype(shape.param_dtype)
        self.shape, self.n_stacked = shape, stacked_layers
        self.embedding = normal_param(rngs, (shape.vocab_size, shape.d_model), ("vocab", "embed"), pd, 0.02)
        blocks = [Block(shape, rngs=rngs) for _ in range(shape.n_layers)]
        if stacked_layers:
            self.layer_stack = stack_modules(blocks[:stacked_layers])
        self.blocks = nnx.List(blocks[stacked_layers:])
        self.final_norm = RMSNorm(shape.d_model, param_dtype=pd, eps=shape.norm_eps)
        if not shape.tie_embeddings:
            self.unembedding = normal_param(rngs, (shape.d_model, shape.vocab_size), ("embed", "vocab"), pd, 0.02)

    def embed(self, tokens: Array) -> Array:
        """tokens: [B, T] int → [B, T, D] in the compute dtype."""
        return jnp.take(self.embedding[...], tokens, axis=0).astype(self.shape.dtype)

    def unembedding_matrix(self, ids: Array | None = None) -> Array:
        """[D, V] in the compute dtype; given token ids [K], only their columns [D, K], gathered
        before anything else so that a step reads K rows, not the whole matrix."""
        if self.shape.tie_embeddings:
            w = (self.embedding[...] if ids is None else jnp.take(self.embedding[...], ids, axis=0)).T
        else:
            w = self.unembedding[...] if ids is None else jnp.take(self.unembedding[...], ids, axis=1)
        return w.astype(self.shape.dtype)

    def unembed_argmax(self, x: Array) -> Array:
        """The greedy token ids [...] after hidden states x [..., D] (final norm applied): the
        first argmax of x @ unembedding_matrix(), as jnp.argmax gives it. For a verify pass's few
        rows and a tied embedding (stored a row per token), the dot leaves the vocabulary as its
        output's leading axis, and the argmax is a max then the first index reaching it: on
        XLA-CPU both run 1.5-2x faster than a [rows, V] dot and argmax's variadic reduction
        (benchmarks/NOTES.md §16); for one row or many the plain form is faster."""
        rows = math.prod(x.shape[:-1])
        if not (self.shape.tie_embeddings and 1 < rows <= 32):
            return jnp.argmax(jnp.dot(x, self.unembedding_matrix(), preferred_element_type=jnp.float32), axis=-1)
        w = self.embedding[...].astype(self.shape.dtype)
        logits = jnp.einsum("vd,...d->v...", w, x, preferred_element_type=jnp.float32)  # [V, ...]
        index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 0)
        return jnp.min(jnp.where(logits == jnp.max(logits, axis=0), index, logits.shape[0]), axis=0)

    def block(self, layer: int) -> Block:
        """The block of one layer that is not in the stack."""
        if layer < self.n_stacked:
            raise ValueError(f"layer {layer} is one of the {self.n_stacked} stacked layers: run it with run_blocks")
        return self.blocks[layer - self.n_stacked]

    def stack_caches(self, caches: list) -> list:
        """One cache per layer → the list run_blocks takes: the stacked layers' caches as one
        entry with a leading [L] axis, then one per remaining layer."""
        if not self.n_stacked:
            return caches
        return [jax.tree.map(lambda *c: jnp.stack(c), *caches[: self.n_stacked]), *caches[self.n_stacked :]]

    def cache_entries(self, layers: range) -> int:
        """How many entries of the cache list run_blocks(layers) reads."""
        return len(layers) - self.n_stacked + 1 if self.n_stacked else len(layers)

    def run_blocks(
        self,
        x: Array,
        positions: Array,
        layers: range,
        caches: list | None = None,
        cache_index: Array | None = None,
        mask: Array | None = None,
    ) -> tuple[Array, list | None]:
        """Apply blocks[layers] in order; caches (cache_entries(layers) of them, see stack_caches)
        are threaded through. With stacked layers, `layers` must start with all of them."""
        caches = None if caches is None else list(caches)
        new_caches = []
        if self.n_stacked:
            if layers[: self.n_stacked] != range(self.n_stacked):
                raise ValueError(f"layers {layers} must start with the {self.n_stacked} stacked layers")
            x, cache = self._run_stack(x, positions, None if caches is None else caches.pop(0), cache_index, mask)
            new_caches.append(cache)
            layers = layers[self.n_stacked :]
        if caches is None and self.shape.remat:
            # Keep only each block's input for the backward pass: activation memory O(layers), not
            # O(layers x block internals), for one extra forward pass of the trunk.
            apply = nnx.remat(lambda block, x: block(x, positions)[0])
            for layer in layers:
                x = apply(self.block(layer), x)
            return x, None
        for i, layer in enumerate(layers):
            x, cache = self.block(layer)(x, positions, None if caches is None else caches[i], cache_index, mask)
            new_caches.append(cache)
        return x, (None if caches is None else new_caches)

    def _run_stack(
        self, x: Array, positions: Array, cache: dict | None, cache_index: Array | None, mask: Array | None = None
    ):
        """The stacked layers as one scan; cache (or None) holds their caches stacked [L, ...]."""
        graphdef, params = nnx.split(self.layer_stack)

        def layer(x, params_and_cache):
            params, cache = params_and_cache
            return nnx.merge(graphdef, params)(x, positions, cache, cache_index, mask)

        if cache is None and self.shape.remat:
            layer = jax.checkpoint(layer)  # the loop's remat trade, inside the scan
        return jax.lax.scan(layer, x, (params, cache))


def stack_layers(params: dict, n_stacked: int) -> dict:
    """A model's parameters as a pure dict (anything holding a 'decoder' entry, e.g. Adam's
    moments too), from the loop layout to the stacked one (Decoder's stacked_layers=n_stacked).
    The stacks are NumPy arrays: an imported model is stacked in host memory (hf.read_for_training),
    not on a device that may not hold it whole."""

    def convert(tree):
        decoder = dict(tree["decoder"])
        blocks = decoder.pop("blocks")
        decoder["layer_stack"] = jax.tree.map(lambda *xs: np.stack(xs), *[blocks[i] for i in range(n_stacked)])
        if len(blocks) > n_stacked:  # an empty nnx.List has no entry in a pure dict
            decoder["blocks"] = {i - n_stacked: blocks[i] for i in range(n_stacked, len(blocks))}
        return {**tree, "decoder": decoder}

    return jax.tree.map(convert, params, is_leaf=lambda x: isinstance(x, dict) and "decoder" in x)


def unstack_layers(params: dict) -> dict:
    """The inverse of stack_layers."""

    def convert(tree):
        decoder = dict(tree["decoder"])
        stack, rest = decoder.pop("layer_stack"), decoder.get("blocks", {})
        n = len(jax.tree.leaves(stack)[0])
        blocks = {i: jax.tree.map(lambda x: x[i], stack) for i in range(n)}  # noqa: B023 (called at once)
        blocks.update({n + i: block for i, block in rest.items()})
        return {**tree, "decoder": {**decoder, "blocks": blocks}}

    return jax.tree.map(convert, params, is_leaf=lambda x: isinstance(x, dict) and "decoder" in x)
