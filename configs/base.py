"""Every field of an mtp_jax run, with one line each on what it means.

`--config=configs/base.py:PRESET` picks a size preset (tiny, nano, nano_125m, 350m, 1b); any field
can be overridden with `--config.FIELD=VALUE` (e.g. `--config.model.d_model=512`). An unknown
field is an error. The other files in configs/ start from this one and turn MTP on or off.
"""

import ml_collections

# name: (d_model, n_layers, n_heads, mlp_dim, seq_len, batch_size, num_train_steps, learning_rate,
#        tokenizer, vocab_size, tie_embeddings)
PRESETS = {
    # Seconds per run: for tests and smoke checks.
    "tiny": (64, 2, 4, 128, 32, 8, 40, 3e-3, "byte", 256, False),
    # ~10 M parameters on bytes; the default: trains in about ten minutes on 2 CPU cores.
    "nano": (384, 6, 6, 1024, 256, 16, 300, 1e-3, "byte", 256, False),
    # GPT-2 small's shape, the seed's TrainConfig::nano_125m().
    "nano_125m": (768, 12, 12, 2048, 1024, 32, 20_000, 6e-4, "bpe", 50_304, True),
    "350m": (1024, 24, 16, 2816, 1024, 64, 50_000, 3e-4, "bpe", 50_304, True),
    "1b": (2048, 22, 16, 5632, 2048, 128, 100_000, 2e-4, "bpe", 50_304, True),
}


def get_config(arg: str = "nano") -> ml_collections.ConfigDict:
    if arg not in PRESETS:
        raise ValueError(f"unknown preset {arg!r}: choose one of {', '.join(PRESETS)}")
    d, layers, heads, mlp, seq_len, batch, steps, lr, tokenizer, vocab, tie = PRESETS[arg]
    c = ml_collections.ConfigDict()
    c.preset = arg                  # which size preset this config came from (informational)

    # Multi-Token Prediction (DESIGN.md §4).
    c.use_mtp = False               # False: plain next-token prediction (exactly the baseline)
    c.mtp_n_tokens = 1              # n: heads predict tokens t+1 … t+n
    c.mtp_weight = 0.2              # scale of the auxiliary heads' losses in the total
    c.mtp_loss_weights = "geometric"  # w_k: 'geometric' (0.5**(k-1)), 'uniform', 'mean', or "w2,w3,…"
    c.mtp_head_type = "linear"      # 'linear' (seed), 'parallel' (Meta), 'sequential' (DeepSeek-V3)
    # Positions per cross-entropy chunk (0: the whole sequence at once). At a GPT-2 vocabulary a
    # chunk keeps MTP's temp memory within 1.03x of the baseline's (experiments/results/bench).
    c.loss_chunk_size = 256 if vocab > 4096 else 0

    # Optimisation.
    c.seq_len = seq_len             # T: input positions per example (windows hold T + n tokens)
    c.batch_size = batch            # global batch, in sequences, over all processes and devices
    c.num_train_steps = steps       # total optimizer steps (ignored when num_epochs > 0)
    c.num_epochs = 0                # > 0: walk all training windows this many times instead
    c.learning_rate = lr            # peak learning rate of AdamW
    c.warmup_steps = max(steps // 20, 10)  # linear warm-up, then cosine decay to 10 % of the peak
    c.weight_decay = 0.1            # AdamW decoupled decay (not on norms or embeddings)
    c.grad_clip = 1.0               # global gradient-norm clip (0 disables)
    c.adam_b1 = 0.9                 # AdamW beta 1
    c.adam_b2 = 0.95                # AdamW beta 2
    c.seed = 0                      # parameter init and batch order
    c.nan_policy = "stop"           # on a non-finite loss: 'stop', or 'skip' the update and count it

    # Logging, evaluation, checkpoints.
    c.log_every = max(steps // 30, 1)   # train metrics every this many steps
    c.eval_every = max(steps // 5, 1)   # validation every this many steps (and after the last)
    c.eval_batches = 8              # validation batches per evaluation (a fixed subset)
    c.checkpoint_every = max(steps // 5, 1)  # save every this many steps (and at the end)
    c.keep_checkpoints = 3          # how many recent checkpoints orbax keeps
    c.sample_prompt = "def fibonacci(n):\n"  # prompt for the sample printed at the end
    c.sample_tokens = 120           # tokens sampled at the end (0: no sample)

    # Model (DESIGN.md §3).
    c.model = ml_collections.ConfigDict()
    c.model.d_model = d             # residual stream width
    c.model.n_layers = layers       # transformer blocks
    c.model.n_heads = heads         # attention heads (d_model must divide by it)
    c.model.mlp_dim = mlp           # hidden width of the gated MLP
    c.model.tie_embeddings = tie    # unembedding = embedding transposed
    c.model.dtype = "float32"       # compute dtype: 'float32' or 'bfloat16'
    c.model.param_dtype = "float32"  # parameter (and optimizer state) dtype
    c.model.rope_theta = 10_000.0   # RoPE base period
    c.model.remat = False           # recompute each block in the backward pass: less memory, +1 forward
    c.model.attention = "auto"      # 'auto' (best measured per backend), 'xla', 'dot_product', 'blockwise', 'splash'
    c.model.attention_block_size = 512  # queries and keys per block of 'blockwise' attention
    c.model.scan_layers = False     # trunk blocks as one scan over stacked parameters: faster compiles

    # Data (DESIGN.md §5).
    c.data = ml_collections.ConfigDict()
    c.data.source = "stdlib"        # 'stdlib', a directory, glob, text file, .jsonl, or a .bin token file
    c.data.tokenizer = tokenizer    # 'byte' (vocab 256) or 'bpe' (trained on the training split)
    c.data.vocab_size = vocab       # BPE vocabulary size; for a .bin, its vocab (0: read meta.json)
    c.data.token_dtype = "uint32"   # dtype of a .bin source: 'uint32' (as the seed writes) or 'uint16'
    c.data.val_fraction = 0.02      # share of files (or of a single stream's tail) held out
    c.data.split_seed = 0           # which files are held out (fixed across training seeds)
    c.data.cache_dir = "~/.cache/mtp_jax"  # where tokenized corpora are kept and reused

    # Device mesh (DESIGN.md §3): sizes of ('data', 'fsdp', 'tensor'); -1 fills the rest. The batch
    # splits over data x fsdp; parameters follow sharding.LOGICAL_RULES (embed -> fsdp; heads, mlp,
    # vocab -> tensor), so the sizes alone pick the strategy:
    #   data parallel    mesh.data=-1 (the default)
    #   FSDP             mesh.data=1 mesh.fsdp=-1
    #   FSDP + tensor    mesh.data=1 mesh.fsdp=-1 mesh.tensor=2 (or 4, 8: within one host's chips)
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1                # batch split; parameters replicated along this axis
    c.mesh.fsdp = 1                 # batch split, and parameters and optimizer state sharded
    c.mesh.tensor = 1               # attention heads, MLP and vocabulary split over this axis
    return c
