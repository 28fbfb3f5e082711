"""Probes of what a model learnt from code, on the held-out Python files of its corpus: the
induction probe (copying renamed identifiers) and the sample parse rate (sampled continuations
that compile).

Both read the validation split of the run's corpus (data's split by file, so never a training
file) and are pure functions of the model and the corpus (fixed seeds, fixed files), so two
checkpoints are compared on the same problems. evaluate.Evaluator runs them at every evaluation
when `induction_batches` / `parse_rate_prompts` are > 0; `python -m mtp_jax.evaluate` runs them
on any checkpoint.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import functools
import io
import keyword
import pathlib
import string
import tokenize
import warnings
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtp_jax import data as data_lib
from mtp_jax.decoding import Generator
from mtp_jax.errors import UserError

PROBE_SEED = 0  # which files, names and prompts the probes use: fixed, so every checkpoint sees the same


# ---------------------------------------------------------------------------------------------
# Held-out Python files
# ---------------------------------------------------------------------------------------------


def validation_python_files(data_cfg) -> list[tuple[pathlib.Path, str]]:
    """(path, text) of the validation split's Python files that parse, in a fixed shuffled order.

    The split is data.py's own (same source, val_fraction and split_seed), so these are exactly
    the files the model was validated on and never trained on."""
    source = str(data_cfg.source)
    if source.startswith("task:"):  # generated task data (tasks.py): no files
        return []
    resolved = data_lib.resolve_source(source)
    if resolved.kind != "files":
        return []
    _, val = data_lib.split_documents(resolved, float(data_cfg.val_fraction), int(data_cfg.split_seed))
    files = []
    for i in np.random.default_rng(PROBE_SEED).permutation(len(val)):
        path = val[i]
        text = data_lib.read_text(path) if path.suffix == ".py" else None
        if text and parses(text):
            files.append((path, text))
    return files


def parses(source: str) -> bool:
    """Whether `source` compiles as a Python module (`compile(..., 'exec')`: the parser plus the
    compiler's own checks, e.g. `return` outside a function; warnings are not errors)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            compile(source, "<probe>", "exec", dont_inherit=True)
        except (SyntaxError, ValueError, MemoryError, RecursionError):
            return False
    return True


# ---------------------------------------------------------------------------------------------
# Induction probe: identifiers renamed to random names, accuracy on copying them
# ---------------------------------------------------------------------------------------------


_RESERVED = set(keyword.kwlist) | set(keyword.softkwlist) | set(dir(builtins)) | {"self", "cls"}


def renameable_names(source: str) -> set[str]:
    """The file's own identifiers: NAME tokens that can be renamed consistently within the file
    without changing what it means, as far as tokens tell.

    Kept as they are: keywords and soft keywords, builtins, `self`/`cls` (conventions the model
    may rely on), dunder names, every name that appears after a '.' anywhere in the file
    (attributes and methods, which objects from other modules may share), every name in an
    import statement (module and imported names must exist elsewhere), the methods and attributes
    a class body defines (callers and frameworks find them by name), names before '=' inside
    brackets (keyword arguments of functions that may live elsewhere), and names inside f-strings
    (a STRING token in Python < 3.12, where they could not be renamed with the rest)."""
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    names, kept = set(), set(_RESERVED)
    depth, in_import, previous = 0, False, None
    for i, tok in enumerate(tokens):
        if tok.type == tokenize.NEWLINE:  # the logical line ends (NL may end a line inside brackets)
            in_import = False
        if tok.type == tokenize.OP:
            depth += tok.string in "([{"
            depth -= tok.string in ")]}"
        if tok.type == tokenize.NAME:
            if tok.string in ("import", "from") and (
                previous is None
                or previous.type in (tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT)
                or previous.string == ";"
            ):
                in_import = True
            following = tokens[i + 1] if i + 1 < len(tokens) else None
            if (
                in_import
                or (previous is not None and previous.string == ".")
                or (depth > 0 and following is not None and following.string == "=")
                or (tok.string.startswith("__") and tok.string.endswith("__"))
            ):
                kept.add(tok.string)
            else:
                names.add(tok.string)
        if tok.type not in (tokenize.NL, tokenize.COMMENT):
            previous = tok
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.JoinedStr):
            kept |= {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
        if isinstance(node, ast.ClassDef):  # methods and class attributes are attributes too
            for member in node.body:
                if isinstance(member, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    kept.add(member.name)
                targets = (
                    member.targets
                    if isinstance(member, ast.Assign)
                    else [member.target]
                    if isinstance(member, ast.AnnAssign)
                    else []
                )
                kept |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names - kept


def random_names(count: int, taken: set[str], tokenizer, rng: np.random.Generator) -> list[str]:
    """`count` distinct random lowercase names of 5 to 8 letters, none in `taken`, each at least
    2 tokens long under `tokenizer` both alone and after a space (where BPE merges the space)."""
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choice(list(string.ascii_lowercase), size=int(rng.integers(5, 9))))
        if name in taken or name in names or min(len(tokenizer.encode(name)), len(tokenizer.encode(" " + name))) < 2:
            continue
        names.append(name)
    return names


@dataclasses.dataclass(frozen=True)
class Renamed:
    source: str  # the file with its identifiers renamed
    mapping: dict[str, str]  # old name -> new name
    spans: list[tuple[int, int, str]]  # (start, end) character offsets of each renamed occurrence, new name


def rename_identifiers(source: str, tokenizer, seed: int) -> Renamed:
    """Rename every identifier of renameable_names(source) to a random name, the same new name at
    every occurrence; a pure function of (source, tokenizer, seed)."""
    rng = np.random.default_rng(seed)
    old = sorted(renameable_names(source))
    taken = {tok.string for tok in tokenize.generate_tokens(io.StringIO(source).readline)} | _RESERVED
    mapping = dict(zip(old, random_names(len(old), taken, tokenizer, rng)))
    line_starts = np.cumsum([0] + [len(line) for line in source.splitlines(keepends=True)])
    pieces, spans, cursor, shift = [], [], 0, 0
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and tok.string in mapping:
            start = int(line_starts[tok.start[0] - 1]) + tok.start[1]
            new = mapping[tok.string]
            pieces += [source[cursor:start], new]
            cursor = start + len(tok.string)
            spans.append((start + shift, start + shift + len(new), new))
            shift += len(new) - len(tok.string)
    pieces.append(source[cursor:])
    return Renamed("".join(pieces), mapping, spans)


def copy_targets(token_starts: np.ndarray, spans: list[tuple[int, int, str]]) -> np.ndarray:
    """Indices of the tokens scored by the induction probe, given where each token starts
    (character offsets, ascending) and the renamed occurrences in order.

    A name's first occurrence is not scored; at each later one, every token that starts inside
    the name except its first is (the first token is the model's choice of which name; the rest
    is copying what followed that token before)."""
    seen, targets = set(), []
    for start, end, name in spans:
        if name in seen:
            first = np.searchsorted(token_starts, start, side="right") - 1  # the token holding the name's start
            targets.extend(range(first + 1, np.searchsorted(token_starts, end)))
        seen.add(name)
    return np.asarray(targets, np.int64)


def encode_with_starts(tokenizer, text: str) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [N] of `text` and the character offset where each token starts [N]."""
    if isinstance(tokenizer, data_lib.BpeTokenizer):
        ids, starts = tokenizer.encode_with_starts(text)
        return np.asarray(ids, np.int64), np.asarray(starts, np.int64)
    raw = text.encode("utf-8")
    # Byte i starts inside the character whose first byte is the last one at or before i.
    char_of_byte = np.cumsum([(b & 0xC0) != 0x80 for b in raw]) - 1
    return np.frombuffer(raw, np.uint8).astype(np.int64), char_of_byte.astype(np.int64)


@dataclasses.dataclass(frozen=True)
class InductionSet:
    windows: np.ndarray  # [W, T + 1] int32 renamed validation code
    scored: np.ndarray  # [W, T] bool: whether head 1's prediction at position t (of token t + 1) counts


def induction_set(files: list[tuple[pathlib.Path, str]], tokenizer, *, seq_len: int, num_windows: int) -> InductionSet:
    """`num_windows` windows of seq_len + 1 tokens cut from the renamed files, one after another.

    A window starts at a file's beginning (and a long file gives several consecutive windows), so
    a name is scored only where its earlier occurrence lies inside the same window: in context."""
    windows, scored = [], []
    for index, (_, text) in enumerate(files):
        renamed = rename_identifiers(text, tokenizer, seed=PROBE_SEED * 1_000_003 + index)
        ids, starts = encode_with_starts(tokenizer, renamed.source)
        for begin in range(0, len(ids) - seq_len, seq_len + 1):
            end = begin + seq_len + 1
            stop = starts[end] if end < len(ids) else len(renamed.source)  # where the window's text ends
            inside = [span for span in renamed.spans if starts[begin] <= span[0] and span[1] <= stop]
            mask = np.zeros(seq_len + 1, bool)
            mask[copy_targets(starts[begin:end], inside)] = True
            windows.append(ids[begin:end])
            scored.append(mask[1:])  # target token t + 1 is predicted at position t
            if len(windows) == num_windows:
                return InductionSet(np.stack(windows).astype(np.int32), np.stack(scored))
    raise UserError(
        f"the validation split's Python files hold {len(windows)} windows of {seq_len + 1} tokens, "
        f"fewer than the {num_windows} the induction probe asks for: lower it"
    )


@functools.partial(jax.jit, static_argnums=(0, 1))
def head1_copy_hits(graphdef, chunk_size: int, params, window, scored):
    """(correct, scored) counts of head 1's greedy predictions at the scored positions.

    window: [B, T + 1], scored: [B, T]."""
    model = nnx.merge(graphdef, params)
    t = window.shape[1] - 1
    (h,) = model.hidden_states(window, t, heads=1)
    correct = model.greedy(1, h, chunk_size) == window[:, 1:]
    return jnp.sum(correct & scored), jnp.sum(scored)


def induction_accuracy(
    graphdef, params, probe_set: InductionSet, *, batch_size: int, chunk_size: int = 0, to_device=jnp.asarray
) -> float:
    """Head 1's accuracy on the copied tokens of renamed identifiers, batch_size windows at a time.

    to_device(rows) puts one batch of host rows on the devices (training: its sharded global batch)."""
    counts = [
        head1_copy_hits(
            graphdef,
            chunk_size,
            params,
            to_device(probe_set.windows[i : i + batch_size]),
            to_device(probe_set.scored[i : i + batch_size]),
        )
        for i in range(0, len(probe_set.windows), batch_size)
    ]
    hits, total = np.sum(jax.device_get(counts), axis=0)
    return float(hits) / max(int(total), 1)


# ---------------------------------------------------------------------------------------------
# Sample parse rate: sampled continuations of held-out code that compile, beside the truth's
# ---------------------------------------------------------------------------------------------


def cut_at_line(text: str) -> str:
    """text up to and including its last newline ('' when it holds no complete line)."""
    return text[: text.rfind("\n") + 1]


def continuation_parses(prefix: str, continuation: str) -> bool:
    """Whether prefix + the continuation's complete lines compile; a continuation without one
    complete line does not count as parsing."""
    lines = cut_at_line(continuation)
    return bool(lines) and parses(prefix + lines)


def parse_share(prefixes: list[str], continuations: list[str]) -> float:
    """The share of continuations that parse after their prefixes (continuation_parses)."""
    return float(np.mean([continuation_parses(p, c) for p, c in zip(prefixes, continuations, strict=True)]))


@dataclasses.dataclass(frozen=True)
class ParsePrompt:
    prefix: str  # the file up to a top-level statement: complete Python, what the parse check prepends
    prompt: list[int]  # its last tokens, what the model is given
    truth: str  # the file's next new_tokens tokens, decoded


def parse_prompts(
    files: list[tuple[pathlib.Path, str]], tokenizer, *, num_prompts: int, prompt_tokens: int, new_tokens: int
) -> list[ParsePrompt]:
    """One prompt per file (files in their fixed order) ending at a top-level statement, chosen at
    random among those whose true continuation, cut at a line boundary, compiles after the prefix
    (so a perfect model would score 1: the ceiling is high by construction) and that leave
    prompt_tokens tokens before and new_tokens after."""
    rng = np.random.default_rng(PROBE_SEED)
    prompts = []
    for _path, text in files:
        lines = text.splitlines(keepends=True)
        starts = [
            min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            for node in ast.parse(text).body
        ]
        for line in rng.permutation(starts):
            prefix, rest = "".join(lines[: line - 1]), "".join(lines[line - 1 :])
            prompt, following = tokenizer.encode(prefix), tokenizer.encode(rest)
            if len(prompt) < prompt_tokens or len(following) < new_tokens:
                continue
            truth = tokenizer.decode(following[:new_tokens])
            if continuation_parses(prefix, truth):
                prompts.append(ParsePrompt(prefix, prompt[-prompt_tokens:], truth))
                break
        if len(prompts) == num_prompts:
            return prompts
    raise UserError(
        f"the validation split's Python files give {len(prompts)} parse-rate prompts of "
        f"{prompt_tokens} + {new_tokens} tokens, fewer than the {num_prompts} asked for: lower the "
        "number of prompts or the tokens per sample"
    )


def parse_rate(
    generator: Generator, prompts: list[ParsePrompt], tokenizer, *, new_tokens: int, temperature: float = 0.8
) -> dict:
    """Sample a continuation of each prompt (seed i for prompt i) with `generator` (a cache of at
    least prompt + new_tokens positions) and report the share that compiles after the prefix once
    cut at a line boundary, the same share for the true continuations (the ceiling), and how
    repetitive samples and truth are (zlib ratio, compression_ratio: lower is more repetitive;
    the mean over prompts)."""
    samples = [
        tokenizer.decode(generator.generate(p.prompt, new_tokens, temperature, seed=i).tokens)
        for i, p in enumerate(prompts)
    ]
    prefixes = [p.prefix for p in prompts]
    return {
        "parse_rate": parse_share(prefixes, samples),
        "parse_rate_ceiling": parse_share(prefixes, [p.truth for p in prompts]),
        "zlib_ratio": float(np.mean([compression_ratio(s) for s in samples])),
        "zlib_ratio_truth": float(np.mean([compression_ratio(p.truth) for p in prompts])),
    }


def compression_ratio(text: str) -> float:
    """zlib-compressed size / raw size of the UTF-8 text: low for repetitive text."""
    raw = text.encode("utf-8")
    return len(zlib.compress(raw, 9)) / max(len(raw), 1)


# ---------------------------------------------------------------------------------------------
# Inputs from a config's probe fields
# ---------------------------------------------------------------------------------------------


def induction_inputs(config, files, tokenizer) -> InductionSet:
    """induction_batches x batch_size windows of seq_len + 1 tokens."""
    return induction_set(
        files, tokenizer, seq_len=config.seq_len, num_windows=config.induction_batches * config.batch_size
    )


def parse_rate_inputs(config, files, tokenizer) -> list[ParsePrompt]:
    """parse_rate_prompts prompts of seq_len - parse_rate_tokens tokens (a decoding cache of
    seq_len positions holds prompt and sample)."""
    return parse_prompts(
        files,
        tokenizer,
        num_prompts=config.parse_rate_prompts,
        prompt_tokens=config.seq_len - config.parse_rate_tokens,
        new_tokens=config.parse_rate_tokens,
    )


def python_files(data_cfg, probe: str) -> list[tuple[pathlib.Path, str]]:
    """validation_python_files, refusing a corpus without any (`probe` names who asks)."""
    files = validation_python_files(data_cfg)
    if not files:
        raise UserError(
            f"the {probe} probe needs Python files in the validation split, and data.source="
            f"{data_cfg.source!r} has none: use it on a model trained on 'stdlib' or on .py files"
        )
    return files
