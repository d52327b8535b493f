"""Splits prepared in one pass hold the rows the per-split pipelines do, and the prepare actor starts once."""

import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.training import prepared_splits, split_inputs


class DropOdd:
    """A prepare step that drops rows (odd ids) and maps the rest; each start leaves a file behind."""

    def __init__(self, starts: str):
        Path(starts, f"{os.getpid()}-{id(self)}").touch()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keep = batch["id"] % 2 == 0
        return {"id": batch["id"][keep], "double": 2 * batch["value"][keep]}


def test_one_pass_keeps_each_splits_rows_and_starts_one_actor(ray_cluster, tmp_path):
    table = tmp_path / "lesions"
    table.mkdir()
    ids = np.arange(300)
    splits = np.array(["train", "val", "test"])[ids % 3]
    pq.write_table(pa.table({"id": ids, "split": splits, "value": ids * 1.5}), table / "part-0.parquet")
    starts = tmp_path / "starts"
    starts.mkdir()
    columns, wanted = ["id", "split", "value"], ("train", "val")

    together = prepared_splits(str(table), columns, wanted, DropOdd, (str(starts),), {}, materialize=True, max_actors=1)
    assert len(list(starts.iterdir())) == 1  # one actor for both splits
    for split in wanted:
        alone = split_inputs(str(table), columns, split, DropOdd, (str(starts),), {}, materialize=True, max_actors=1)
        rows = sorted(r["id"] for r in together[split].take_all())
        assert rows == sorted(r["id"] for r in alone.take_all())
        assert rows == [i for i in range(300) if i % 2 == 0 and splits[i] == split]
        assert set(together[split].columns()) == {"id", "double"}
    assert len(list(starts.iterdir())) == 3  # and one more for each split prepared alone


class SlowFirstFile:
    """Slow on the first file's rows: unordered, later files' rows would come back before them."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if batch["id"].min() < 25:
            time.sleep(2.0)
        return {"id": batch["id"]}


def test_materialized_splits_keep_the_tables_file_order(ray_cluster, tmp_path):
    """A resumed training run must see the rows in the order the interrupted one did: the table's order,
    whichever of several prepare actors finishes first."""
    table = tmp_path / "lesions"
    table.mkdir()
    for first in range(0, 200, 25):
        ids = np.arange(first, first + 25)
        pq.write_table(pa.table({"id": ids, "split": np.array(["train", "val"])[ids % 2]}), table / f"part-{first:03d}.parquet")
    together = prepared_splits(str(table), ["id", "split"], ("train", "val"), SlowFirstFile, (), {}, materialize=True)
    for offset, split in enumerate(("train", "val")):
        assert [r["id"] for r in together[split].take_all()] == list(range(offset, 200, 2))


def test_several_tables_train_together_their_files_shuffled_the_same_every_run(ray_cluster, tmp_path):
    """Mixed-clinic training: both clinics' rows, their files in one seeded order (each stretch of an epoch mixes
    them), the same in every run (a resumed run relies on it), whichever prepare actor finishes first."""
    files = []
    for clinic, first in (("clinic", 0), ("shifted", 100)):
        (tmp_path / clinic).mkdir()
        for start in range(first, first + 75, 25):
            ids = np.arange(start, start + 25)
            splits = np.array(["train", "val", "test"])[ids % 3]
            pq.write_table(pa.table({"id": ids, "split": splits}), tmp_path / clinic / f"part-{start:03d}.parquet")
            files.append(ids)
    tables = [str(tmp_path / "clinic"), str(tmp_path / "shifted")]
    order = np.random.default_rng(0).permutation(len(files))  # the order split_inputs promises
    expected = np.concatenate([files[i] for i in order])
    for _ in range(2):
        together = prepared_splits(tables, ["id", "split"], ("train", "val"), SlowFirstFile, (), {}, materialize=True)
        assert [r["id"] for r in together["train"].take_all()] == [i for i in expected if i % 3 == 0]
        assert [r["id"] for r in together["val"].take_all()] == [i for i in expected if i % 3 == 1]
    assert set(order[:3]) not in ({0, 1, 2}, {3, 4, 5})  # the first half of an epoch holds both clinics
