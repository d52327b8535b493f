"""The image + note classifier with real notes: image only vs image + template note vs image + LLM note.

    .venv/bin/python benchmarks/classifier_notes_study.py --lesions 600 --shifted 200 --workdir out

Synthesizes --lesions clinic lesions and --shifted lesions of the shifted clinic, writes two sets
of label-free notes for every lesion (the template, strategy M without the label; and SmolLM2's,
strategy LF), and trains the classifier job once on each. Reports accuracy, balanced accuracy and
macro F1 with 95% bootstrap intervals over the test lesions, in-domain and shifted, and the
cross-modal retrieval P@k / mAP, in <workdir>/reports/classifier_notes_study/ (.json, .md); the
HTML report shows them. The LLM notes are the slow part: about 1 note/s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # jobs/ lives in the repository, not in site-packages

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NOTE_KINDS = {  # name -> notes settings; both label-free (the classifier must not read the answer)
    "template": {"strategy": "M", "label_hierarchy": False},
    "llm": {"strategy": "LF", "model_lesions": None},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lesions", type=int, default=600)
    parser.add_argument("--shifted", type=int, default=200)
    parser.add_argument("--workdir", default="out")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()

    from dermaray.config import load_config
    from dermaray.layout import Layout, summary_uri
    from dermaray.notes.study import classifier_markdown
    from dermaray.storage import join, write_bytes
    from jobs import classifier, ingest, notes, synth
    from jobs.common import init_ray

    root = join(os.path.abspath(args.workdir), "classifier_notes_study")
    cfg = load_config(
        "configs/local.yaml",
        [
            f"models.note_writer={args.model}",
            f"classifier.train.epochs={args.epochs}",
            "classifier.init_from=null",
            "synth.seed=11",
        ],
    )
    init_ray(cfg.ray)

    def with_(c, section, **v):
        return c.model_copy(update={section: getattr(c, section).model_copy(update=v)})

    lesions = {}
    for domain, n in (("clinic", args.lesions), ("shifted", args.shifted)):
        source, canonical = join(root, "synthetic", domain), join(root, "ingest", domain)
        lesions[domain] = join(canonical, "lesions")
        if not os.path.exists(summary_uri(canonical, "ingest")):
            synth.run(with_(cfg, "synth", output=source, domain=domain, n_lesions=n))
            ingest.run(with_(cfg, "ingest", input=source, output=canonical))

    results, seconds = {}, {}
    for kind, settings in NOTE_KINDS.items():
        start = time.perf_counter()
        written = {d: join(root, f"notes_{kind}", d) for d in lesions}
        for domain in lesions:
            notes.run(with_(cfg, "notes", input=lesions[domain], output=written[domain], **settings))
        seconds[f"notes ({kind})"] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        summary = classifier.run(
            with_(
                cfg,
                "classifier",
                input=lesions["clinic"],
                notes=written["clinic"],
                shifted_input=lesions["shifted"],
                shifted_notes=written["shifted"],
                output=join(root, f"classifier_{kind}"),
                run_name=f"classifier_{kind}",
            )
        )
        seconds[f"classifier ({kind})"] = round(time.perf_counter() - start, 1)
        results[kind] = summary["eval"]
    out = {
        "lesions": args.lesions,
        "shifted": args.shifted,
        "model": args.model,
        "epochs": args.epochs,
        "results": results,
        "seconds": seconds,
    }
    reports = Layout(os.path.abspath(args.workdir)).classifier_notes_study
    write_bytes(join(reports, "classifier_notes_study.json"), json.dumps(out, indent=2, default=float).encode())
    text = classifier_markdown(out)
    write_bytes(join(reports, "classifier_notes_study.md"), text.encode())
    print(text)


if __name__ == "__main__":
    main()
