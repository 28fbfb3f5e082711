"""Compiling for TPU topologies from this machine (mtp_jax/tpu.py, mtp_jax/hlo.py, mtp_jax.bench --topology).

The HLO reading, the names and the roofline are tested everywhere; the compiles run where libtpu
imports (`pip install -e '.[tpu]'`) and are skipped otherwise."""

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtp_jax import flops, hlo, sharding, tpu, tpu_decode, tpu_plan
from mtp_jax.errors import UserError
from tests.util import load_config

ROOT = Path(__file__).resolve().parents[1]
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed (pip install -e '.[tpu]')"
)

# A while loop of 12 trips (lax.scan's lowering) around an all-gather over 4 devices, and in the
# entry an asynchronous two-result all-reduce over pairs and a reduce-scatter over groups of 4.
HLO = """\
HloModule jit_train_step, entry_computation_layout={()->()}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%body (p: (s32[], bf16[1024,768])) -> (s32[], bf16[1024,768]) {
  %p = (s32[], bf16[1024,768]) parameter(0)
  %w = bf16[256,768]{1,0:T(8,128)(2,1)} get-tuple-element(%p), index=1
  %all-gather.3 = bf16[1024,768]{1,0:T(8,128)(2,1)} all-gather(%w), channel_id=1, replica_groups=mesh['axis_0'=2,'axis_1'=4,'axis_2'=1] {'axis_1'}, dimensions={0}, metadata={op_name="jit(train_step)/while/body/all_gather"}
  ROOT %t = (s32[], bf16[1024,768]) tuple(%i, %all-gather.3)
}

%cond (c: (s32[], bf16[1024,768])) -> pred[] {
  %c = (s32[], bf16[1024,768]) parameter(0)
  %constant.7 = s32[]{:T(128)} constant(12)
  %i = s32[]{:T(128)} get-tuple-element(%c), index=0
  ROOT %lt = pred[]{:T(512)} compare(%i, %constant.7), direction=LT
}

ENTRY %main (a: f32[1000], b: f32[24]) -> f32[250] {
  %a = f32[1000]{0} parameter(0)
  %b = f32[24]{0} parameter(1)
  %loop = (s32[], bf16[1024,768]) while(%init), condition=%cond, body=%body
  %all-reduce-start.1 = (f32[1000]{0}, f32[24]{0}) all-reduce-start(%a, %b), channel_id=2, replica_groups={{0,1},{2,3},{4,5},{6,7}}, to_apply=%add
  %all-reduce-done.1 = (f32[1000]{0}, f32[24]{0}) all-reduce-done(%all-reduce-start.1)
  ROOT %reduce-scatter.2 = f32[250]{0} reduce-scatter(%a), channel_id=3, replica_groups=[2,4]<=[8], dimensions={0}, to_apply=%add
}
"""


def test_collective_bytes_follow_the_ring_algorithm_and_loop_trip_counts():
    found = {c.op: c for c in hlo.collectives(HLO)}
    gathered = 1024 * 768 * 2
    assert found["all-gather"].count == 12
    assert found["all-gather"].bytes == 12 * gathered * 3 / 4
    assert found["all-reduce"].bytes == 2 * (1000 + 24) * 4 * 1 / 2
    assert found["reduce-scatter"].bytes == 250 * 4 * 3
    assert hlo.collective_bytes(list(found.values()))["all-to-all"] == 0


# A fusion that updates a stacked [12, 256] buffer in place at row i and also outputs -x, and a
# prefetch of x into on-chip memory (S(1)).
IN_PLACE_HLO = """\
HloModule jit_step, entry_computation_layout={()->()}

%fused (p0: f32[12,256], p1: f32[256], p2: s32[]) -> (f32[12,256], f32[256]) {
  %p0 = f32[12,256]{1,0} parameter(0)
  %p1 = f32[256]{0} parameter(1)
  %p2 = s32[] parameter(2)
  %zero = s32[] constant(0)
  %row = f32[1,256]{1,0} bitcast(%p1)
  %dus = f32[12,256]{1,0} dynamic-update-slice(%p0, %row, %p2, %zero)
  %neg = f32[256]{0} negate(%p1)
  ROOT %t = (f32[12,256]{1,0}, f32[256]{0}) tuple(%dus, %neg)
}

ENTRY %main (a: f32[12,256], x: f32[256], i: s32[]) -> f32[256] {
  %a = f32[12,256]{1,0} parameter(0)
  %x = f32[256]{0} parameter(1)
  %i = s32[] parameter(2)
  %f = (f32[12,256]{1,0}, f32[256]{0}) fusion(%a, %x, %i), kind=kLoop, calls=%fused
  %cs = (f32[256]{0:S(1)}, f32[256]{0}, u32[]{:S(2)}) copy-start(%x)
  ROOT %cd = f32[256]{0:S(1)} copy-done(%cs)
}
"""


def test_hbm_traffic_counts_in_place_updates_as_the_update_and_on_chip_buffers_as_nothing():
    row = 256 * 4
    # The fusion reads x and i (not the buffer it updates) and writes one row and -x; the prefetch
    # reads x from HBM and writes on the chip.
    assert hlo.hbm_traffic(IN_PLACE_HLO) == (row + 4) + (row + row) + row


def test_accelerator_types_name_their_topologies_and_unknown_names_list_the_known_ones():
    assert tpu.topology_name("v5p-128") == "v5p:4x4x4"  # v5p counts TensorCores, two per chip
    assert tpu.topology_name("v5e-256") == "v5e:16x16"
    assert tpu.topology_name("v4:4x4x8") == "v4:4x4x8"
    for bad in ("v5e:4x4x4", "v7:2x2", "tpu"):
        with pytest.raises(UserError, match=r"unknown topology.*v5e-\{1,4,.*,256\}"):
            tpu.topology_name(bad)


def test_roofline_floor_is_the_slowest_resource_with_collective_latency_added_to_the_ici():
    chip = tpu.CHIPS["v5p"]
    r = tpu.roofline(chip, flops=459e12, hbm_bytes=2765e9 / 2, ici_bytes=600e9)
    assert r["compute_s"] == pytest.approx(1.0) and r["hbm_s"] == pytest.approx(0.5)
    assert r["ici_s"] == pytest.approx(1.0)  # 600 GB over half the 1200 GB/s bidirectional
    assert r["step_time_floor_s"] == pytest.approx(1.0) and r["bound"] == "compute"
    r = tpu.roofline(chip, flops=459e12, hbm_bytes=0, ici_bytes=600e9, ici_latency_s=0.5)
    assert r["step_time_floor_s"] == pytest.approx(1.5) and r["bound"] == "ici"
    # 12 all-gathers over 4 devices: 2 steps each of a ring run both ways; an all-reduce over 2: 2 x 1.
    found = {c.op: c for c in hlo.collectives(HLO)}
    assert tpu.collective_latency_s(found["all-gather"]) == pytest.approx(12 * 2 * tpu.ICI_HOP_LATENCY_S)
    assert tpu.collective_latency_s(found["all-reduce"]) == pytest.approx(2 * tpu.ICI_HOP_LATENCY_S)


def test_analytic_flops_count_grouped_query_attention_and_remat():
    config = load_config("baseline")
    full = flops.model_flops(config, 256)
    config.model.n_kv_heads = config.model.n_heads // 2
    d, tokens, layers = config.model.d_model, config.batch_size * config.seq_len, config.model.n_layers
    # Keys and values at half width: 2 x d x d/2 fewer multiply-adds per token, layer and projection.
    assert full - flops.model_flops(config, 256) == 3 * 2 * 2 * d * (d // 2) * layers * tokens
    # An explicit head_dim of twice d / n_heads: q, k, v and o twice as wide, attention twice the work.
    wide = config.copy_and_resolve_references()
    wide.model.head_dim = 2 * d // config.model.n_heads
    t, kv = config.seq_len, d // 2
    per_layer_token = 2 * (2 * d * d + 2 * d * kv) + 2 * 2 * t * d
    assert flops.model_flops(wide, 256) - flops.model_flops(config, 256) == 3 * per_layer_token * layers * tokens
    # model.remat recomputes the trunk blocks' forward pass: a third of what the blocks cost a step.
    no_blocks = config.copy_and_resolve_references()
    no_blocks.model.n_layers = 0
    blocks = flops.model_flops(config, 256) - flops.model_flops(no_blocks, 256)
    without = flops.hardware_flops(config, 256, "cpu")
    config.model.remat = True
    assert flops.hardware_flops(config, 256, "cpu") - without == pytest.approx(blocks / 3)


@pytest.mark.parametrize("head_type", ["linear", "parallel", "sequential"])
def test_hardware_flops_add_each_heads_logits_once_more_for_the_rematerialised_cross_entropy(head_type):
    config = load_config("mtp4", overrides={"mtp_head_type": head_type})  # tiny: one attention block
    d, tokens = config.model.d_model, config.batch_size * config.seq_len
    extra = flops.hardware_flops(config, 256, "tpu") - flops.model_flops(config, 256)
    assert extra == 4 * 2 * d * 256 * tokens  # 4 heads' [D, V] matmul, forward once more


def test_the_1b_step_executes_more_flops_than_the_model_counts_and_attention_counts_causally_on_request():
    config = load_config("mtp4", preset="1b")  # T 2048: blockwise attention in 4 x 4 blocks of 512 on TPU
    model, hardware = flops.model_flops(config, 50_304), flops.hardware_flops(config, 50_304, "tpu")
    tokens, t, d, blocks = config.batch_size * config.seq_len, config.seq_len, config.model.d_model, 22
    logits = 4 * 2 * d * 50_304 * tokens  # 2.16e14: the heads' cross-entropy recomputed
    attention = 2 * 2 * t * d * blocks * tokens  # one forward pass of attention over the full square
    # Blockwise attention runs 10 of the 16 blocks, four times (forward, its recomputation, backward).
    assert hardware - model == pytest.approx(logits + attention * (4 * 10 / 16 - 3))
    assert model - flops.model_flops(config, 50_304, causal=True) == pytest.approx(3 * attention * (t - 1) / (2 * t))


@pytest.mark.parametrize("remat", [False, True])
@pytest.mark.parametrize("head_type", ["linear", "parallel", "sequential"])
def test_hfu_ceiling_exceeds_mfu_ceiling_when_anything_is_rematerialised(head_type, remat):
    config = load_config("mtp4", preset="1b", overrides={"mtp_head_type": head_type, "model.remat": remat})
    for hbm, ici in ((1e9, 1e9), (1e12, 1e9), (1e9, 1e12)):  # compute-, memory- and ICI-bound
        r = tpu_plan.pod_bounds(config, 50_304, tpu.CHIPS["v5p"], 64, hbm, ici, 1e-3)
        assert r["hfu_ceiling"] > r["mfu_ceiling"] > 0
        assert r["hfu_ceiling"] / r["mfu_ceiling"] == pytest.approx(
            r["hardware_flops_per_step"] / r["model_flops_per_step"]
        )
        low, high = tpu.CHIPS["v5p"].mfu_band
        assert r["expected_mfu_range"] == pytest.approx([low * r["mfu_ceiling"], high * r["mfu_ceiling"]])
        assert r["expected_step_time_s_range"][0] >= r["step_time_floor_s"]


def test_mesh_search_covers_every_factorisation_the_batch_and_the_heads_allow():
    config = load_config("baseline", preset="1b")  # batch 128, 16 heads
    meshes = tpu_plan.mesh_candidates(config, 256)
    # Tensor parallelism takes what the batch cannot (256 / 128 = 2 at least) up to the 16 heads;
    # data x fsdp is every split of the rest.
    expected = {
        (data, 256 // t // data, t)
        for t in (2, 4, 8, 16)
        for data in (1, 2, 4, 8, 16, 32, 64, 128)
        if 256 // t % data == 0
    }
    assert set(meshes) == expected and len(meshes) == len(expected) == 26
    assert all(math.prod(m) == 256 for m in meshes)


def run_bench(*args):
    return subprocess.run(
        [sys.executable, "-m", "mtp_jax.bench", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def one_error_line(proc) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return errors[0]


def test_unknown_topology_is_one_line_listing_the_known_ones():
    line = one_error_line(run_bench("--config=configs/mtp3.py:tiny", "--topology=v5x:2x2"))
    assert "unknown topology 'v5x:2x2'" in line and "v5p-{2,8," in line and "v6e-{1,4," in line


def test_missing_libtpu_names_the_extra_to_install():
    hide_libtpu = (
        "-c",
        "import runpy, sys; sys.modules['libtpu'] = None; runpy.run_module('mtp_jax.bench', run_name='__main__')",
    )
    proc = subprocess.run(
        [sys.executable, *hide_libtpu, "--config=configs/mtp3.py:tiny", "--topology=v5e:2x2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "pip install -e '.[tpu]'" in one_error_line(proc)


@pytest.fixture(scope="module")
def v5e_2x2():
    return tpu.devices("v5e:2x2")


def small(name: str, **mesh):
    """A config small enough to compile in seconds but where matmuls dominate the FLOPs."""
    config = load_config(name)
    config.model.d_model, config.model.mlp_dim = 256, 1024
    for axis, size in mesh.items():
        config.mesh[axis] = size
    return config


@needs_libtpu
def test_per_chip_parameter_bytes_are_the_parameters_over_their_shards(v5e_2x2):
    result = tpu_plan.topology_config(small("mtp4", data=1, fsdp=2, tensor=2), "v5e:2x2", v5e_2x2)
    assert result["chips"] == 4 and result["fits"]
    # float32 parameters split over fsdp x tensor = 4; only the norm scales are replicated.
    assert result["param_bytes_per_chip"] == pytest.approx(4 * result["params"] / 4, rel=0.03)
    assert result["opt_state_bytes_per_chip"] == pytest.approx(2 * result["param_bytes_per_chip"], rel=0.01)
    assert result["collective_bytes_per_chip"]["all-gather"] > 0  # fsdp gathers the weights


@needs_libtpu
def test_linear_heads_cost_more_xla_flops_than_the_baseline_by_the_analytic_ratio(v5e_2x2):
    base, mtp = (tpu_plan.topology_config(small(name, data=4), "v5e:2x2", v5e_2x2) for name in ("baseline", "mtp4"))
    analytic = mtp["model_flops_per_step"] / base["model_flops_per_step"]
    assert analytic > 1.05
    assert mtp["xla_flops_per_step"] / base["xla_flops_per_step"] == pytest.approx(analytic, rel=0.05)


@needs_libtpu
def test_too_large_a_configuration_is_refused_with_one_line_naming_what_lowers_it():
    # 64 x 2**26 x 3 MLP weights per layer, replicated on every chip (data parallel): the compiler
    # itself refuses temporaries beyond the chip, so the need is given as a floor.
    proc = run_bench(
        "--config=configs/baseline.py:tiny",
        "--topology=v5e:2x2",
        f"--config.model.mlp_dim={2**26}",
        "--config.mesh.data=4",
    )
    line = one_error_line(proc)
    needed = float(re.search(r"needs more than ([\d.]+) GiB per chip", line)[1])
    assert needed > 16 and "a v5e chip has 16 GiB" in line
    assert all(field in line for field in ("mesh.fsdp", "model.remat", "loss_chunk_size", "batch_size"))


def test_a_compiled_step_over_the_chips_memory_is_described_with_what_it_needs():
    result = {
        "name": "1b linear n=4",
        "topology": "v5e:16x16",
        "mesh": {"data": 1, "fsdp": 128, "tensor": 2},
        "bytes_per_chip": 21.5 * tpu.GiB,
        "chip_hbm_bytes": tpu.CHIPS["v5e"].hbm_bytes,
        "refused_by_compiler": False,
    }
    assert tpu_plan.too_large(result).startswith(
        "1b linear n=4 needs 21.5 GiB per chip on v5e:16x16 with mesh "
        "data=1 fsdp=128 tensor=2, and a v5e chip has 16 GiB: lower it with "
        "mesh.fsdp"
    )


@needs_libtpu
def test_a_mesh_that_splits_a_torus_axis_is_laid_out_on_the_pod():
    # 32 x 2 on v5p's 4x4x4 torus cuts one of its axes in two, which jax.make_mesh alone refuses.
    mesh = sharding.make_mesh(
        load_config(overrides={"mesh.data": 1, "mesh.fsdp": 32, "mesh.tensor": 2}).mesh, tpu.devices("v5p:4x4x4")
    )
    assert dict(mesh.shape) == {"data": 1, "fsdp": 32, "tensor": 2} and len(set(mesh.devices.flat)) == 64


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--decode=1,16"], "--decode compiles for a TPU chip: add --topology=NAME"),
        (["--topology=v5e:1x1", "--decode=1,x"], "--decode=1,x must list positive integers"),
        (["--topology=v5e:1x1", "--decode=1", "--search_mesh"], "--decode costs one chip, which has no mesh"),
    ],
)
def test_bad_decode_flags_are_one_line(flags, message):
    assert message in one_error_line(run_bench("--config=configs/mtp4.py:tiny", *flags))


@needs_libtpu
def test_a_decoding_step_reads_the_parameters_and_cache_once_and_a_verify_pass_adds_flops_not_bytes():
    """On one chip, at a full cache: plain decoding's floor is the bfloat16 parameters it uses plus
    the KV cache; a verify pass reads those and the draft heads (its cache has a few more slots),
    and each token more in a pass costs one token's matmuls (trunk and head 1) and attention."""
    config = small("mtp4")
    config.model.dtype = config.model.param_dtype = "bfloat16"
    devices = tpu.devices("v5e:1x1")
    passes = tpu_decode.decode_passes(config, [1, 16])
    assert [(name, None if tree is None else tree.size, batch) for name, tree, batch in passes] == [
        ("plain, batch 1", None, 1),
        ("plain, batch 16", None, 16),
        ("verify chain of 3", 4, 1),
        ("verify tree of 16", 17, 1),
    ]
    plain, _, chain, tree = (tpu_decode.decode_config(config, "v5e:1x1", devices, *p) for p in passes)
    m, vocab, d = config.model, flops.vocab_size(config), config.model.d_model
    # Layers, embedding and unembedding (untied), the 3 draft heads' [D, V] matrices; norms aside.
    params = 2 * (m.n_layers * (4 * d**2 + 3 * d * m.mlp_dim) + (2 + 3) * vocab * d)
    cache = m.n_layers * 2 * config.seq_len * d * 2  # keys and values, bfloat16
    heads = 2 * 3 * d * vocab  # the draft heads: plain decoding never reads them (jit drops them)
    assert not m.tie_embeddings and plain["param_bytes"] == pytest.approx(params, rel=0.02)
    assert plain["hbm_bytes"] == pytest.approx(plain["param_bytes"] - heads + cache, rel=0.02)
    assert chain["hbm_bytes"] == pytest.approx(plain["hbm_bytes"] + heads, rel=0.02)  # + 4 slots, counters
    per_token = 2 * (m.n_layers * (4 * d**2 + 3 * d * m.mlp_dim) + d * vocab) + 4 * m.n_layers * config.seq_len * d
    assert (tree["flops"] - chain["flops"]) / (17 - 4) == pytest.approx(per_token, rel=0.1)
    assert plain["bound"] == chain["bound"] == tree["bound"] == "memory"
    # Memory-bound: 17 tokens for the draft heads' bytes more.
    assert tree["step_time_floor_s"] == pytest.approx(
        plain["step_time_floor_s"] * (1 + heads / plain["hbm_bytes"]), rel=0.02
    )


def test_decoding_sizes_that_cannot_fit_a_chip_are_refused_before_anything_is_allocated():
    # 1b with n = 4 heads in float32: 6.2 GB of parameters, 0.37 GB of cache per sequence at 2048
    # positions; a batch of 10^12 would be 7 TiB of host memory for the tree's shape alone.
    line = one_error_line(run_bench("--config=configs/mtp4.py:1b", "--topology=v5e:1x1", "--decode=1000000000000"))
    assert "--decode=1000000000000: every pass needs more than a chip's 16 GiB" in line
    assert re.search(r"use batches up to \d+ and trees up to \d+", line)


@needs_libtpu
def test_decoding_sizes_past_the_chip_are_left_out_with_one_notice():
    proc = run_bench("--config=configs/mtp4.py:tiny", "--topology=v5e:1x1", "--decode=1,1000000000000", "--json")
    assert proc.returncode == 0, proc.stderr
    notices = [line for line in proc.stderr.splitlines() if line.startswith("notice: ")]
    assert len(notices) == 1 and "plain batch 1000000000000" in notices[0] and "tree of 1000000000000" in notices[0]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["pass"] for r in rows] == ["plain, batch 1", "verify chain of 3"]
    assert all("step_time_floor_s" in r and "step_time_s" not in r for r in rows)  # a bound, named as one


@needs_libtpu
def test_pod_figures_are_named_as_the_bounds_they_are():
    proc = run_bench("--config=configs/mtp4.py:tiny", "--topology=v5e:2x2", "--config.mesh.data=4", "--json")
    (row,) = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    bounds = {
        "step_time_floor_s",
        "tokens_per_sec_per_chip_ceiling",
        "mfu_ceiling",
        "hfu_ceiling",
        "expected_mfu_range",
        "expected_step_time_s_range",
        "efficiency_band_source",
    }
    assert bounds <= row.keys() and not {"step_time_s", "tokens_per_sec_per_chip", "mfu"} & row.keys()
    assert row["hfu_ceiling"] > row["mfu_ceiling"] and row["hardware_flops_per_step"] > row["model_flops_per_step"]
    assert "MaxText" in row["efficiency_band_source"]


@needs_libtpu
def test_hbm_traffic_counts_a_scanned_loop_body_as_often_as_it_runs():
    """L layers of x @ W[i] in a lax.scan over a stacked [L, D, D] weight too large for on-chip
    memory: each iteration reads its layer's weights from HBM once; x (1 MiB) stays on the chip."""
    layers, batch, d = 8, 128, 4096
    devices = tpu.devices("v5e:1x1")
    on_chip = jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.array(devices[:1]), ("chip",)), jax.sharding.PartitionSpec()
    )

    def scanned(w, x):
        return jax.lax.scan(lambda x, wi: (jnp.tanh(x @ wi), None), x, w)[0]

    args = (
        jax.ShapeDtypeStruct((layers, d, d), jnp.bfloat16, sharding=on_chip),
        jax.ShapeDtypeStruct((batch, d), jnp.bfloat16, sharding=on_chip),
    )
    compiled = jax.jit(scanned).lower(*args).compile()
    analytic = layers * d * d * 2 + 2 * batch * d * 2  # every layer's weights once, x in and out
    assert hlo.hbm_traffic(compiled.as_text()) == pytest.approx(analytic, rel=0.03)
    assert compiled.cost_analysis()["bytes accessed"] < analytic / 2  # XLA's count: the body once


def test_default_meshes_for_1b_on_v5e_256_are_the_fsdp_major_ones_and_the_fastest_fitting_is_kept(monkeypatch, capsys):
    config = load_config("mtp4", preset="1b")  # batch 128 over 256 chips: no data-parallel mesh
    assert sharding.is_default_mesh(config.mesh)
    assert tpu_plan.default_meshes(config, 256) == [(1, 128, 2), (1, 64, 4)]
    assert tpu_plan.default_meshes(config, 64) == [(64, 1, 1), (1, 64, 1), (1, 32, 2)]  # v5p-128: 64 chips
    # Floors standing in for the two compiles: both fit, 64 x 4 is faster (as bench finds for the preset).
    floors = {(1, 128, 2): 0.0689, (1, 64, 4): 0.0659}

    def compiled(c, topology, devices):
        mesh = (c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
        return {
            "name": flops.config_name(c),
            "mesh": dict(zip(sharding.MESH_AXES, mesh)),
            "fits": True,
            "step_time_floor_s": floors[mesh],
            "bytes_per_chip": 8 * tpu.GiB,
        }

    monkeypatch.setattr(tpu_plan, "topology_config", compiled)
    found = tpu_plan.train_meshes(config, "v5e:16x16", [None] * 256, search=False)
    assert found[0]["mesh"] == {"data": 1, "fsdp": 64, "tensor": 4}
    assert "uses data=1 fsdp=64 tensor=4, the fastest that fits of 2 meshes" in capsys.readouterr().err
    floors[(1, 64, 4)] = 0.05  # faster, but too large: not chosen
    monkeypatch.setattr(tpu_plan, "topology_config", lambda c, t, d: {**compiled(c, t, d), "fits": c.mesh.tensor == 2})
    assert tpu_plan.train_meshes(config, "v5e:16x16", [None] * 256, search=False)[0]["mesh"]["tensor"] == 2
