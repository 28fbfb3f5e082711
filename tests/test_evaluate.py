"""Probes on a model (mtp_jax/probes.py, run by mtp_jax/evaluate.py): identifier renaming, which
tokens the induction probe scores and how, the parse rate, and the command line on a trained
checkpoint, which reproduces what the training run's Evaluator logged."""

import io
import json
import json.decoder
import pathlib
import shutil
import textwrap
import tokenize

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtp_jax import data as data_lib
from mtp_jax import decoding, evaluate, probes, train
from mtp_jax.errors import UserError
from mtp_jax.metrics import read_metrics
from mtp_jax.mtp import MTPModel
from tests.test_generate import SHAPE, full_forward_logits
from tests.util import load_config

SOURCE = """\
import os.path
from collections import OrderedDict as od


class Counter(Base):
    limit = 3

    def bump(self, amount=1):
        total = self.count + amount
        return total


def helper(items, key=None):
    result = od()
    for item in items:
        result[item] = os.path.join(item, f"{key}")
    counter = Counter()
    counter.bump(amount=len(result))
    return result, counter
"""


def names(source: str) -> list[str]:
    return [t.string for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.NAME]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A small byte-level BPE trained on Python code, as data.prepare builds for tokenizer='bpe'."""
    root = tmp_path_factory.mktemp("bpe")
    corpus = root / "code"
    corpus.mkdir()
    for module in (textwrap, json.decoder, tokenize):
        shutil.copy(module.__file__, corpus)
    data = data_lib.prepare(
        load_config(
            "base",
            "tiny",
            {
                "data.source": str(corpus),
                "data.tokenizer": "bpe",
                "data.vocab_size": 400,
                "data.cache_dir": str(root / "cache"),
            },
        ).data,
        show_progress=False,
    )
    return data_lib.load_tokenizer(data.directory)


def test_renaming_keeps_the_files_own_names_and_renames_the_rest():
    renamed = probes.rename_identifiers(SOURCE, data_lib.ByteTokenizer(), seed=0)
    assert set(renamed.mapping) == {"Counter", "Base", "helper", "items", "result", "item", "counter", "total"}
    # Kept: imports (os, path, join, collections, OrderedDict, od), attributes and class members
    # (count, bump, limit), keyword arguments (amount, key), f-string names (key), self, builtins.
    for name in ("os", "path", "join", "od", "count", "bump", "limit", "amount", "key", "self", "len"):
        assert name in names(renamed.source)


@pytest.mark.parametrize(
    "source",
    [SOURCE, pathlib.Path(textwrap.__file__).read_text(), pathlib.Path(json.decoder.__file__).read_text()],
    ids=["handmade", "textwrap", "json.decoder"],
)
def test_renaming_is_consistent_valid_and_deterministic(source, bpe):
    for tokenizer in (data_lib.ByteTokenizer(), bpe):
        renamed = probes.rename_identifiers(source, tokenizer, seed=1)
        assert probes.parses(renamed.source)
        # Token for token, the same old name became the same new name and nothing else moved.
        assert names(renamed.source) == [renamed.mapping.get(n, n) for n in names(source)]
        new = set(renamed.mapping.values())
        assert len(new) == len(renamed.mapping) and not new & set(names(source))
        assert tokenizer.decode(tokenizer.encode(renamed.source)) == renamed.source
        _, starts = probes.encode_with_starts(tokenizer, renamed.source)
        for start, end, name in renamed.spans:
            assert renamed.source[start:end] == name
            first = np.searchsorted(starts, start, side="right") - 1
            assert np.searchsorted(starts, end) - first >= 2, name  # >= 2 tokens where it stands
        assert probes.rename_identifiers(source, tokenizer, seed=1) == renamed
        assert probes.rename_identifiers(source, tokenizer, seed=2).mapping != renamed.mapping


def test_copy_targets_are_the_tokens_after_the_first_of_each_repeat():
    # One token per character: 'abc' at 0, 6 and 20, 'de' at 10 and 14.
    spans = [(0, 3, "abc"), (6, 9, "abc"), (10, 12, "de"), (14, 16, "de"), (20, 23, "abc")]
    assert probes.copy_targets(np.arange(30), spans).tolist() == [7, 8, 15, 21, 22]
    # BPE: the token holding a name's first letter starts at the space before it (offset 4).
    assert probes.copy_targets(np.array([0, 2, 4, 7, 9]), [(0, 4, "nm"), (5, 9, "nm")]).tolist() == [3]


def test_induction_windows_score_repeats_inside_the_window():
    """Byte tokens: the scored mask equals one recomputed from the renamed text's occurrences."""
    source = "".join(
        f"def func{i}(alpha, beta):\n    gamma = alpha + beta * {i}\n    return gamma + alpha\n\n" for i in range(6)
    )
    probe = probes.induction_set([(pathlib.Path("m.py"), source)], data_lib.ByteTokenizer(), seq_len=63, num_windows=3)
    renamed = probes.rename_identifiers(source, data_lib.ByteTokenizer(), seed=0)
    text = renamed.source.encode()
    assert probe.windows.shape == (3, 64) and probe.windows.flatten().tolist() == list(text[:192])
    for w in range(3):
        seen, expected = set(), np.zeros(63, bool)
        for start, end, name in renamed.spans:
            if 64 * w <= start and end <= 64 * (w + 1):
                if name in seen:
                    expected[start + 1 - 64 * w - 1 : end - 64 * w - 1] = True  # target j is scored at j - 1
                seen.add(name)
        np.testing.assert_array_equal(probe.scored[w], expected)
    assert probe.scored.sum() >= 10


def test_head1_copy_hits_count_head_1_argmax_at_scored_positions():
    """Against numpy argmax of the full forward pass; the window continues greedily, so the
    scored positions in the continuation are hits and those in the random prompt mostly not."""
    model = MTPModel(SHAPE, 2, "parallel", rngs=nnx.Rngs(params=3))
    prompt = np.random.default_rng(0).integers(0, 256, 20).tolist()
    window = prompt + decoding.Generator(model, 48).generate(prompt, 28).tokens  # [48]
    scored = np.zeros(47, bool)
    scored[[2, 5, 11, 19, 20, 30, 41, 46]] = True
    predicted = full_forward_logits(model, window)[:-1].argmax(-1)  # position t predicts token t + 1
    expected = int(np.sum((predicted == np.asarray(window[1:])) & scored))
    graphdef, params = nnx.split(model, nnx.Param)
    hits, total = probes.head1_copy_hits(graphdef, 16, params, jnp.asarray([window]), jnp.asarray([scored]))
    assert (int(hits), int(total)) == (expected, 8) and expected >= 4


def test_parse_share_of_good_broken_and_mixed_code():
    prefix = "import os\n\n"
    good = ["def f(x):\n    return x\n", "x = 1\ny = (", "class A:\n    pass\n\nz = A()\n"]
    broken = ["def f(x)\n    return x\n", "x = (1,\n", "return 1\n", "x = 1", "def g():\n"]
    assert probes.parse_share([prefix] * 3, good) == 1.0
    # 'return 1' parses (ast.parse) but does not compile outside a function; 'x = 1' has no complete line.
    assert probes.parse_share([prefix] * 5, broken) == 0.0
    assert probes.parse_share([prefix] * 4, [good[0], broken[0], good[1], broken[2]]) == 0.5


def test_parse_prompts_end_at_top_level_statements_with_parsing_truths():
    text = "".join(f"@decorate\ndef f{i}(x):\n    y = x * {i}\n    return y\n\n\n" for i in range(12))
    tokenizer = data_lib.ByteTokenizer()
    prompts = probes.parse_prompts(
        [(pathlib.Path(f"m{i}.py"), text) for i in range(3)], tokenizer, num_prompts=3, prompt_tokens=40, new_tokens=50
    )
    for p in prompts:
        assert text.startswith(p.prefix) and text[len(p.prefix) :].startswith("@decorate\ndef f")
        assert p.prompt == tokenizer.encode(p.prefix)[-40:]
        assert p.truth == text[len(p.prefix) : len(p.prefix) + 50]
        assert probes.continuation_parses(p.prefix, p.truth)
    with pytest.raises(UserError, match="fewer than the 4 asked for"):
        probes.parse_prompts(
            [(pathlib.Path("m.py"), text)] * 3, tokenizer, num_prompts=4, prompt_tokens=40, new_tokens=50
        )


def test_probes_need_python_files(tmp_path):
    (tmp_path / "notes.txt").write_text("plain text\n" * 100)
    config = load_config("base", "tiny", {"data.source": str(tmp_path / "notes.txt")})
    assert probes.validation_python_files(config.data) == []
    with pytest.raises(UserError, match="needs Python files in the validation split"):
        probes.python_files(config.data, "induction")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny n=2 model trained 10 steps on a few stdlib modules, with both probes at evaluation."""
    root = tmp_path_factory.mktemp("probe_run")
    corpus = root / "code"
    corpus.mkdir()
    for module in (textwrap, json.decoder, tokenize, io, pathlib, shutil):
        shutil.copy(module.__file__, corpus)
    config = load_config(
        "mtp3",
        "tiny",
        {
            "mtp_n_tokens": 2,
            "num_train_steps": 10,
            "log_every": 10,
            "eval_every": 10,
            "checkpoint_every": 10,
            "eval_batches": 1,
            "sample_tokens": 0,
            "data.source": str(corpus),
            "data.val_fraction": 0.34,
            "data.cache_dir": str(root / "cache"),
            "induction_batches": 1,
            "parse_rate_prompts": 2,
        },
    )
    workdir = root / "run"
    train.run(config, workdir)
    return workdir


def run_cli(capsys, argv) -> dict:
    evaluate.main(argv + ["--json"])
    return json.loads(capsys.readouterr().out)


def test_cli_reproduces_the_probes_logged_in_training(trained, capsys):
    """The CLI on one device gives the numbers the sharded training run logged at its last step."""
    logged = {k: v for e in read_metrics(trained) for k, v in e.items() if e["step"] == 10}
    induction = run_cli(capsys, [f"--workdir={trained}", "--probe=induction", "--induction_batches=1"])
    parse = run_cli(capsys, [f"--workdir={trained}", "--probe=parse_rate", "--parse_rate_prompts=2"])
    assert induction["induction_accuracy"] == logged["eval/induction_accuracy"]
    for key in ("parse_rate", "parse_rate_ceiling", "zlib_ratio", "zlib_ratio_truth"):
        assert parse[key] == logged[f"eval/{key}"], key
    assert parse["parse_rate_ceiling"] == 1.0 and 0 <= induction["induction_accuracy"] <= 1


def cli_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    return err


def test_cli_bad_input_is_one_line_and_exit_2(trained, tmp_path, capsys):
    assert "no checkpoint" in cli_error(capsys, [f"--workdir={tmp_path}", "--probe=induction"])
    assert "invalid choice: 'copying'" in cli_error(capsys, [f"--workdir={trained}", "--probe=copying"])
    assert "--induction_batches=0 must be >= 1" in cli_error(
        capsys, [f"--workdir={trained}", "--probe=induction", "--induction_batches=0"]
    )
    assert "below the trained seq_len=32" in cli_error(
        capsys, [f"--workdir={trained}", "--probe=parse_rate", "--parse_rate_tokens=32"]
    )
    assert "--probe" in cli_error(capsys, [f"--workdir={trained}"])
