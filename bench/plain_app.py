"""The serving baseline of serve.py: the same model in a plain FastAPI + uvicorn app, one process.

    python bench/plain_app.py CHECKPOINT --port 8123

What a user writes without Ray Serve: one process, the checkpoint loaded once at start, a
synchronous ``POST /predict`` route (FastAPI runs it in its thread pool) that takes the same JSON
body as rayfine's /predict, runs the same preprocessing and model (``load_served`` +
``run_batch`` on the request's own items, no batching across requests) and answers the same JSON.
torch uses one thread, as a 1-CPU Serve replica does. Binds 127.0.0.1 only.
"""

from __future__ import annotations

import argparse


def make_app(checkpoint: str):
    import torch
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from rayfine.config import ServeConfig
    from rayfine.serve import protocol
    from rayfine.serve.model import load_served, run_batch

    torch.set_num_threads(1)
    limits = ServeConfig()
    served = load_served(checkpoint, limits)
    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {"ready": True}

    @app.post("/predict")
    def predict(body: dict):
        try:
            req = protocol.PredictRequest.model_validate(body)
            items = protocol.predict_items(req, served.kind, limits)
        except protocol.RequestError as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)
        except ValueError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        answer = run_batch(served, [items])[0]
        if answer.error is not None:
            return JSONResponse({"error": answer.error}, status_code=400)
        return protocol.predict_response("plain", served.version, answer.labels, answer.probs, req.top_k)

    return app


def main() -> None:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--port", type=int, required=True)
    a = p.parse_args()
    uvicorn.run(make_app(a.checkpoint), host="127.0.0.1", port=a.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
