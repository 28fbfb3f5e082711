"""Every field of an mtp_jax run, with one line each on what it means.

`--config=configs/base.py:PRESET` picks a size preset (tiny, micro, nano, nano_125m, 350m, 1b, 8b); any field
can be overridden with `--config.FIELD=VALUE` (e.g. `--config.model.d_model=512`). An unknown
field is an error. The other files in configs/ start from this one and turn MTP on or off.
"""

from typing import NamedTuple

import ml_collections


class Preset(NamedTuple):
    """A size preset: the model's shape and how long and how fast it trains."""

    d_model: int
    n_layers: int
    n_heads: int
    mlp_dim: int
    seq_len: int
    batch_size: int
    num_train_steps: int
    learning_rate: float
    tokenizer: str = "byte"
    vocab_size: int = 256
    tie_embeddings: bool = False
    n_kv_heads: int = 0  # key/value heads (grouped-query attention); 0: as many as n_heads


GPT2_BPE = dict(tokenizer="bpe", vocab_size=50_304, tie_embeddings=True)  # GPT-2's vocabulary, padded to 64

PRESETS = {
    # Seconds per run: for tests and smoke checks.
    "tiny": Preset(
        d_model=64, n_layers=2, n_heads=4, mlp_dim=128, seq_len=32, batch_size=8, num_train_steps=40, learning_rate=3e-3
    ),
    # ~3.5 M parameters on bytes: experiments that need settings x seeds on 2 CPU cores.
    "micro": Preset(
        d_model=256,
        n_layers=4,
        n_heads=4,
        mlp_dim=768,
        seq_len=256,
        batch_size=16,
        num_train_steps=300,
        learning_rate=2e-3,
    ),
    # ~10 M parameters on bytes; the default: trains in about ten minutes on 2 CPU cores.
    "nano": Preset(
        d_model=384,
        n_layers=6,
        n_heads=6,
        mlp_dim=1024,
        seq_len=256,
        batch_size=16,
        num_train_steps=300,
        learning_rate=1e-3,
    ),
    # GPT-2 small's shape.
    "nano_125m": Preset(
        d_model=768,
        n_layers=12,
        n_heads=12,
        mlp_dim=2048,
        seq_len=1024,
        batch_size=32,
        num_train_steps=20_000,
        learning_rate=6e-4,
        **GPT2_BPE,
    ),
    "350m": Preset(
        d_model=1024,
        n_layers=24,
        n_heads=16,
        mlp_dim=2816,
        seq_len=1024,
        batch_size=64,
        num_train_steps=50_000,
        learning_rate=3e-4,
        **GPT2_BPE,
    ),
    "1b": Preset(
        d_model=2048,
        n_layers=22,
        n_heads=16,
        mlp_dim=5632,
        seq_len=2048,
        batch_size=128,
        num_train_steps=100_000,
        learning_rate=2e-4,
        **GPT2_BPE,
    ),
    # Llama-3-8B's shape (grouped-query attention, untied 128K vocabulary) at T = 8192: the scale of
    # the TPU compile results (experiments/results/tpu_aot).
    "8b": Preset(
        d_model=4096,
        n_layers=32,
        n_heads=32,
        mlp_dim=14336,
        seq_len=8192,
        batch_size=256,
        num_train_steps=100_000,
        learning_rate=3e-4,
        tokenizer="bpe",
        vocab_size=128_256,
        n_kv_heads=8,
    ),
}


def get_config(arg: str = "nano") -> ml_collections.ConfigDict:
    if arg not in PRESETS:
        raise ValueError(f"unknown preset {arg!r}: choose one of {', '.join(PRESETS)}")
    p = PRESETS[arg]
    steps, vocab = p.num_train_steps, p.vocab_size
    c = ml_collections.ConfigDict()
    c.preset = arg  # which size preset this config came from (informational)

    # Multi-Token Prediction (mtp_jax/mtp.py).
    c.use_mtp = False  # False: plain next-token prediction (exactly the baseline)
    c.mtp_n_tokens = 1  # n: heads predict tokens t+1 … t+n
    c.mtp_weight = 0.2  # scale of the auxiliary heads' losses in the total
    c.mtp_loss_weights = "geometric"  # w_k: 'geometric' (0.5**(k-1)), 'uniform', 'mean', or "w2,w3,…"
    c.mtp_head_type = "linear"  # 'linear' (a Dense per head), 'parallel' (Meta), 'sequential' (DeepSeek-V3)
    c.mtp_targets = "data"  # heads k >= 2 learn 'data' (x[t+k]) or 'model' (head 1's argmax at t+k-1)
    c.mtp_draft_vocab = 0  # > 0: heads k >= 2 output only this many tokens, the most frequent (0: all)
    # Schedules, functions of the step (mtp_jax/schedules.py): mtp_weight moves to mtp_weight_final.
    c.mtp_weight_schedule = "constant"  # 'constant', 'stepped' (jump at the switch), 'linear' or 'cosine' (from it)
    c.mtp_weight_final = 0.1  # mtp_weight after the schedule (DeepSeek-V3: 0.3 -> 0.1)
    c.mtp_weight_switch = 0.7  # fraction of training where the weight jumps ('stepped') or starts to anneal
    c.mtp_curriculum = "none"  # 'forward': heads 2 … n join one by one; 'reverse': they leave one by one
    c.mtp_curriculum_fraction = 0.5  # fraction of training the curriculum's n - 1 stages take
    # Positions per cross-entropy chunk (0: the whole sequence at once). At a GPT-2 vocabulary a
    # chunk keeps MTP's temp memory within 1.03x of the baseline's (experiments/results/bench).
    c.loss_chunk_size = 256 if vocab > 4096 else 0

    # Optimisation.
    c.seq_len = p.seq_len  # T: input positions per example (windows hold T + n tokens)
    c.batch_size = p.batch_size  # global batch, in sequences, over all processes and devices
    c.num_train_steps = steps  # total optimizer steps (ignored when num_epochs > 0)
    c.num_epochs = 0  # > 0: walk all training windows this many times instead
    c.learning_rate = p.learning_rate  # peak learning rate of AdamW
    c.warmup_steps = max(steps // 20, 10)  # linear warm-up, then cosine decay to 10 % of the peak
    c.weight_decay = 0.1  # AdamW decoupled decay (not on norms or embeddings)
    c.grad_clip = 1.0  # global gradient-norm clip (0 disables)
    c.adam_b1 = 0.9  # AdamW beta 1
    c.adam_b2 = 0.95  # AdamW beta 2
    c.seed = 0  # parameter init and batch order
    c.nan_policy = "stop"  # on a non-finite loss: 'stop', or 'skip' the update and count it
    # Starting from another model (README "Heads for an existing model").
    c.trainable = "all"  # what the optimizer updates: 'all', or 'heads' (heads 2 … n; the rest frozen)
    # A Hugging Face folder (Llama, Mistral, Qwen2) or a GGUF file to start from ('': random init; a
    # resume ignores it); it sets model.* and, for text, data.tokenizer (docs/huggingface.md).
    c.init_from = ""
    c.trunk_cache = False  # trainable='heads' in epochs: run the frozen trunk once per window, keep its outputs

    # Logging, evaluation, checkpoints.
    c.log_every = max(steps // 30, 1)  # train metrics every this many steps
    c.eval_every = max(steps // 5, 1)  # validation every this many steps (and after the last)
    c.eval_batches = 8  # validation batches per evaluation (a fixed subset)
    c.checkpoint_every = max(steps // 5, 1)  # save every this many steps (and at the end)
    c.keep_checkpoints = 3  # how many recent checkpoints orbax keeps
    c.sample_prompt = "def fibonacci(n):\n"  # prompt for the sample printed at the end
    c.sample_tokens = 120  # tokens sampled at the end (0: no sample)
    # Probes at each evaluation (mtp_jax/evaluate.py), on the validation split's Python files; off
    # (0) for tiny. induction_batches costs that many forward passes of batch_size x seq_len (as
    # eval_batches does); parse_rate_prompts costs prompts x parse_rate_tokens decoding steps.
    c.induction_batches = 0 if arg == "tiny" else 2  # batches of renamed code: eval/induction_accuracy
    c.parse_rate_prompts = 0 if arg == "tiny" else 16  # sampled continuations: eval/parse_rate
    c.parse_rate_tokens = p.seq_len // 2  # tokens sampled per prompt; the prompt is the other seq_len - this

    # Model (mtp_jax/model.py).
    c.model = ml_collections.ConfigDict()
    c.model.d_model = p.d_model  # residual stream width
    c.model.n_layers = p.n_layers  # transformer blocks
    c.model.n_heads = p.n_heads  # attention heads (d_model must divide by it)
    c.model.n_kv_heads = p.n_kv_heads  # key/value heads, grouped-query attention (0: n_heads; must divide it)
    c.model.mlp_dim = p.mlp_dim  # hidden width of the gated MLP
    c.model.tie_embeddings = p.tie_embeddings  # unembedding = embedding transposed
    c.model.dtype = "float32"  # compute dtype: 'float32' or 'bfloat16'
    c.model.param_dtype = "float32"  # parameter (and optimizer state) dtype
    c.model.rope_theta = 10_000.0  # RoPE base period
    # RoPE's context extension, as Hugging Face's rope_parameters (imports set these): 'none';
    # 'linear' (frequencies / rope_factor); 'llama3' (Llama 3.1's: low frequencies / rope_factor,
    # the band between rope_original_context / rope_low_freq_factor and / rope_high_freq_factor interpolated).
    c.model.rope_scaling = "none"
    c.model.rope_factor = 1.0
    c.model.rope_low_freq_factor = 1.0
    c.model.rope_high_freq_factor = 4.0
    c.model.rope_original_context = 8192
    c.model.head_dim = 0  # size of each attention head (0: d_model / n_heads)
    c.model.qkv_bias = False  # biases on the query, key and value projections (Qwen2)
    c.model.norm_eps = 1e-6  # RMSNorm's epsilon (Llama 2/3 and SmolLM2: 1e-5; imports set it)
    c.model.remat = False  # recompute each block in the backward pass: less memory, +1 forward
    c.model.attention = "auto"  # 'auto' (best measured per backend), 'xla', 'dot_product', 'blockwise', 'splash'
    c.model.attention_block_size = 512  # queries and keys per block of 'blockwise' attention
    c.model.scan_layers = False  # trunk blocks as one scan over stacked parameters: faster compiles

    # Data (mtp_jax/data/).
    c.data = ml_collections.ConfigDict()
    c.data.source = "stdlib"  # 'stdlib' ('stdlib/email': one package; 'stdlib/email,json': two), a directory, glob, text file, .jsonl, .bin
    # 'byte' (vocab 256), 'bpe' (trained on the training split), or a model's own: the path of a
    # tokenizer.json, a folder holding one, or a .gguf file (init_from sets it).
    c.data.tokenizer = p.tokenizer
    c.data.vocab_size = vocab  # BPE vocabulary size; for a .bin, its vocab (0: read meta.json)
    c.data.token_dtype = "uint32"  # dtype of a .bin source: 'uint32' or 'uint16'
    c.data.val_fraction = 0.02  # share of files (or of a single stream's tail) held out
    c.data.split_seed = 0  # which files are held out (fixed across training seeds)
    c.data.train_extra = ""  # more training files (stdlib/PACKAGES, a directory, a glob); data.source's split stays
    c.data.cache_dir = "~/.cache/mtp_jax"  # where tokenized corpora are kept and reused
    # Token shards (llm.c format: data.source='DIR/train_*.bin') and document boundaries (docs/data.md).
    c.data.val_source = ""  # the validation shards (a glob or a .bin), required for a glob of shards
    c.data.eot_id = -1  # id ending each document (GPT-2: 50256); -1: the data's own (BPE, prepare)
    c.data.document_mask = False  # head k's targets past an end-of-text token leave its loss and accuracy
    # Synthetic tasks (data.source='task:polyarith' or 'task:pathstar'; mtp_jax/data/tasks.py, README "Tasks").
    c.data.task = ml_collections.ConfigDict()
    c.data.task.num_train = 100_000  # training problems generated (val: val_fraction as many, held out)
    c.data.task.seed = 0  # which training problems (held-out ones are fixed by data.split_seed)
    c.data.task.example_len = 0  # bytes per packed problem (0: the longest's); seq_len must be a multiple
    c.data.task.eval_problems = 32  # held-out problems per difficulty scored by eval/task_accuracy
    c.data.task.max_train_ops = 5  # polyarith: operations per training expression, m ~ U{1..this}
    c.data.task.max_eval_ops = 8  # polyarith: accuracy also measured out of domain, up to this m
    c.data.task.degree = 2  # pathstar: arms from the start node, d (chance is 1/d)
    c.data.task.arm_length = 5  # pathstar: nodes per arm, l (the answer has l + 1 nodes)
    c.data.task.num_labels = 50  # pathstar: node labels 0 … N-1, fixed width (N >= 1 + d*l)
    c.data.task.teacherless = False  # pathstar: answer inputs hidden as '$' (Bachmann & Nagarajan's baseline)

    # Device mesh (mtp_jax/sharding.py): sizes of ('data', 'fsdp', 'tensor'); -1 fills the rest. The batch
    # splits over data x fsdp; parameters follow sharding.LOGICAL_RULES (embed -> fsdp; heads, mlp,
    # vocab -> tensor), so the sizes alone pick the strategy:
    #   data parallel    mesh.data=-1 (the default)
    #   FSDP             mesh.data=1 mesh.fsdp=-1
    #   FSDP + tensor    mesh.data=1 mesh.fsdp=-1 mesh.tensor=2 (or 4, 8: within one host's chips)
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # batch split; parameters replicated along this axis
    c.mesh.fsdp = 1  # batch split, and parameters and optimizer state sharded
    c.mesh.tensor = 1  # attention heads, MLP and vocabulary split over this axis
    return c
