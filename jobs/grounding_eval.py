"""Evaluate grounding: frozen vs grounded embeddings on held-out lesions and on the shifted domain.

    python -m jobs.grounding_eval --config configs/local.yaml

Reads the embeddings tables (jobs.embeddings, once with the frozen base and once with the
grounded model) and writes `<output>/grounding_eval.json` and `grounding_eval.md`. The work is
a few matrix products on the driver, so this job needs no cluster. It reads only the columns it
scores (no thumbnails) and only the rows of each set; retrieval is scored from a bounded sample
of queries (`grounding_eval.max_queries`) against the whole set, and the frozen probe is fitted
on at most `grounding_eval.max_probe_lesions` training lesions, so the work stays bounded at any size.
"""

from __future__ import annotations

import functools
import sys

import numpy as np

from dermaray.cli import config_from_argv, setup_logging
from dermaray.config import DermarayConfig
from dermaray.grounding.embed import PREDICTED_PREFIX
from dermaray.grounding.evaluate import K, evaluate_set, markdown
from dermaray.layout import embeddings_table
from dermaray.storage import join, parquet_schema, read_parquet, take_parquet, write_bytes
from jobs.common import clear_summary, log, write_summary


def run(cfg: DermarayConfig) -> dict:
    ev, options = cfg.grounding_eval, cfg.storage_options
    if not ev.domains:
        raise ValueError("grounding_eval.domains is empty")
    unknown = sorted(set(ev.trained_on) - set(ev.domains[1:]))
    if unknown:
        raise ValueError(f"grounding_eval.trained_on names {unknown}, not among the shifted domains {ev.domains[1:]}")
    clear_summary(join(ev.output, "grounding_eval.json"), options)

    home = ev.domains[0]
    predicted = [
        c for c in parquet_schema(embeddings_table(join(ev.grounded, home)), options).names if c.startswith(PREDICTED_PREFIX)
    ]
    attributes = [c.removeprefix(PREDICTED_PREFIX) for c in predicted]
    if not attributes:
        raise ValueError(f"{ev.grounded}/{home} has no predicted attributes: embed it with a grounding model, not 'frozen'")

    @functools.cache
    def splits(uri: str) -> np.ndarray:  # read once per table, though its train and test rows are both taken
        return read_parquet(uri, options, ["split"]).column("split").to_numpy(zero_copy_only=False)

    def table(root: str, domain: str, split: str | None = None, extra: list[str] | None = None, limit: int | None = None):
        """One embeddings table's columns the scores use; the rows of `split` (all: None), at most `limit` (seeded)."""
        columns = ["lesion_id", "split", "embedding", *attributes, *(extra or [])]
        uri = embeddings_table(join(root, domain))
        if split is None:
            return read_parquet(uri, options, columns).to_pandas()
        rows = np.flatnonzero(splits(uri) == split)
        if limit is not None and len(rows) > limit:
            rows = np.sort(np.random.default_rng(ev.seed).choice(rows, limit, replace=False))
        return take_parquet(uri, rows, options, columns).to_pandas()

    probe_train = table(ev.frozen, home, "train", limit=ev.max_probe_lesions)
    sets = {f"{home} held-out (test split)": (table(ev.frozen, home, "test"), table(ev.grounded, home, "test", predicted))}
    for domain in ev.domains[1:]:
        mixed = domain in ev.trained_on  # its train and val splits trained the model: only its test split is unseen
        if mixed:
            test = (table(ev.frozen, domain, "test"), table(ev.grounded, domain, "test", predicted))
        else:
            every = (table(ev.frozen, domain), table(ev.grounded, domain, extra=predicted))
            sets[f"{domain} (domain shift, all lesions)"] = every
            # Its test split alone too, taken from the rows just read: what a model mixed with this clinic is
            # scored on, so every run has a like-for-like figure.
            test = tuple(t[t["split"] == "test"].reset_index(drop=True) for t in every)
        if mixed or len(test[1]) > K:  # one of K lesions or fewer cannot be queried: left out
            sets[f"{domain} (domain shift, test split{'; mixed into training' if mixed else ''})"] = test
    results = {}
    for name, (frozen, grounded) in sets.items():
        log.info("grounding_eval: %s, %d lesions", name, len(grounded))
        results[name] = evaluate_set(frozen, grounded, probe_train, attributes, ev.tau_std, ev.max_queries, ev.seed)
    write_bytes(join(ev.output, "grounding_eval.md"), markdown(results).encode(), options)
    write_summary(join(ev.output, "grounding_eval.json"), results, options)
    return results


if __name__ == "__main__":
    setup_logging()
    print(markdown(run(config_from_argv(sys.argv[1:], prog="python -m jobs.grounding_eval"))))
