"""Multi-Token Prediction: the extra heads, their targets, per-head losses and loss weights.

The contract: a training window holds T + n tokens; inputs are x[:, :T]; head k
(k = 1 … n) at position t predicts x[t + k], i.e. its targets are x[:, k : T + k], so every head
sees exactly B × T targets. Head 1 is the ordinary next-token head, and with n = 1 the model's
parameters and loss are exactly the baseline's.

    total = L_1 + mtp_weight * sum_{k >= 2} w_k * L_k

Head types (what each head computes) live in heads.py.

Targets (mtp_targets): 'data', head k learns x[t + k]; 'model' (self-distillation, as in
Medusa-2 and FastMTP), head k >= 2 learns head 1's own argmax at t + k - 1, the token greedy
speculative decoding accepts there, taken from the same forward pass (model_targets).

Draft vocabulary (mtp_draft_vocab = K > 0, FR-Spec / EAGLE-3): heads 2 … n output only K token
ids, the training split's most frequent (`draft_vocab`, saved with the parameters), through
those K columns of the shared unembedding (heads.HeadType.matrix); a draft then reads [D, K]
instead of [D, V], and the other tokens get logit -inf (their targets leave the heads' losses).

Memory: each head's cross-entropy is rematerialised (and optionally chunked over positions), so
the [B, T, V] logits of a head are never kept for the backward pass and only one head's (or one
chunk's) logits exist at a time.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtp_jax import heads
from mtp_jax.errors import UserError, need
from mtp_jax.model import Decoder, ModelShape

Array = jax.Array

WEIGHT_SCHEMES = ("geometric", "uniform", "mean")
TARGETS = ("data", "model")


class TrunkOutputs(NamedTuple):
    """What a frozen trunk (and head 1) gives the heads for a window's inputs [B, T] (trunk_cache.py)."""

    hidden: Array  # [B, T, D] the trunk's final hidden state, before the final norm
    greedy: Array  # [B, T] int32 head 1's argmax at each position (the self-distillation targets)
    nll: Array  # [B, T] float32 head 1's cross-entropy against the next token (its loss, already known)


def n_predict(config) -> int:
    """How many tokens the model predicts per position (1 = plain next-token prediction)."""
    return config.mtp_n_tokens if config.use_mtp else 1


def check_config(config) -> None:
    """The MTP fields (config.validate): the number of tokens, the head type, the loss weights, the
    targets and the draft vocabulary, and the layers the head type needs."""
    need(
        config.mtp_n_tokens >= 1, f"mtp_n_tokens={config.mtp_n_tokens} must be >= 1 (1 is plain next-token prediction)"
    )
    head_type = heads.get(config.mtp_head_type)
    n = n_predict(config)
    scheme = config.mtp_loss_weights
    if scheme not in WEIGHT_SCHEMES:
        try:
            weights = [float(w) for w in scheme.split(",")]
        except ValueError:
            raise UserError(
                f"mtp_loss_weights={scheme!r} is unknown: choose one of "
                f"{', '.join(WEIGHT_SCHEMES)} or give n-1 comma-separated floats"
            ) from None
        need(
            len(weights) == n - 1 or n == 1,
            f"mtp_loss_weights={scheme!r} has {len(weights)} weights "
            f"but mtp_n_tokens={n} needs {n - 1} (one per extra head)",
        )
    need(
        config.seq_len > config.mtp_n_tokens,
        f"seq_len={config.seq_len} must exceed mtp_n_tokens={config.mtp_n_tokens}: raise seq_len or lower mtp_n_tokens",
    )
    need(
        config.mtp_targets in TARGETS,
        f"mtp_targets={config.mtp_targets!r} is unknown: choose one of {', '.join(TARGETS)}",
    )
    need(config.mtp_draft_vocab >= 0, f"mtp_draft_vocab={config.mtp_draft_vocab} must be >= 0 (0: all tokens)")
    need(
        config.mtp_draft_vocab == 0 or head_type.shares_unembedding,
        f"mtp_draft_vocab restricts the shared unembedding, which {head_type.name!r} heads do not use: choose "
        f"another mtp_head_type, or set mtp_draft_vocab=0",
    )
    need(
        config.model.n_layers >= head_type.min_layers,
        f"model.n_layers={config.model.n_layers} is too small: {head_type.name!r} heads need >= {head_type.min_layers}",
    )


def auxiliary_weights(scheme: str, n: int) -> tuple[float, ...]:
    """w_2 … w_n for a scheme name or an explicit comma-separated list of n - 1 floats."""
    if scheme == "geometric":
        return tuple(0.5 ** (k - 1) for k in range(2, n + 1))
    if scheme == "uniform":
        return (1.0,) * (n - 1)
    if scheme == "mean":
        return (1.0 / (n - 1),) * (n - 1) if n > 1 else ()
    return tuple(float(w) for w in scheme.split(",")) if n > 1 else ()


def loss_weights(config) -> tuple[float, ...]:
    """The weight of each head's loss in the total: (1, mtp_weight * w_2, …, mtp_weight * w_n)."""
    n = n_predict(config)
    return (1.0,) + tuple(config.mtp_weight * w for w in auxiliary_weights(config.mtp_loss_weights, n))


class DraftMatrix(nnx.Variable):
    """Heads 2 … n's output matrix [D, K] gathered once for decoding (MTPModel.for_decoding)."""


class MTPModel(nnx.Module):
    """The decoder plus n - 1 extra heads of one type. With n = 1 it holds exactly the decoder.

    draft_vocab = K > 0 restricts heads 2 … n to K token ids (initially 0 … K-1; training sets
    the most frequent, train.init_state)."""

    def __init__(self, shape: ModelShape, n: int, head_type: str, *, rngs: nnx.Rngs, draft_vocab: int = 0):
        self.head_type = heads.get(head_type)
        self.trunk_layers = self.head_type.trunk_layers(shape.n_layers)  # the decoder layers all heads share
        # model.scan_layers stacks the trunk's layers (not head 1's own block of 'parallel' heads).
        self.decoder = Decoder(shape, rngs=rngs, stacked_layers=len(self.trunk_layers) if shape.scan_layers else 0)
        self.n_predict = n
        if n > 1:
            self.heads = nnx.List([self.head_type.init(shape, rngs) for _ in range(2, n + 1)])
        if draft_vocab:
            if not self.head_type.shares_unembedding:
                raise UserError(
                    f"mtp_draft_vocab restricts the shared unembedding, which {head_type!r} heads do "
                    "not use: choose another mtp_head_type, or set mtp_draft_vocab=0"
                )
            self.draft_vocab = nnx.Param(jnp.arange(draft_vocab, dtype=jnp.int32), axes=("draft",))

    def trunk(self, tokens: Array, positions: Array, caches=None, cache_index=None, mask=None):
        """tokens: [B, T] → trunk hidden state [B, T, D] (and the trunk layers' caches)."""
        return self.decoder.run_blocks(
            self.decoder.embed(tokens), positions, self.trunk_layers, caches, cache_index, mask
        )

    def head_hidden(
        self,
        k: int,
        h_trunk: Array,
        h_prev: Array,
        next_tokens: Array,
        positions: Array,
        cache=None,
        cache_index=None,
        mask=None,
    ):
        """Head k's hidden state before the final norm, [B, T, D] (and its block's cache).

        h_prev is head k-1's hidden state and next_tokens is x[t + k - 1]; what reads them is the
        head type's (heads.HeadType.hidden)."""
        return self.head_type.hidden(self, k, h_trunk, h_prev, next_tokens, positions, cache, cache_index, mask)

    def hidden_states(self, tokens: Array, t: int, heads: int | None = None, h_trunk: Array | None = None):
        """Yields head k's hidden state before the final norm, [B, t, D], for k = 1 … heads (default
        n), with the true tokens as context: the trunk reads tokens[:, :t] and 'sequential' module
        k reads x[t + k - 1], tokens[:, k - 1 : t + k - 1]. tokens: [B, >= t + heads - 1].
        h_trunk, the trunk's output for tokens[:, :t] when it is known (TrunkOutputs), skips the trunk.

        A generator, so that a caller that reduces each head's state at once (the loss) keeps one
        head's activations alive at a time."""
        positions = jnp.broadcast_to(jnp.arange(t), (tokens.shape[0], t))
        if h_trunk is None:
            h_trunk, _ = self.trunk(tokens[:, :t], positions)
        h = h_trunk
        for k in range(1, (heads or self.n_predict) + 1):
            h, _ = self.head_hidden(k, h_trunk, h, tokens[:, k - 1 : t + k - 1], positions)
            yield h

    def logits(self, k: int, h: Array) -> Array:
        """Head k's float32 logits [..., V] from its hidden state [..., D] (-inf outside a draft
        vocabulary)."""
        return self.head_type.logits(self, k, h)

    def output(self, k: int, h: Array) -> tuple[Array, Array]:
        """Head k's logits over its output vocabulary as (x [..., D], w [D, V or K]): x @ w."""
        return self.head_type.output(self, k, h)

    def for_decoding(self) -> MTPModel:
        """This model (sharing its arrays) with its draft vocabulary's columns of the unembedding
        gathered once, here, as a DraftMatrix: a decoding program would gather them (9 MB for
        SmolLM2's 4096 draft tokens) at every call."""
        if self.drafts_all_tokens:
            return self
        model = nnx.merge(*nnx.split(self))
        model.draft_matrix = DraftMatrix(self.decoder.unembedding_matrix(self.draft_vocab[...]))
        return model

    @property
    def drafts_all_tokens(self) -> bool:
        """Whether heads 2 … n output every token (no draft vocabulary)."""
        return not hasattr(self, "draft_vocab")

    def trunk_outputs(self, window: Array, chunk_size: int = 0) -> TrunkOutputs:
        """The trunk's output for the inputs of window [B, T + n], and head 1's argmax and loss after
        each position, chunk_size positions at a time (as greedy)."""
        t = window.shape[1] - self.n_predict
        positions = jnp.broadcast_to(jnp.arange(t), (window.shape[0], t))
        h_trunk, _ = self.trunk(window[:, :t], positions)
        h_1, _ = self.head_hidden(1, h_trunk, h_trunk, window[:, :t], positions)

        def stats(chunk):
            h, targets = chunk
            logits = self.logits(1, h)
            target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
            return jnp.argmax(logits, axis=-1).astype(jnp.int32), jax.nn.logsumexp(logits, axis=-1) - target_logit

        greedy, nll = jax.lax.map(
            stats, (position_chunks(h_1, chunk_size), position_chunks(window[:, 1 : t + 1], chunk_size))
        )
        unchunk = lambda x: x.swapaxes(0, 1).reshape(window.shape[0], -1)[:, :t]  # noqa: E731
        return TrunkOutputs(h_trunk, unchunk(greedy), unchunk(nll))

    def greedy(self, k: int, h: Array, chunk_size: int = 0) -> Array:
        """Head k's argmax [B, T] from its hidden state [B, T, D], chunk_size positions at a time so
        that at most [B, chunk_size, V] logits exist at once (0: all positions together)."""
        b, t, _ = h.shape
        greedy = jax.lax.map(lambda x: self.head_type.top_tokens(self, k, x)[..., 0], position_chunks(h, chunk_size))
        return greedy.swapaxes(0, 1).reshape(b, -1)[:, :t]


def build_model(config, vocab_size: int, *, seed: int, platform: str | None = None) -> MTPModel:
    shape = ModelShape.from_config(config.model, vocab_size, platform)
    n = n_predict(config)
    return MTPModel(
        shape,
        n,
        config.mtp_head_type,
        rngs=nnx.Rngs(params=seed),
        draft_vocab=config.get("mtp_draft_vocab", 0) if n > 1 else 0,
    )


def draft_vocabulary(tokens, vocab_size: int, size: int, sample: int = 1 << 26) -> np.ndarray:
    """The `size` most frequent token ids [size] int32 among the first `sample` training tokens,
    ties broken by the smaller id; ascending."""
    if size > vocab_size:
        raise UserError(
            f"mtp_draft_vocab={size} exceeds the vocabulary's {vocab_size} tokens: choose a smaller "
            "draft vocabulary (0: all tokens)"
        )
    counts = np.bincount(np.asarray(tokens[:sample], np.int64), minlength=vocab_size)
    return np.sort(np.argsort(-counts, kind="stable")[:size]).astype(np.int32)


def model_targets(greedy: Array, k: int) -> Array:
    """Head k's self-distillation targets [B, T] from head 1's argmax greedy [B, T]: greedy[t + k - 1],
    or -1 (no target) where t + k - 1 lies past the window."""
    return jnp.pad(greedy[:, k - 1 :], ((0, 0), (0, k - 1)), constant_values=-1)


def position_chunks(x: Array, chunk_size: int, fill=0) -> Array:
    """x [B, T, ...] → [n_chunks, B, c, ...], c = chunk_size positions per chunk (all T when
    chunk_size is 0 or >= T), the last chunk padded with `fill`. Chunks run along positions so
    that the batch axis keeps its sharding."""
    b, t = x.shape[:2]
    c = chunk_size if 0 < chunk_size < t else t
    pad = (-t) % c
    if pad:
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2), constant_values=fill)
    return x.reshape(b, -1, c, *x.shape[2:]).swapaxes(0, 1)


@jax.checkpoint
def _chunk_stats(w: Array, h: Array, targets: Array) -> tuple[Array, Array]:
    """Sum of cross-entropies and of correct argmaxes over one chunk; targets < 0 are padding.

    Checkpointed so that the chunk's logits are recomputed in the backward pass, not stored."""
    logits = jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32)  # [B, c, V] float32
    valid = targets >= 0
    safe = jnp.maximum(targets, 0)
    target_logit = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - target_logit
    correct = jnp.argmax(logits, axis=-1) == safe
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(jnp.where(valid, correct, False), dtype=jnp.float32)


def cross_entropy(
    h: Array, w: Array, targets: Array, chunk_size: int = 0, mask: Array | None = None
) -> tuple[Array, Array]:
    """Mean cross-entropy (float32) and top-1 accuracy of logits h @ w against targets.

    h: [B, T, D], w: [D, V], targets: [B, T]. With 0 < chunk_size < T the positions are processed
    chunk_size at a time in a scan, so at most [B, chunk_size, V] logits exist at once.
    mask: [B, T], nonzero where a target counts; the means are then over those targets only."""
    b, t, _ = h.shape
    count = b * t
    if mask is not None:
        targets = jnp.where(mask > 0, targets, -1)
        count = jnp.maximum(jnp.sum(mask > 0, dtype=jnp.float32), 1.0)
    h_chunks, t_chunks = position_chunks(h, chunk_size), position_chunks(targets, chunk_size, fill=-1)

    def accumulate(totals, chunk):
        nll, correct = _chunk_stats(w, *chunk)
        return (totals[0] + nll, totals[1] + correct), None

    zero = jnp.zeros((), jnp.float32)
    (nll, correct), _ = jax.lax.scan(accumulate, (zero, zero), (h_chunks, t_chunks))
    return nll / count, correct / count


def document_mask(window: Array, eot_id: int, k: int, t: int) -> Array:
    """[B, t] bool: whether head k's target at each position p < t lies in the document of the
    position's next token, i.e. no end-of-text token is among window[:, p + 1 … p + k - 1]."""
    ends = jnp.cumsum(window == eot_id, axis=1)  # [B, T + n]: end-of-text tokens up to each position
    return ends[:, k - 1 : t + k - 1] == ends[:, :t]


def _target_mask(mask: Array | None, window: Array, eot_id: int | None, k: int, t: int) -> Array | None:
    """Head k's [B, t] target mask: a task's (mask[t + k]) and, given eot_id, document_mask."""
    head = None if mask is None else mask[:, k : t + k]
    if eot_id is None:
        return head
    same = document_mask(window, eot_id, k, t)
    return same if head is None else (head > 0) & same


def mtp_loss(
    model: MTPModel,
    window: Array,
    weights: tuple[float, ...],
    chunk_size: int = 0,
    mask: Array | None = None,
    inputs: Array | None = None,
    eot_id: int | None = None,
    targets: str = "data",
    trunk: TrunkOutputs | None = None,
):
    """window: [B, T + n] int tokens → (total loss, {'loss_k', 'accuracy_k', 'total_loss'}).

    weights: each head's weight in the total, n floats or an [n] array traced from the step.
    mask: [B, T + n], nonzero on tokens that are targets (a task's answers): head k's target at
    t is window[t + k], so its mask there is mask[t + k], and each L_k is the mean over its
    unmasked targets. inputs: [B, T + n] tokens the model reads instead of window (a task's
    teacherless variant hides the answers); the targets stay window's. eot_id: the end-of-text id
    of data.document_mask, which also drops every target in a later document (document_mask).
    targets: 'data' or 'model' (heads k >= 2 learn head 1's argmax at t + k - 1, model_targets).
    trunk: the trunk's outputs for inputs[:, :T] when known (a frozen trunk's, trunk_cache.py):
    the loss then skips the trunk and is otherwise the same."""
    t = window.shape[1] - model.n_predict
    inputs = window if inputs is None else inputs
    greedy = None if trunk is None else trunk.greedy
    total, metrics = jnp.zeros((), jnp.float32), {}
    for k, h in enumerate(model.hidden_states(inputs, t, h_trunk=None if trunk is None else trunk.hidden), 1):
        if k == 1 and targets == "model" and greedy is None:
            greedy = jax.lax.stop_gradient(model.greedy(1, h, chunk_size)).astype(jnp.int32)
        head_targets = model_targets(greedy, k) if k > 1 and targets == "model" else window[:, k : t + k]
        if k == 1 and trunk is not None:  # head 1 is frozen: its loss came with the trunk's outputs
            metrics["loss_1"], metrics["accuracy_1"] = jnp.mean(trunk.nll), jnp.mean(trunk.greedy == head_targets)
            total = total + weights[0] * metrics["loss_1"]
            continue
        head_targets = model.head_type.targets(model, k, head_targets)
        head_mask = _target_mask(mask, window, eot_id, k, t)
        if k > 1 and (targets == "model" or not model.drafts_all_tokens):  # some targets may be missing (-1)
            head_mask = (head_targets >= 0) if head_mask is None else (head_mask > 0) & (head_targets >= 0)
        loss, accuracy = cross_entropy(*model.output(k, h), head_targets, chunk_size, head_mask)
        total = total + weights[k - 1] * loss
        metrics[f"loss_{k}"], metrics[f"accuracy_{k}"] = loss, accuracy
    metrics["total_loss"] = total
    return total, metrics
