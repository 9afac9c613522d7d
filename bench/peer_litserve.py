"""A LitServe server for `python -m bench.peers` (run in the peers' virtual environment as
`python bench/peer_litserve.py --model NAME=model.pt --port N`), each model at
/predictions/NAME; the request body reaches decode_request as raw bytes, so LitServe gets the
same JPEG body as attnserve and TorchServe.
"""

import argparse
from pathlib import Path
from typing import Annotated, Any

import litserve as ls
import torch
from fastapi import Depends, Request
from peerapps import Classifier


async def raw_body(request: Request) -> bytes:
    """The request's body as bytes (LitServe would otherwise parse it as JSON)."""
    return await request.body()


class ClassifierApi(ls.LitAPI):
    """decode (preprocess) -> batch -> predict -> unbatch, in LitServe's worker processes."""

    def __init__(self, model: str, threads: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model_file, self.threads = model, threads

    def setup(self, device: str) -> None:
        self.classifier = Classifier(Path(self.model_file), self.threads)

    def decode_request(self, request: Annotated[bytes, Depends(raw_body)]) -> torch.Tensor:
        return self.classifier.preprocess(request)

    def batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(inputs)

    def predict(self, x: torch.Tensor) -> list[dict[str, Any]]:
        return self.classifier.predict(x)

    def unbatch(self, output: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return output

    def encode_response(self, output: dict[str, Any]) -> dict[str, Any]:
        return output


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--model", action="append", required=True, help="NAME=TorchScript file (meta.json beside)"
    )
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads of each worker")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--delay-ms", type=float, default=5.0)
    args = p.parse_args()
    apis = [
        ClassifierApi(
            path,
            args.threads,
            max_batch_size=args.batch,
            batch_timeout=args.delay_ms / 1000,
            api_path=f"/predictions/{name}",
        )
        for name, _, path in (entry.partition("=") for entry in args.model)
    ]
    server = ls.LitServer(apis, accelerator="cpu", workers_per_device=args.workers, timeout=60)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
