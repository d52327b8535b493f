#!/usr/bin/env bash
# One diffusion adapter trained twice on a study's base and recipe, side by side: validation and a checkpoint
# every epoch (diffusion.train.checkpoint_every_epochs=1) against every 4 (what `make study` sets). Prints each
# run's wall time, its training loops' time and final losses, and whether the two adapters' weights are equal.
#
#   make study    # once: the base, the lesion table
#   bash benchmarks/adapter_checkpoints.sh out/study VASC    # ~2.5 min
set -euo pipefail
workdir=$(realpath "${1:-out/study}")
code=${2:-VASC}
py=${PY:-.venv/bin/python}
scratch=$(mktemp -d /tmp/adapter-checkpoints-XXXX)
trap 'rm -rf "$scratch"' EXIT
cp -r "$workdir/diffusion/base" "$scratch/base"  # reused: its pre-training settings match the recipe below
for every in 1 4; do
  # benchmarks/study.py's diffusion settings, one diagnosis
  PYTHONPATH=platform:. "$py" -m jobs.diffusion --config configs/local.yaml \
    diffusion.input="$workdir/ingest/clinic/lesions" diffusion.output="$scratch" \
    diffusion.limit=null diffusion.pretrain.max_images=4000 diffusion.pretrain.batch_size=32 \
    diffusion.pretrain.vae_steps=1600 diffusion.pretrain.unet_steps=1500 diffusion.pretrain.ip_adapter_steps=600 \
    diffusion.train.epochs=12 diffusion.lora_rank=16 diffusion.lora_alpha=16 diffusion.adapters=per_diagnosis \
    "diffusion.lora_targets=[to_q,to_k,to_v,to_out.0,proj_in,proj_out,ff.net.0.proj,ff.net.2,conv1,conv2,conv_shortcut,time_emb_proj]" \
    diffusion.train.lr=1e-3 "diffusion.diagnoses=[$code]" diffusion.run_name="every$every" \
    diffusion.train.checkpoint_every_epochs="$every" > "$scratch/log$every.txt" 2>&1 \
    || { tail -20 "$scratch/log$every.txt"; exit 1; }
  cp "$scratch/adapters/$code/pytorch_lora_weights.safetensors" "$scratch/every$every.safetensors"
  "$py" - "$scratch/diffusion_summary.json" "$code" "$every" <<'PY'
import json, sys
adapter = json.load(open(sys.argv[1]))["per_diagnosis"][sys.argv[2]]
loops = sum(h["train_seconds"] for h in adapter["history"])
final = adapter["final"]
print(f"every {sys.argv[3]} epochs: {adapter['seconds']:.1f} s ({loops:.1f} s in the training loop), "
      f"final train loss {final['train_loss']:.6f}, validation loss {final['val_loss']:.6f}")
PY
done
"$py" - "$scratch/every1.safetensors" "$scratch/every4.safetensors" <<'PY'
import sys
from safetensors.torch import load_file
a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
assert a.keys() == b.keys()
print(f"largest weight difference between the two adapters: {max(float((a[k] - b[k]).abs().max()) for k in a):g}")
PY
