"""One diffusion adapter trained twice on a study's base with `make study`'s diffusion settings, side by side:
validation and a checkpoint every epoch (`diffusion.train.checkpoint_every_epochs=1`) against every 4 (what the
study sets). Prints each run's wall time, its training loops' time and final losses, and the largest difference
between the two adapters' weights.

    make study    # once: the base, the lesion table
    .venv/bin/python benchmarks/adapter_checkpoints.py --workdir out/study --diagnosis VASC    # ~2.5 min
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="out/study", help="a `make study` workdir (its base and lesion table)")
    parser.add_argument("--diagnosis", default="VASC", help="the adapter to train")
    args = parser.parse_args()

    from safetensors.torch import load_file
    from study import diffusion_overrides

    from dermaray.config import load_config
    from dermaray.diffusion.pipeline import LORA_WEIGHT_NAME
    from dermaray.layout import Layout
    from jobs import diffusion

    at = Layout(str(Path(args.workdir).absolute()))
    weights = {}
    with tempfile.TemporaryDirectory(prefix="adapter-checkpoints-") as scratch:
        # The study's base, reused: its pre-training settings are these overrides' (a mismatch would train it again).
        shutil.copytree(Path(at.diffusion, "base"), Path(scratch, "base"))
        for every in (1, 4):
            cfg = load_config(
                "configs/local.yaml",
                [
                    *diffusion_overrides(),
                    f"diffusion.input={at.lesions('clinic')}",
                    f"diffusion.output={scratch}",
                    f"diffusion.diagnoses=[{args.diagnosis}]",
                    f"diffusion.run_name=every{every}",
                    f"diffusion.train.checkpoint_every_epochs={every}",
                ],
            )
            adapter = diffusion.run(cfg)["per_diagnosis"][args.diagnosis]
            weights[every] = load_file(Path(adapter["adapter"], LORA_WEIGHT_NAME))
            loops = sum(h["train_seconds"] for h in adapter["history"])
            final = adapter["final"]
            print(
                f"every {every} epochs: {adapter['seconds']:.1f} s ({loops:.1f} s in the training loop), "
                f"final train loss {final['train_loss']:.6f}, validation loss {final['val_loss']:.6f}"
            )
    assert weights[1].keys() == weights[4].keys(), "the two adapters adapt different layers"
    difference = max(float((weights[1][k] - weights[4][k]).abs().max()) for k in weights[1])
    print(f"largest weight difference between the two adapters: {difference:g}")


if __name__ == "__main__":
    main()
