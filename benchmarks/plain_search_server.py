"""What a user would write instead of Ray Serve: one FastAPI app under uvicorn, same Retriever.

    .venv/bin/python benchmarks/plain_search_server.py PORT CONFIG [overrides...]

The baseline of benchmarks/serve_load.py: /search calls Retriever.search_image in a sync
endpoint (FastAPI runs it on its thread pool) and returns the result as JSON. No Ray.
"""

import sys

import uvicorn
from fastapi import FastAPI, File, UploadFile

from dermaray.config import load_config
from dermaray.serving.retriever import Retriever


def main(port: int, config: str, overrides: list[str]) -> None:
    cfg = load_config(config, overrides)
    retriever = Retriever(cfg.serve, cfg.models, cfg.storage_options)
    app = FastAPI()

    @app.post("/search")
    def search(file: UploadFile = File(...), k: int = 10) -> dict:
        return retriever.search_image(file.file.read(), k)

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3:])
