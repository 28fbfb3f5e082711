"""The PyTorch reference used by benchmarks/compare.py computes the same model and loss as mtp_jax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtp_jax.heads import HEAD_TYPES
from mtp_jax.model import ModelShape
from mtp_jax.mtp import MTPModel, mtp_loss

torch = pytest.importorskip("torch")
torch_reference = pytest.importorskip("benchmarks.torch_reference")


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_torch_reference_loads_jax_params_and_gives_the_same_losses(head_type, tie):
    shape = ModelShape(vocab_size=67, d_model=32, n_layers=3, n_heads=4, mlp_dim=48, tie_embeddings=tie)
    n, weights = 3, (1.0, 0.2, 0.1)
    model = MTPModel(shape, n, head_type, rngs=nnx.Rngs(params=1))
    window = np.random.default_rng(2).integers(0, shape.vocab_size, (2, 16 + n))
    total, metrics = mtp_loss(model, jnp.asarray(window, jnp.int32), weights)

    reference = torch_reference.MTPModel(shape, n, head_type, weights)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    torch_reference.load_jax_params(reference, params)  # strict: every name matched on both sides
    assert sum(p.numel() for p in reference.parameters()) == sum(x.size for x in jax.tree.leaves(params))
    with torch.no_grad():
        ref_total, ref_losses = reference(torch.from_numpy(window))
    np.testing.assert_allclose(
        [float(x) for x in ref_losses], [float(metrics[f"loss_{k}"]) for k in range(1, n + 1)], rtol=1e-4
    )
    np.testing.assert_allclose(float(ref_total), float(total), rtol=1e-4)
