"""The accelerator benchmark behind benchmarks/device.sh: one JSON and one markdown table.

    python benchmarks/device.py --out=DIR [--preset=nano_125m] [--dtype=bfloat16] [--steps=10]

On the first device (all local devices for the train step), for the preset in `--dtype`:
  train      the real train step (mtp_jax.bench) of the baseline and of n = 4 for each head type:
             tokens/s, MFU against the chip's dense peak in that dtype (KNOWN_PEAKS by device
             name, else measured with a large matmul), compiled memory, and each step time as a
             ratio to the baseline's next to the ratio of their FLOPs;
  attention  the baseline's step with each attention implementation ('auto' is one of them);
  decoding   greedy plain vs self-speculative tokens/s of a random-weight n = 4 linear model
             (mtp_jax.generate; random heads rarely agree, so this times the machinery, not the
             acceptance a trained model would reach).
Each section is written to DIR/device.json as soon as it is measured, so a run cut short keeps
what it finished; DIR/device.md is the same as tables.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import runpy
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from mtp_jax import attention, bench, decoding, flops  # noqa: E402
from mtp_jax.heads import HEAD_TYPES  # noqa: E402
from mtp_jax.mtp import build_model  # noqa: E402

# Dense (no sparsity) peak FLOP/s per chip in bfloat16, from the vendors' data sheets; the first
# name contained in jax's device_kind wins, so more specific names come first.
KNOWN_PEAKS = {
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "H200": 989e12,
    "H800": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
    "V100": 125e12,
    "TPU v6": 918e12,
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v4": 275e12,
}


def peak_flops(dtype: str) -> tuple[float, str]:
    """The device's dense peak in `dtype` and where the number comes from."""
    kind = jax.devices()[0].device_kind
    if dtype == "bfloat16":
        for name, peak in KNOWN_PEAKS.items():
            if name in kind:
                return peak, f"data sheet ({name}, dense bfloat16)"
    return bench.measure_peak_flops(dtype), f"measured ({dtype} 2048^3 matmul)"


def load_preset(preset: str, dtype: str, batch_size: int):
    config = runpy.run_path(str(ROOT / "configs" / "baseline.py"))["get_config"](preset)
    config.model.dtype = dtype
    if batch_size:
        config.batch_size = batch_size
    return config


def variant(config, n: int = 1, head_type: str = "linear", attention_name: str | None = None):
    c = config.copy_and_resolve_references()
    c.use_mtp, c.mtp_n_tokens, c.mtp_head_type = n > 1, n, head_type
    if attention_name is not None:
        c.model.attention = attention_name
    return c


def train_rows(config, args, peak: float) -> list[dict]:
    rows = []
    for n, head_type in [(1, "linear")] + [(4, h) for h in args.head_types.split(",")]:
        r = bench.bench_config(
            variant(config, n, head_type),
            compile_only=False,
            steps=args.steps,
            warmup=args.warmup,
            peak=peak,
            twin_flops=False,
        )
        base = rows[0] if rows else r
        rows.append(
            {
                **r,
                "time_ratio": r["step_time_s"] / base["step_time_s"],
                "flops_ratio": r["model_flops_per_step"] / base["model_flops_per_step"],
            }
        )
    return rows


def attention_rows(config, args, peak: float, auto_row: dict) -> list[dict]:
    """The baseline with each attention implementation; auto_row is the baseline's own ('auto'),
    so the implementation 'auto' stands for is not compiled twice."""
    auto = attention.resolve("auto")
    rows = [{**auto_row, "attention": f"auto = {auto}"}]
    for name in (n for n in args.attention.split(",") if n != auto):
        r = bench.bench_config(
            variant(config, attention_name=name),
            compile_only=False,
            steps=args.steps,
            warmup=args.warmup,
            peak=peak,
            twin_flops=False,
        )
        rows.append({**r, "attention": name})
    return rows


def decoding_row(config, args) -> dict:
    """Greedy plain vs self-speculative decoding of random prompts, alternating which runs first."""
    config = variant(config, 4, "linear")
    model = build_model(config, flops.vocab_size(config), seed=0)
    generator = decoding.Generator(model, args.prompt_len + args.new_tokens)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, flops.vocab_size(config), args.prompt_len).tolist() for _ in range(args.prompts)]
    generator.generate(prompts[0], args.new_tokens), generator.speculative(prompts[0], args.new_tokens)  # compile
    timings = {"plain": [], "speculative": []}
    accepted = []
    for i, prompt in enumerate(prompts):
        for mode in ("plain", "speculative") if i % 2 == 0 else ("speculative", "plain"):
            start = time.perf_counter()
            result = (
                generator.generate(prompt, args.new_tokens)
                if mode == "plain"
                else generator.speculative(prompt, args.new_tokens)
            )
            timings[mode].append(len(result.tokens) / (time.perf_counter() - start))
            if mode == "speculative":
                accepted += result.accepted
    plain, speculative = statistics.median(timings["plain"]), statistics.median(timings["speculative"])
    return {
        "name": f"{config.preset} linear n=4, random weights",
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "prompts": args.prompts,
        "plain_tokens_per_sec": plain,
        "speculative_tokens_per_sec": speculative,
        "speedup": speculative / plain,
        "tokens_per_pass": 1.0 + float(np.mean(accepted)) if accepted else 1.0,
    }


def markdown(report: dict) -> str:
    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    lines = [
        f"# {report['device']} · {report['preset']} · {report['dtype']} · {report['date']}",
        "",
        f"JAX {report['jax']}, {report['n_devices']} device(s); peak {report['peak_flops'] / 1e12:.3g} "
        f"TFLOP/s, {report['peak_source']}.",
        "",
    ]
    if "train" in report:
        lines += [
            "| config | step s | tokens/s | MFU | time ÷ baseline | FLOPs ÷ baseline | temp GiB | "
            "state+batch GiB | compile s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r['name']} | {r['step_time_s']:.4f} | {r['tokens_per_sec']:,.0f} | {100 * r['mfu']:.1f} % | "
            f"{r['time_ratio']:.2f}× | {r['flops_ratio']:.2f}× | {gib(r['temp_bytes'])} | "
            f"{gib(r['argument_bytes'])} | {r['compile_s']:.0f} |"
            for r in report["train"]
        ]
        lines.append("")
    if "attention" in report:
        lines += ["| attention (baseline) | step s | tokens/s | MFU | temp GiB |", "|---|---:|---:|---:|---:|"]
        lines += [
            f"| {r['attention']} | {r['step_time_s']:.4f} | {r['tokens_per_sec']:,.0f} | "
            f"{100 * r['mfu']:.1f} % | {gib(r['temp_bytes'])} |"
            for r in report["attention"]
        ]
        lines.append("")
    if "decoding" in report:
        d = report["decoding"]
        lines += [
            "| decoding | plain tokens/s | speculative tokens/s | speedup | tokens per pass |",
            "|---|---:|---:|---:|---:|",
            f"| {d['name']} | {d['plain_tokens_per_sec']:,.0f} | {d['speculative_tokens_per_sec']:,.0f} | "
            f"{d['speedup']:.2f}× | {d['tokens_per_pass']:.2f} |",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for device.json and device.md")
    parser.add_argument("--preset", default="nano_125m")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--batch_size", type=int, default=0, help="0: the preset's")
    parser.add_argument("--steps", type=int, default=10, help="timed train steps per configuration")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--head_types", default=",".join(HEAD_TYPES), help="n = 4 heads of these types")
    parser.add_argument(
        "--attention",
        default="xla,dot_product,blockwise",
        help="attention implementations to compare with the baseline's 'auto'",
    )
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=128)
    args = parser.parse_args()

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = load_preset(args.preset, args.dtype, args.batch_size)
    peak, source = peak_flops(args.dtype)
    device = jax.devices()[0]
    report = {
        "device": device.device_kind,
        "platform": device.platform,
        "n_devices": jax.device_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "preset": args.preset,
        "dtype": args.dtype,
        "batch_size": config.batch_size,
        "seq_len": config.seq_len,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "peak_flops": peak,
        "peak_source": source,
    }

    def save(section: str, rows) -> None:
        report[section] = rows
        (out / "device.json").write_text(json.dumps(report, indent=1))
        (out / "device.md").write_text(markdown(report))
        print(f"[device.py] {section} done at {time.perf_counter() - begin:.0f} s", file=sys.stderr, flush=True)

    begin = time.perf_counter()
    save("train", train_rows(config, args, peak))
    save("attention", attention_rows(config, args, peak, report["train"][0]))
    save("decoding", decoding_row(config, args))
    print(markdown(report))


if __name__ == "__main__":
    main()
