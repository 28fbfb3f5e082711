"""The head-type registry: a head type defined here, in the test alone, trains, decodes
self-speculatively, exports and benches through the same code paths as the built-in ones."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtp_jax import bench, export, flops, heads, hf, hf_files, train
from mtp_jax import workdir as workdir_lib
from mtp_jax.config import validate
from mtp_jax.decoding import Generator
from mtp_jax.errors import UserError
from mtp_jax.model import normal_param
from mtp_jax.speculative import Tree
from tests.util import load_config, tiny_run

N = 3


class Residual(heads.HeadType):
    """Head k >= 2 (a Medusa head): the trunk's output plus one residual SiLU layer [D, D], then the
    shared final norm and unembedding."""

    name = "residual"

    def init(self, shape, rngs):
        return normal_param(
            rngs, (shape.d_model, shape.d_model), ("merge", "embed"), jnp.dtype(shape.param_dtype), 0.02
        )

    def hidden(self, model, k, h_trunk, h_prev, next_tokens, positions, cache=None, cache_index=None, mask=None):
        if k == 1:
            return h_trunk, cache
        return h_trunk + jax.nn.silu(h_trunk @ model.heads[k - 2][...].astype(h_trunk.dtype)), cache

    def hf_rows(self, i, n_layers, layer):
        return [(f"medusa_heads.{i}.weight", ("heads", i), "linear")]

    def other_flops(self, d):
        return 2 * d * d


@pytest.fixture
def residual(monkeypatch):
    """The residual head type, registered for one test only."""
    monkeypatch.setitem(heads.HEAD_TYPES, Residual.name, Residual())


def config_for(corpus_dir, **overrides):
    return load_config(
        "mtp3",
        overrides={
            "mtp_n_tokens": N,
            "mtp_head_type": "residual",
            "num_train_steps": 12,
            "log_every": 4,
            "eval_every": 12,
            "checkpoint_every": 12,
            **tiny_run(corpus_dir / "corpus.txt", corpus_dir / "cache"),
            **overrides,
        },
    )


def params_of(model) -> dict:
    return jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def test_a_head_type_defined_in_a_test_trains_decodes_exports_and_benches(residual, code_corpus, tmp_path):
    config, workdir = config_for(code_corpus), tmp_path / "run"

    train.run(config, workdir)
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [row for row in logged if "train/loss_2" in row]
    for k in range(2, N + 1):  # the new heads learn
        assert losses[-1][f"train/loss_{k}"] < losses[0][f"train/loss_{k}"] - 0.3, (k, losses[0], losses[-1])

    trained = workdir_lib.load(workdir)
    model = trained.model
    assert [tuple(p.shape) for p in model.heads] == [(64, 64)] * (N - 1)  # tiny's d_model
    prompt = trained.tokenizer().encode("def f1")
    generator = Generator(model, 48)
    greedy = generator.generate(prompt, 24).tokens
    chain = generator.speculative(prompt, 24)
    tree = generator.speculative(prompt, 24, tree=Tree(((0,), (1,), (0, 0), (0, 1))))
    assert chain.tokens == greedy and tree.tokens == greedy
    assert chain.forward_passes < len(greedy)  # its drafts were accepted

    out = tmp_path / "exported"
    export.main([f"--workdir={workdir}", f"--out={out}"])
    mtp = json.loads((out / hf_files.MTP_FILE).read_text())
    assert mtp["mtp_head_type"] == "residual" and mtp["heads"] == [f"medusa_heads.{i}.weight" for i in range(N - 1)]
    folder = hf.open_folder(out)
    like = params_of(model)
    back = hf.read_params(folder, like, N, "residual")
    jax.tree.map(np.testing.assert_array_equal, back, like)  # byte-exact round trip

    baseline = config.copy_and_resolve_references()
    baseline.use_mtp = False
    d, vocab, tokens = model.decoder.shape.d_model, model.decoder.shape.vocab_size, config.batch_size * config.seq_len
    extra = flops.model_flops(config, vocab) - flops.model_flops(baseline, vocab)
    assert extra == 3.0 * (N - 1) * (2 * d * d + 2 * d * vocab) * tokens  # forward and backward of each extra head
    result = bench.bench_config(config, compile_only=True, steps=0, warmup=0, peak=None)
    assert result["name"] == f"tiny residual n={N}"
    assert result["params"] == sum(math.prod(x.shape) for x in jax.tree.leaves(like))
    assert result["flops_per_step"] >= result["model_flops_per_step"]


def test_an_unknown_head_type_is_refused_at_the_config_check():
    config = load_config("mtp3", overrides={"mtp_head_type": "residual"})  # not registered outside its test
    with pytest.raises(UserError, match="mtp_head_type='residual' is unknown: choose one of linear, parallel"):
        validate(config)
