"""The mtp_jax model and MTP loss in plain PyTorch, written as a user would, for comparison only.

Same shapes, parameter names and count as mtp_jax.mtp.MTPModel (RMSNorm, RoPE attention, SwiGLU
MLP, linear | parallel | sequential | medusa heads, float32 cross-entropy, the same loss weights), so
`load_jax_params` copies a JAX parameter tree in by name and the two losses agree. Runs eager or
under `torch.compile`. Needs the `bench` extra (torch).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.scale.float()).to(x.dtype)


def rope(x, theta: float):
    """x: [B, T, N, H]; positions 0 … T-1; rotate the two halves of the head dimension."""
    t, half = x.shape[1], x.shape[-1] // 2
    freq = theta ** (-torch.arange(half, dtype=torch.float32) / half)
    angle = torch.arange(t, dtype=torch.float32)[:, None] * freq  # [T, H/2]
    sin, cos = angle.sin()[None, :, None, :], angle.cos()[None, :, None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, d: int, n_heads: int, theta: float):
        super().__init__()
        h = d // n_heads
        self.wq, self.wk, self.wv = (nn.Parameter(torch.empty(d, n_heads, h)) for _ in range(3))
        self.wo = nn.Parameter(torch.empty(n_heads, h, d))
        self.theta = theta

    def forward(self, x):
        q = rope(torch.einsum("btd,dnh->btnh", x, self.wq), self.theta)
        k = rope(torch.einsum("btd,dnh->btnh", x, self.wk), self.theta)
        v = torch.einsum("btd,dnh->btnh", x, self.wv)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return torch.einsum("bnth,nhd->btd", out, self.wo)


class MLP(nn.Module):
    def __init__(self, d: int, m: int):
        super().__init__()
        self.w_gate, self.w_up = nn.Parameter(torch.empty(d, m)), nn.Parameter(torch.empty(d, m))
        self.w_down = nn.Parameter(torch.empty(m, d))

    def forward(self, x):
        return (F.silu(x @ self.w_gate) * (x @ self.w_up)) @ self.w_down


class Block(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.attn_norm, self.mlp_norm = RMSNorm(shape.d_model), RMSNorm(shape.d_model)
        self.attn = Attention(shape.d_model, shape.n_heads, shape.rope_theta)
        self.mlp = MLP(shape.d_model, shape.mlp_dim)

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Decoder(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.tie = shape.tie_embeddings
        self.embedding = nn.Parameter(torch.empty(shape.vocab_size, shape.d_model))
        self.blocks = nn.ModuleList(Block(shape) for _ in range(shape.n_layers))
        self.final_norm = RMSNorm(shape.d_model)
        if not self.tie:
            self.unembedding = nn.Parameter(torch.empty(shape.d_model, shape.vocab_size))

    def unembedding_matrix(self):
        return self.embedding.T if self.tie else self.unembedding


class SequentialModule(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.hidden_norm, self.embed_norm = RMSNorm(shape.d_model), RMSNorm(shape.d_model)
        self.merge = nn.Parameter(torch.empty(2 * shape.d_model, shape.d_model))
        self.block = Block(shape)

    def forward(self, h_prev, next_embedding):
        return self.block(torch.cat([self.hidden_norm(h_prev), self.embed_norm(next_embedding)], -1) @ self.merge)


class MedusaBlock(nn.Module):
    """Medusa's residual block, applied after the final norm: u + SiLU(u W + b)."""

    def __init__(self, shape):
        super().__init__()
        self.w = nn.Parameter(torch.empty(shape.d_model, shape.d_model))
        self.b = nn.Parameter(torch.empty(shape.d_model))

    def forward(self, u):
        return u + F.silu(u @ self.w + self.b)


def linear_head(model, k, h_trunk, h_prev, next_tokens):
    """Head k's (hidden state, output matrix): the trunk's output through its own matrix."""
    return h_trunk, model.heads[k - 2] if k > 1 else model.decoder.unembedding_matrix()


def parallel_head(model, k, h_trunk, h_prev, next_tokens):
    """One block on the trunk's output (head 1's: the decoder's last layer), the shared matrix."""
    block = model.decoder.blocks[-1] if k == 1 else model.heads[k - 2]
    return block(h_trunk), model.decoder.unembedding_matrix()


def sequential_head(model, k, h_trunk, h_prev, next_tokens):
    """DeepSeek-V3's module k on head k-1's state and the next token's embedding, the shared matrix."""
    h = h_trunk if k == 1 else model.heads[k - 2](h_prev, model.decoder.embedding[next_tokens])
    return h, model.decoder.unembedding_matrix()


def medusa_head(model, k, h_trunk, h_prev, next_tokens):
    """The trunk's output and the shared matrix; head k's residual block acts after the final norm."""
    return h_trunk, model.decoder.unembedding_matrix()


# mtp_head_type -> (one extra head's parameters, decoder layers left to head 1, head k's function)
HEADS = {
    "linear": (lambda shape: nn.Parameter(torch.empty(shape.d_model, shape.vocab_size)), 0, linear_head),
    "parallel": (Block, 1, parallel_head),
    "sequential": (SequentialModule, 0, sequential_head),
    "medusa": (MedusaBlock, 0, medusa_head),
}


class MTPModel(nn.Module):
    """The decoder plus n - 1 heads of one type; `forward(window)` returns (total loss, per-head losses)."""

    def __init__(self, shape, n: int, head_type: str, weights: tuple[float, ...]):
        super().__init__()
        self.decoder = Decoder(shape)
        self.n, self.weights = n, weights
        make, self.head_layers, self.head = HEADS[head_type]
        if n > 1:
            extra = [make(shape) for _ in range(n - 1)]
            self.heads = nn.ParameterList(extra) if isinstance(extra[0], nn.Parameter) else nn.ModuleList(extra)

    def forward(self, window):
        n, dec = self.n, self.decoder
        t = window.shape[1] - n
        h_trunk = dec.embedding[window[:, :t]]
        for block in dec.blocks[: len(dec.blocks) - self.head_layers]:
            h_trunk = block(h_trunk)
        h, total, losses = h_trunk, 0.0, []
        for k in range(1, n + 1):
            h, w = self.head(self, k, h_trunk, h, window[:, k - 1 : t + k - 1])
            x = dec.final_norm(h)
            if k > 1 and isinstance(self.heads[k - 2], MedusaBlock):
                x = self.heads[k - 2](x)
            logits = (x @ w).float()  # [B, T, V]
            loss = F.cross_entropy(logits.flatten(0, 1), window[:, k : t + k].flatten())
            total = total + self.weights[k - 1] * loss
            losses.append(loss)
        return total, losses


def from_config(config, vocab_size: int) -> MTPModel:
    """A model shaped like mtp_jax's build_model(config, vocab_size), parameters uninitialised."""
    from mtp_jax.model import ModelShape
    from mtp_jax.mtp import loss_weights, n_predict

    shape = ModelShape.from_config(config.model, vocab_size)
    return MTPModel(shape, n_predict(config), config.mtp_head_type, loss_weights(config))


def load_jax_params(model: MTPModel, params: dict) -> None:
    """Copy a JAX parameter tree (nnx.to_pure_dict of MTPModel's parameters) in by name; every
    parameter on both sides must be matched."""
    flat = {}

    def walk(tree, prefix):
        for key, value in tree.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, name + ".")
            else:
                flat[name] = torch.from_numpy(np.array(value, np.float32))

    walk(params, "")
    model.load_state_dict(flat, strict=True)


def init_like_jax(model: MTPModel, seed: int = 0) -> None:
    """Random parameters at the same scale as mtp_jax's initialisation (for timing only)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("scale"):
                p.fill_(1.0)
            else:
                p.normal_(
                    0.0,
                    0.02 / (math.sqrt(2 * len(model.decoder.blocks)) if name.endswith(("wo", "w_down")) else 1.0),
                    generator=gen,
                )
