#!/bin/bash
# Heads-only experiment (issue 13). Run from the repository root. The trunk: the default mtp4
# command's model (/work/models/mtp4) at step $S, its own heads removed.
set -ex
PY=/work/venv/bin/python
W=/tmp/i13/exp
S=${S:-60}
HEAD=${HEAD:-linear}
STEPS=${STEPS:-60}
T=$W/trunk_step$S
if [ ! -d ${T}_hf ]; then
  mkdir -p $W/mtp4_step$S/checkpoints  # a copy: tools may write into a workdir (orbax's tmp cleanup)
  cp /work/models/mtp4/config.json $W/mtp4_step$S/
  cp -r /work/models/mtp4/checkpoints/$S $W/mtp4_step$S/checkpoints/ || cp -r $W/mtp4_copy/checkpoints/$S $W/mtp4_step$S/checkpoints/
  $PY -m mtp_jax.export --workdir=$W/mtp4_step$S --out=$W/mtp4_step${S}_hf
  # Drop the jointly trained heads: the folder then holds a plain Llama model (no MTP heads).
  $PY - <<PYEOF
import json, pathlib, shutil, safetensors.numpy as s
src, dst = pathlib.Path("$W/mtp4_step${S}_hf"), pathlib.Path("${T}_hf")
shutil.copytree(src, dst)
mtp = json.loads((src / "mtp_jax.json").read_text())
tensors = {k: v for k, v in s.load_file(src / "model.safetensors").items() if k not in mtp["heads"]}
s.save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
(dst / "mtp_jax.json").write_text(json.dumps({**mtp, "use_mtp": False, "mtp_n_tokens": 1, "heads": []}, indent=2))
PYEOF
fi
/usr/bin/time -f "heads-only training wall %e s" $PY -m mtp_jax.main --config=configs/mtp4.py --workdir=$W/heads_$HEAD \
  --config.init_from=${T}_hf --config.train=heads --config.mtp_head_type=$HEAD \
  --config.num_train_steps=$STEPS --config.sample_tokens=0
$PY -m mtp_jax.export --workdir=$W/heads_$HEAD --out=$W/heads_${HEAD}_hf
$PY - <<PYEOF
import safetensors.numpy as s
a = s.load_file("${T}_hf/model.safetensors"); b = s.load_file("$W/heads_${HEAD}_hf/model.safetensors")
same = all(a[k].tobytes() == b[k].tobytes() for k in a)
print(f"trunk tensors byte-identical to the imported model's: {same} ({len(a)} tensors); head tensors added: {len(b) - len(a)}")
PYEOF
$PY -m mtp_jax.generate --workdir=$W/heads_$HEAD --benchmark --prompts=10 --prompt_len=128 --max_new_tokens=128 --json > $W/heads_${HEAD}.json
