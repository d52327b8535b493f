"""Helpers shared by test modules."""

PLANTED_DEFECTS = {
    "truncated_image": 3, "not_an_image": 3, "decompression_bomb": 2, "empty_image": 2, "image_missing": 2,
    "nan_attribute": 3, "negative_attribute": 2, "wrong_dtype": 2, "duplicate_id": 3,
}  # fmt: skip


def read_table(fs, path):
    """Every Parquet file under `path` of filesystem `fs`, as one DataFrame."""
    import io

    import pandas as pd
    import pyarrow.parquet as pq

    files = sorted(f for f in fs.find(path) if f.endswith(".parquet"))
    return pd.concat([pq.read_table(io.BytesIO(fs.cat_file(f))).to_pandas() for f in files], ignore_index=True)
