#!/bin/bash
# Heads-only experiment: n = 4 heads trained alone on the frozen trunk of the README's
# baseline (configs/baseline.py, the default command without MTP), exported and benchmarked.
# Run from the repository root. RUNS (default runs/) holds the workdirs; HEAD picks the head type,
# STEPS the heads' training steps, TRUNK an existing baseline workdir to reuse.
set -ex
R=${RUNS:-runs}
HEAD=${HEAD:-linear}
STEPS=${STEPS:-60}
TRUNK=${TRUNK:-$R/baseline}
[ -d "$TRUNK/checkpoints" ] || python -m mtp_jax.main --config=configs/baseline.py --workdir="$TRUNK"
[ -d "$R/baseline_hf" ] || python -m mtp_jax.export --workdir="$TRUNK" --out="$R/baseline_hf"
/usr/bin/time -f "heads-only training wall %e s" python -m mtp_jax.main --config=configs/mtp4.py \
  --workdir="$R/heads_$HEAD" --config.init_from="$R/baseline_hf" --config.trainable=heads \
  --config.mtp_head_type="$HEAD" --config.num_train_steps="$STEPS" --config.sample_tokens=0
python -m mtp_jax.export --workdir="$R/heads_$HEAD" --out="$R/heads_${HEAD}_hf"
python - "$R/baseline_hf" "$R/heads_${HEAD}_hf" <<'PYEOF'
import sys, safetensors.numpy as s
a, b = (s.load_file(f"{d}/model.safetensors") for d in sys.argv[1:])
same = all(a[k].tobytes() == b[k].tobytes() for k in a)
print(f"trunk tensors byte-identical to the imported model's: {same} ({len(a)} tensors); head tensors added: {len(b) - len(a)}")
PYEOF
python benchmarks/decoding.py --workdir="$R/heads_$HEAD" --prompts=10 --prompt_len=128 \
  --max_new_tokens=128 > "$R/heads_${HEAD}_benchmark.json"
