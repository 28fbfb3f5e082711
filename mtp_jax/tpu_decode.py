"""What one decoding step costs on a TPU chip, from programs compiled on this host (libtpu; no
chip attached): one plain decoding step at each batch, and one greedy verify pass of the draft
chain and of trees (`one_pass`, the bodies of decoding's device loops), each at a full KV cache,
with the roofline's floor on its time. `python -m mtp_jax.bench --topology=… --decode=…` is its
command line; tpu_plan.py plans the train step the same way.
"""

from __future__ import annotations

import json
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtp_jax import decoding, tpu
from mtp_jax.config import validate
from mtp_jax.errors import UserError
from mtp_jax.flops import config_name, vocab_size
from mtp_jax.mtp import MTPModel, build_model, n_predict
from mtp_jax.speculative import Tree
from mtp_jax.tpu_plan import PLATFORM, bytes_per_chip
from mtp_jax.train_step import memory_per_device


def decode_passes(config, sizes: list[int], tree_sizes: list[int] | None = None) -> list[tuple[str, Tree | None, int]]:
    """(name, tree or None, batch) of each decoding step to cost: plain decoding at each batch in
    `sizes`, then (a model with draft heads) the chain of its n - 1 drafts and a tree of each size
    in `tree_sizes` (default: `sizes`) above n - 1 (drafted nodes, the root excluded, as generate
    --tree_size). A tree's shape is Medusa's construction under acceptance halving with each rank:
    with linear or parallel heads a pass costs what its size costs, whatever the shape."""
    tree_sizes = sizes if tree_sizes is None else tree_sizes
    passes = [(f"plain, batch {b}", None, b) for b in sizes]
    n = n_predict(config)
    if n > 1:
        passes.append((f"verify chain of {n - 1}", Tree.chain(n - 1), 1))
        trees = [s for s in tree_sizes if s > n - 1]
        acceptance = np.tile(0.5 ** np.arange(1, max(trees, default=1) + 1), (n - 1, 1))
        passes += [(f"verify tree of {s}", Tree.build(acceptance, s), 1) for s in trees]
    return passes


def decode_floor_bytes(config) -> tuple[float, float, float, float]:
    """What any decoding step of `config` holds on its chip at least, from abstract shapes: (plain
    decoding's parameters, its KV cache per sequence and position; a verify pass's parameters (the
    draft heads too), its cache per position)."""
    model = nnx.eval_shape(lambda: build_model(config, vocab_size(config), seed=0))
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
    cache = lambda all_heads: nbytes(jax.eval_shape(lambda: decoding.init_caches(model, 1, 1, all_heads)))  # noqa: E731
    heads = nbytes(nnx.state(model.heads)) if hasattr(model, "heads") else 0.0
    params = nbytes(nnx.state(model, nnx.Param))
    return params - heads, cache(False), params, cache(True)


def fitting_decode_sizes(config, chip: tpu.Chip, sizes: list[int]) -> tuple[list[int], list[int], list[str]]:
    """The batches and tree sizes of `sizes` whose parameters and KV cache alone fit the chip, and a
    phrase for each pass left out (compiling those would only hear the compiler refuse, and
    shaping a tree of that size alone could exhaust this host's memory)."""
    plain_params, plain_cache, all_params, tree_cache = decode_floor_bytes(config)
    need = {"plain batch": lambda b: plain_params + b * config.seq_len * plain_cache}
    if n_predict(config) > 1:
        need["tree of"] = lambda size: all_params + (config.seq_len + size) * tree_cache
    fitting = {kind: [s for s in sizes if needs(s) <= chip.hbm_bytes] for kind, needs in need.items()}
    left_out = [
        f"{kind} {s} (≥ {needs(s) / tpu.GiB:.1f} GiB)"
        for kind, needs in need.items()
        for s in sizes
        if s not in fitting[kind]
    ]
    if not any(fitting.values()):
        largest_tree = int((chip.hbm_bytes - all_params) // tree_cache) - config.seq_len
        raise UserError(
            f"--decode={','.join(map(str, sizes))}: every pass needs more than a chip's "
            f"{chip.hbm_bytes / tpu.GiB:.0f} GiB for its parameters and KV cache alone ("
            + ", ".join(left_out)
            + "): use batches up to "
            + str(int((chip.hbm_bytes - plain_params) // (config.seq_len * plain_cache)))
            + (f" and trees up to {largest_tree}" if "tree of" in need else "")
        )
    return fitting["plain batch"], fitting.get("tree of", []), left_out


def one_pass(model: MTPModel, capacity: int, tree: Tree | None = None, batch: int = 1):
    """(function, abstract arguments) of one decoding step at a cache of `capacity` positions: plain
    decoding's single-token step for `batch` sequences (tree None), or one greedy verify pass of
    `tree` (the speculative loop's body). The function takes (params, state) and donates the state
    (caches included), as the device loops update it in place; decode_config compiles it for a TPU
    chip to cost one step of each kind."""
    graphdef, params = nnx.split(model)
    token = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
    index = jax.ShapeDtypeStruct((), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    if tree is None:
        caches = jax.eval_shape(lambda: decoding.init_caches(model, batch, capacity, all_heads=False))

        def plain(params, state):
            token, caches, index, key = state
            return decoding.plain_step(nnx.merge(graphdef, params), token, caches, index, 0, key, decoding.Sampling())

        return plain, (params, (token, caches, index, key))
    n = model.n_predict
    caches = jax.eval_shape(lambda: decoding.init_caches(model, 1, capacity + tree.size, all_heads=True))
    carry = decoding.Carry(
        index,
        index,
        jax.ShapeDtypeStruct((tree.size,), jnp.int32),
        jax.ShapeDtypeStruct((n - 1, model.decoder.shape.vocab_size), jnp.float32),
        caches,
        jax.ShapeDtypeStruct((capacity + tree.max_depth + 1,), jnp.int32),
        jax.ShapeDtypeStruct((capacity,), jnp.int32),
        jax.ShapeDtypeStruct((capacity, n - 1), jnp.float32),
        jax.ShapeDtypeStruct((), jnp.int32),
    )

    def verify(params, state):
        carry, length, key = state
        return decoding.verify_pass(nnx.merge(graphdef, params), tree, decoding.Sampling(), length, key, carry)

    return verify, (params, (carry, index, key))


def decode_config(config, topology: str, devices, name: str, tree: Tree | None, batch: int) -> dict:
    """Compile one decoding step (one_pass: plain, or a greedy verify pass of `tree`) for
    the first chip of `topology`, at a full cache of seq_len positions, on abstract inputs, and
    report its memory and the roofline's floor on its time (no collectives: one chip)."""
    chip, vocab = tpu.chip_of(topology), vocab_size(config)
    config = config.copy_and_resolve_references()
    config.model.scan_layers = False  # XLA's cost analysis counts a loop's body once: unrolled, it counts all
    on_chip = jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.array(devices[:1]), ("chip",)), jax.sharding.PartitionSpec()
    )
    validate(config, PLATFORM)
    model = nnx.eval_shape(lambda: build_model(config, vocab, seed=0, platform=PLATFORM))
    step, inputs = one_pass(model, config.seq_len, tree, batch)
    inputs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_chip), inputs)
    start, compiled, refused = time.perf_counter(), None, None
    try:
        with warnings.catch_warnings():  # the state's scalars (position, counters) have no buffer to reuse
            warnings.filterwarnings("ignore", "Some donated buffers were not usable")
            compiled = jax.jit(step, donate_argnums=1).lower(*inputs).compile()
    except jax.errors.JaxRuntimeError as e:
        refused = tpu.out_of_memory(str(e))
        if refused is None:
            raise
    compile_s = time.perf_counter() - start
    tokens = batch if tree is None else tree.size
    row = {
        "name": config_name(config),
        "topology": topology,
        "pass": name,
        "batch": batch,
        "tokens": tokens,
        "cache_len": config.seq_len,
        "chip_hbm_bytes": chip.hbm_bytes,
        "compile_s": compile_s,
    }
    if compiled is None:  # the compiler stops once the temporaries alone exceed the chip
        return {**row, "fits": False, "bytes_per_chip": refused, "step_time_floor_s": None}
    memory, cost = compiled.memory_analysis(), compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    needed = memory_per_device(memory)
    flops = float(cost.get("flops", 0.0))
    # HBM bytes: every argument the step uses (parameters, caches) read once, the cache's new slots
    # written in place. XLA's "bytes accessed" is not used: on TPU it also counts the weights'
    # prefetch into on-chip memory and the reads from there (4-5x the parameters for 1b).
    hbm = memory.argument_size_in_bytes
    roof = tpu.roofline(chip, flops, hbm)
    return {
        **row,
        "fits": needed <= chip.hbm_bytes,
        "bytes_per_chip": needed,
        "param_bytes": bytes_per_chip(inputs[0]),
        "flops": flops,
        "hbm_bytes": hbm,
        "xla_bytes_accessed": float(cost.get("bytes accessed", 0.0)),
        **roof,
    }


def decode_table(results: list[dict]) -> str:
    gib = lambda b: f"{b / tpu.GiB:.2f}"  # noqa: E731
    lines = [
        f"{'config':<22} {'pass':<22} {'tokens':>6} {'GiB':>6} {'fits':>4} {'GFLOP':>8} {'HBM GB':>7} "
        f"{'comp ms':>8} {'HBM ms':>7} {'pass ms ≥':>9} {'bound':>7}"
    ]
    for r in results:
        if r["step_time_floor_s"] is None:
            lines.append(
                f"{r['name']:<22} {r['pass']:<22} {r['tokens']:>6} > {gib(r['bytes_per_chip'])} GiB: "
                "refused by the compiler"
            )
            continue
        lines.append(
            f"{r['name']:<22} {r['pass']:<22} {r['tokens']:>6} {gib(r['bytes_per_chip']):>6} "
            f"{'yes' if r['fits'] else 'NO':>4} {r['flops'] / 1e9:>8.1f} {r['hbm_bytes'] / 1e9:>7.2f} "
            f"{1e3 * r['compute_s']:>8.2f} {1e3 * r['hbm_s']:>7.2f} {1e3 * r['step_time_floor_s']:>9.2f} "
            f"{r['bound']:>7}"
        )
    return "\n".join(lines)


def main_decode(config, name: str, sizes: list[int], as_json: bool) -> None:
    topology = tpu.topology_name(name)
    validate(config, PLATFORM)
    batches, tree_sizes, left_out = fitting_decode_sizes(config, tpu.chip_of(topology), sizes)
    devices = tpu.devices(topology)
    if left_out:
        print(
            f"notice: not compiled, their parameters and KV cache alone exceed the chip: {', '.join(left_out)}",
            file=sys.stderr,
        )
    results = []
    for pass_name, tree, batch in decode_passes(config, batches, tree_sizes):
        results.append(decode_config(config, topology, devices, pass_name, tree, batch))
        if as_json:
            print(json.dumps(results[-1]), flush=True)
    if not as_json:
        print(
            f"{topology}: one chip, one decoding step at a cache of {config.seq_len} positions. ≥: the roofline's "
            "floor (mtp_jax/tpu.py), HBM bytes = the parameters and caches the step reads, once"
        )
        print(decode_table(results))


def decode_sizes(values: list[str]) -> list[int]:
    try:
        sizes = [int(v) for v in values]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise UserError(
            f"--decode={','.join(values)} must list positive integers (batches and tree sizes), "
            "e.g. --decode=1,16,64,256"
        )
    return sizes
