"""prepare's throughput with 1 and with N tokenizing processes, side by side.

    python benchmarks/prepare_throughput.py [--mb=24] [--workers=1,2] [--repeats=3]

writes --mb MB of the Python standard library's source as JSONL (one document per file) and an
8192-id BPE learned from its first 2,000 files into a temporary folder, then runs the whole
`python -m mtp_jax.prepare` command for each --workers value in turn, --repeats rounds
interleaved, and prints each run's wall time, the median MB/s of text per worker count, its
ratio to the first, and whether every run wrote the same shards. One JSON line at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import platform
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mtp_jax.data import tokenizer as tokenizer_lib  # noqa: E402  (after the repository root is on the path)


def write_corpus(path: pathlib.Path, megabytes: float) -> tuple[int, list[str]]:
    """The standard library's .py files as JSONL up to `megabytes`: (bytes of text, texts)."""
    texts, total = [], 0
    for file in sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            text = file.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        total += len(text.encode("utf-8"))
        if total >= megabytes * 1e6:
            break
    with path.open("w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    return total, texts


def shards_digest(out: pathlib.Path) -> str:
    h = hashlib.sha256()
    for shard in sorted(out.glob("*.bin")):
        h.update(shard.name.encode() + shard.read_bytes())
    return h.hexdigest()


def cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=float, default=24, help="MB of text to prepare")
    p.add_argument("--workers", default="1,2", help="comma-separated --workers values")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds over the --workers values")
    args = p.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        corpus = tmp / "corpus.jsonl"
        n_bytes, texts = write_corpus(corpus, args.mb)
        tokenizer = tmp / "tokenizer.json"
        tokenizer_lib.train_bpe(texts[:2000], 8192, show_progress=False, length=2000).save(str(tokenizer))
        seconds = {w: [] for w in counts}
        digests = set()
        for round_ in range(args.repeats):
            for w in counts:
                out = tmp / f"out_{w}_{round_}"
                command = [
                    sys.executable,
                    "-m",
                    "mtp_jax.prepare",
                    f"--source={corpus}",
                    f"--tokenizer={tokenizer}",
                    f"--out={out}",
                    "--shard_tokens=2000000",
                    "--val_docs=10",
                    f"--workers={w}",
                ]
                start = time.perf_counter()
                subprocess.run(command, check=True, cwd=ROOT, stderr=subprocess.DEVNULL)
                seconds[w].append(time.perf_counter() - start)
                digests.add(shards_digest(out))
                print(f"workers={w} round={round_}: {seconds[w][-1]:.1f} s", flush=True)
    mb_per_s = {w: n_bytes / 1e6 / statistics.median(s) for w, s in seconds.items()}
    for w in counts:
        print(
            f"workers={w}: median {statistics.median(seconds[w]):.1f} s, {mb_per_s[w]:.2f} MB/s, "
            f"{mb_per_s[w] / mb_per_s[counts[0]]:.2f}x"
        )
    print(
        json.dumps(
            dict(
                cpu=cpu_model(),
                mb_of_text=round(n_bytes / 1e6, 2),
                seconds={w: [round(x, 2) for x in s] for w, s in seconds.items()},
                mb_per_s={w: round(v, 3) for w, v in mb_per_s.items()},
                ratio_to_first={w: round(v / mb_per_s[counts[0]], 3) for w, v in mb_per_s.items()},
                identical_shards=len(digests) == 1,
            )
        )
    )


if __name__ == "__main__":
    main()
