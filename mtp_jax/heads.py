"""Head types: what an MTP head of each kind is, behind one registry (`mtp_head_type` names one).

A head type is a class that says, for head k (k = 1 … n; head 1 is the next-token head):
  parameters       `init`: the parameters of one extra head k >= 2 (stored at heads[k - 2])
  hidden state     `hidden`: head k's hidden state before the final norm, from the trunk's
                   output (and for chained heads, head k-1's state and the next token)
  output matrix    `features`: what the matrix reads (default: the final norm of the hidden state);
                   `matrix`: [D, V] projection (default: the unembedding, restricted to the
                   model's draft vocabulary for k >= 2); `targets` and `logits` map that smaller
                   output to token ids
  own block        `has_block`: whether head k runs attention, and so keeps a KV cache of its own
  drafting rule    `reads_previous_draft`: whether head k + 1 reads head k's tokens
  HF tensor names  `hf_rows`: where an extra head's tensors go in a Hugging Face folder (hf.py)
  FLOPs            `blocks_per_head`, `output_flops`, `other_flops`: one extra head's forward
                   matmuls per position (flops.py counts the blocks' attention and which part
                   the backward pass recomputes)
The model (mtp.MTPModel), the decoding engine, hf.py, bench.py and config.py ask the head type
and never compare its name. A new head type is one subclass decorated with `@register`.

Built in:
  'linear'     (Stern et al. 2018) head k >= 2 is its own Dense(d_model -> vocab) on the trunk's
                                   final normed hidden state.
  'parallel'   (Meta, 2404.19737)  the trunk is the first n_layers - 1 blocks; head k is one more
                                   block on the trunk output (head 1's is the model's last layer),
                                   then the shared final norm and unembedding.
  'sequential' (DeepSeek-V3)       h_k = Block_k(M_k [RMSNorm(h_{k-1}); RMSNorm(Emb(x[t+k-1]))]),
                                   shared embedding, final norm and unembedding; h_1 = trunk output.
  'medusa'     (Cai et al. 2024)   u = FinalNorm(h_trunk); head k projects u + SiLU(u W_k + b_k) with
                                   the shared unembedding (W_k, b_k start at zero: a fresh head
                                   repeats head 1's prediction).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from mtp_jax.errors import UserError
from mtp_jax.model import Block, ModelShape, RMSNorm, normal_param

Array = jax.Array
# hf.py's rows of one decoder layer: (HF name prefix, path of the Block in our tree) -> rows.
LayerRows = Callable[[str, tuple], list]

HEAD_TYPES: dict[str, HeadType] = {}  # name -> the head type (one instance per class)


def register(cls: type[HeadType]) -> type[HeadType]:
    """Class decorator: make `cls` choosable as mtp_head_type=cls.name."""
    HEAD_TYPES[cls.name] = cls()
    return cls


def get(name: str) -> HeadType:
    """The head type mtp_head_type names; a UserError naming the choices for any other name."""
    if name not in HEAD_TYPES:
        raise UserError(f"mtp_head_type={name!r} is unknown: choose one of {', '.join(HEAD_TYPES)}")
    return HEAD_TYPES[name]


class HeadType:
    """The defaults describe a head that reads the trunk's output and projects it with the shared
    unembedding: head 1 is always such a head. Subclasses override what their extra heads do."""

    name: ClassVar[str]
    min_layers: ClassVar[int] = 1  # the fewest decoder layers the head type can be built on
    reads_previous_draft: ClassVar[bool] = False  # head k + 1's input is head k's token at every position
    blocks_per_head: ClassVar[int] = 0  # decoder blocks one extra head runs (FLOPs as the trunk's)
    shares_unembedding: ClassVar[bool] = True  # extra heads project with it (so a draft vocabulary can restrict it)

    def trunk_layers(self, n_layers: int) -> range:
        """The decoder layers shared by all heads."""
        return range(n_layers)

    def init(self, shape: ModelShape, rngs: nnx.Rngs):
        """The parameters of one extra head (an nnx.Module or nnx.Param)."""
        raise NotImplementedError

    def hidden(
        self,
        model,
        k: int,
        h_trunk: Array,
        h_prev: Array,
        next_tokens: Array,
        positions: Array,
        cache=None,
        cache_index=None,
        mask=None,
    ):
        """Head k's hidden state before the final norm, [B, T, D], and its block's cache.

        h_prev is head k-1's hidden state and next_tokens is x[t + k - 1] (at decoding, the token
        committed or drafted after each position)."""
        return h_trunk, cache

    def has_block(self, k: int) -> bool:
        """Whether head k owns an attention block (and so a KV cache of its own)."""
        return False

    def features(self, model, k: int, h: Array) -> Array:
        """What head k's output matrix reads [..., D], from its hidden state [..., D]."""
        return model.decoder.final_norm(h)

    def matrix(self, model, k: int) -> Array:
        """Head k's output projection [D, V'] in the compute dtype: V' = V, or for k >= 2 the
        columns of the model's draft vocabulary (then `targets` and `logits` map between the two),
        gathered already in a model prepared for decoding (MTPModel.for_decoding)."""
        if k > 1 and hasattr(model, "draft_matrix"):
            return model.draft_matrix[...]
        return model.decoder.unembedding_matrix(None if k == 1 or model.drafts_all_tokens else model.draft_vocab[...])

    def targets(self, model, k: int, targets: Array) -> Array:
        """Head k's training targets [B, T] as indices into its output (-1: outside it, no loss)."""
        if k == 1 or model.drafts_all_tokens:
            return targets
        column = jnp.full((model.decoder.shape.vocab_size,), -1, jnp.int32)
        column = column.at[model.draft_vocab[...]].set(jnp.arange(model.draft_vocab.shape[0], dtype=jnp.int32))
        return jnp.where(targets >= 0, column[jnp.maximum(targets, 0)], -1)

    def output(self, model, k: int, h: Array) -> tuple[Array, Array]:
        """Head k's logits over its output as (x [..., D], w [D, V']): x @ w, from its hidden state
        [..., D]; the loss takes them apart to chunk and rematerialise the product."""
        return self.features(model, k, h), self.matrix(model, k)

    def logits(self, model, k: int, h: Array) -> Array:
        """Head k's float32 logits over the whole vocabulary [..., V] from its hidden state
        [..., D]: what decoding, drafting and acceptance read (-inf outside a draft vocabulary)."""
        logits = jnp.dot(*self.output(model, k, h), preferred_element_type=jnp.float32)
        if k == 1 or model.drafts_all_tokens:
            return logits
        full = jnp.full(logits.shape[:-1] + (model.decoder.shape.vocab_size,), -jnp.inf, logits.dtype)
        return full.at[..., model.draft_vocab[...]].set(logits)

    def top_tokens(self, model, k: int, h: Array, ranks: int = 1) -> Array:
        """Head k's `ranks` most likely tokens [..., ranks], best first, from its hidden states
        [..., D]: found among its output's columns (a draft vocabulary's K, not the V that
        `logits` spreads them over), so that drafting ranks K logits, not V."""
        if k == 1 and ranks == 1:  # head 1's output is the decoder's unembedding for every head type
            return model.decoder.unembed_argmax(self.features(model, 1, h))[..., None].astype(jnp.int32)
        logits = jnp.dot(*self.output(model, k, h), preferred_element_type=jnp.float32)
        best = jnp.argmax(logits, axis=-1)[..., None] if ranks == 1 else jax.lax.top_k(logits, ranks)[1]
        return (best if k == 1 or model.drafts_all_tokens else model.draft_vocab[...][best]).astype(jnp.int32)

    def hf_rows(self, i: int, n_layers: int, layer: LayerRows) -> list:
        """[(HF tensor name, path in our parameter tree, layout)] of extra head i = k - 2 (hf.py)."""
        raise NotImplementedError

    def output_flops(self, d: int, vocab: int) -> int:
        """Forward FLOPs per position of one extra head's logits (recomputed in the backward pass:
        the cross-entropy is rematerialised)."""
        return 2 * d * vocab

    def other_flops(self, d: int) -> int:
        """Forward FLOPs per position of one extra head's matmuls besides its blocks and logits."""
        return 0


@register
class Linear(HeadType):
    name = "linear"
    shares_unembedding = False

    def init(self, shape, rngs):
        return normal_param(
            rngs, (shape.d_model, shape.vocab_size), ("embed", "vocab"), jnp.dtype(shape.param_dtype), 0.02
        )

    def matrix(self, model, k):
        if k == 1:
            return super().matrix(model, k)
        return model.heads[k - 2][...].astype(model.decoder.shape.dtype)

    def hf_rows(self, i, n_layers, layer):
        return [(f"extra_heads.{i}.weight", ("heads", i), "linear")]  # Meta's multi-token models' name


@register
class Parallel(HeadType):
    name = "parallel"
    min_layers = 2  # the last layer is head 1's own block
    blocks_per_head = 1

    def trunk_layers(self, n_layers):
        return range(n_layers - 1)

    def init(self, shape, rngs):
        return Block(shape, rngs=rngs)

    def hidden(self, model, k, h_trunk, h_prev, next_tokens, positions, cache=None, cache_index=None, mask=None):
        block = model.decoder.block(model.decoder.shape.n_layers - 1) if k == 1 else model.heads[k - 2]
        return block(h_trunk, positions, cache, cache_index, mask)

    def has_block(self, k):
        return True

    def hf_rows(self, i, n_layers, layer):
        return layer(f"extra_heads.{i}", ("heads", i))


class SequentialModule(nnx.Module):
    """DeepSeek-V3's MTP module: merge the previous depth's hidden state with the embedding of
    the token one step ahead, then one transformer block."""

    def __init__(self, shape: ModelShape, *, rngs: nnx.Rngs):
        pd = jnp.dtype(shape.param_dtype)
        self.hidden_norm = RMSNorm(shape.d_model, param_dtype=pd, eps=shape.norm_eps)
        self.embed_norm = RMSNorm(shape.d_model, param_dtype=pd, eps=shape.norm_eps)
        self.merge = normal_param(rngs, (2 * shape.d_model, shape.d_model), ("merge", "embed"), pd, 0.02)
        self.block = Block(shape, rngs=rngs)
        self.dtype = jnp.dtype(shape.dtype)

    def __call__(self, h_prev: Array, next_embedding: Array, positions: Array, cache=None, cache_index=None, mask=None):
        x = jnp.concatenate([self.hidden_norm(h_prev), self.embed_norm(next_embedding)], axis=-1)
        return self.block(x @ self.merge[...].astype(self.dtype), positions, cache, cache_index, mask)


@register
class Sequential(HeadType):
    name = "sequential"
    reads_previous_draft = True  # module k + 1 reads x[t + k], which at decoding is module k's draft
    blocks_per_head = 1

    def init(self, shape, rngs):
        return SequentialModule(shape, rngs=rngs)

    def hidden(self, model, k, h_trunk, h_prev, next_tokens, positions, cache=None, cache_index=None, mask=None):
        if k == 1:
            return h_trunk, cache
        return model.heads[k - 2](h_prev, model.decoder.embed(next_tokens), positions, cache, cache_index, mask)

    def has_block(self, k):
        return k > 1

    def hf_rows(self, i, n_layers, layer):
        # DeepSeek-V3's MTP modules, numbered after the decoder's layers.
        prefix = f"model.layers.{n_layers + i}"
        return [
            (f"{prefix}.enorm.weight", ("heads", i, "embed_norm", "scale"), "same"),
            (f"{prefix}.hnorm.weight", ("heads", i, "hidden_norm", "scale"), "same"),
            (f"{prefix}.eh_proj.weight", ("heads", i, "merge"), "merge"),
        ] + layer(prefix, ("heads", i, "block"))

    def other_flops(self, d):
        return 2 * 2 * d * d  # the merge M_k: 2d -> d


class MedusaBlock(nnx.Module):
    """Medusa's residual block on the normalised hidden state u: u + SiLU(u W + b). W and b start at
    zero, so a fresh head predicts what head 1 does and training moves it from there."""

    def __init__(self, shape: ModelShape, *, rngs: nnx.Rngs):
        pd, d = jnp.dtype(shape.param_dtype), shape.d_model
        self.w = nnx.Param(jnp.zeros((d, d), pd), axes=("merge", "embed"))
        self.b = nnx.Param(jnp.zeros((d,), pd), axes=("norm",))
        self.dtype = jnp.dtype(shape.dtype)

    def __call__(self, u: Array) -> Array:
        return u + jax.nn.silu(u @ self.w[...].astype(self.dtype) + self.b[...].astype(self.dtype))


@register
class Medusa(HeadType):
    name = "medusa"

    def init(self, shape, rngs):
        return MedusaBlock(shape, rngs=rngs)

    def features(self, model, k, h):
        u = super().features(model, k, h)
        return u if k == 1 else model.heads[k - 2](u)

    def hf_rows(self, i, n_layers, layer):
        return [
            (f"extra_heads.{i}.linear.weight", ("heads", i, "w"), "linear"),  # Medusa's ResBlock names
            (f"extra_heads.{i}.linear.bias", ("heads", i, "b"), "same"),
        ]

    def other_flops(self, d):
        return 2 * d * d  # the residual block's W
