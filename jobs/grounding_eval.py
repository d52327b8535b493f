"""Evaluate grounding: frozen vs grounded embeddings on held-out lesions and on the shifted domain.

    python -m jobs.grounding_eval --config configs/local.yaml

Reads the embeddings tables (jobs.embeddings, once with the frozen base and once with the
grounded model) and writes `<output>/grounding_eval.json` and `grounding_eval.md`. The work is
a few matrix products on the driver, so this job needs no cluster.
"""

from __future__ import annotations

import sys

from dermaray.cli import config_from_argv, setup_logging
from dermaray.config import DermarayConfig
from dermaray.grounding.embed import PREDICTED_PREFIX
from dermaray.grounding.evaluate import evaluate_set, markdown
from dermaray.layout import embeddings_table
from dermaray.storage import join, read_parquet, write_bytes
from jobs.common import clear_summary, log, write_summary


def run(cfg: DermarayConfig) -> dict:
    ev, options = cfg.grounding_eval, cfg.storage_options
    clear_summary(join(ev.output, "grounding_eval.json"), options)
    if not ev.domains:
        raise ValueError("grounding_eval.domains is empty")

    def table(root: str, domain: str):
        return read_parquet(embeddings_table(join(root, domain)), options).to_pandas()

    home = ev.domains[0]
    frozen_home, grounded_home = table(ev.frozen, home), table(ev.grounded, home)
    attributes = [c.removeprefix(PREDICTED_PREFIX) for c in grounded_home.columns if c.startswith(PREDICTED_PREFIX)]
    if not attributes:
        raise ValueError(f"{ev.grounded}/{home} has no predicted attributes: embed it with a grounding model, not 'frozen'")
    probe_train = frozen_home[frozen_home.split == "train"]
    sets = {
        f"{home} held-out (test split)": (frozen_home[frozen_home.split == "test"], grounded_home[grounded_home.split == "test"])
    }
    for domain in ev.domains[1:]:
        sets[f"{domain} (domain shift, all lesions)"] = (table(ev.frozen, domain), table(ev.grounded, domain))
    results = {}
    for name, (frozen, grounded) in sets.items():
        log.info("grounding_eval: %s, %d lesions", name, len(grounded))
        results[name] = evaluate_set(frozen, grounded, probe_train, attributes, ev.tau_std)
    write_bytes(join(ev.output, "grounding_eval.md"), markdown(results).encode(), options)
    write_summary(join(ev.output, "grounding_eval.json"), results, options)
    return results


if __name__ == "__main__":
    setup_logging()
    print(markdown(run(config_from_argv(sys.argv[1:], prog="python -m jobs.grounding_eval"))))
