"""`attnserve predict IMAGE...`: classify images from the command line and write overlay images.

Without `--url` it serves the model repository (ATTNSERVE_* settings) inside the process, with
the app's full lifespan, and talks to it through `service.client` over an in-process transport;
with `--url` the same client talks to a running server. Either way the answers are the /v1
JSON, printed as a table (or as JSON with `--json`), and overlays are drawn by
`service.overlay`: one per image and model, or with `--compare` one grid per image, one panel
per model.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.overlay import COLORMAPS, DEFAULT_COLORMAP, DEFAULT_OPACITY, grid

if TYPE_CHECKING:
    from service.client import AsyncClient, Result

__all__ = ["register"]

CONCURRENT_REQUESTS = 4
GRID_PANEL_SIDE = 192  # small images are enlarged in a grid, so titles and maps stay readable
READY_TIMEOUT_S = 300.0


@dataclass
class Answer:
    """What came back for one image: its results (one per model), or the error."""

    image: Path
    results: list[Result]
    error: str | None = None


def register(commands: Any) -> None:
    """Add the `predict` subcommand to the CLI's subparsers."""
    parser = commands.add_parser(
        "predict",
        help="classify images and draw their attention maps (in-process, or --url a server)",
        description="Classify images with a served model and write the summary attention map "
        "over each image. Without --url the model repository (ATTNSERVE_* settings) is served "
        "inside this process.",
    )
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--model", help="model name (default: the first with attention)")
    choice.add_argument("--attention", metavar="BLOCK", help="the model with this block")
    choice.add_argument("--compare", action="store_true", help="every served model")
    parser.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--top-k", type=int, default=5, help="classes per image (default 5)")
    parser.add_argument(
        "--maps",
        choices=["none", "summary", "layers", "all"],
        default="summary",
        help="maps to ask for (default summary; overlays need at least summary)",
    )
    parser.add_argument("--map-size", type=int, help="longest side of the maps, 8..512")
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--overlay", type=Path, metavar="OUT.png", help="overlay of one image")
    out.add_argument("--overlay-dir", type=Path, metavar="DIR", help="one overlay per image")
    parser.add_argument("--colormap", choices=COLORMAPS, default=DEFAULT_COLORMAP)
    parser.add_argument("--opacity", type=float, default=DEFAULT_OPACITY, help="0..1 (0.6)")
    parser.add_argument("--json", action="store_true", help="print the answers as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """The subcommand: 0 if every image was answered, 1 if some failed, 2 for bad usage."""
    problem = _usage_problem(args)
    if problem:
        sys.stderr.write(f"attnserve predict: {problem}\n")
        return 2
    try:
        import httpx  # noqa: F401
    except ImportError:
        sys.stderr.write(
            "attnserve predict: needs httpx; install it with pip install 'attnserve[client]'\n"
        )
        return 2
    return asyncio.run(_main(args))


def _usage_problem(args: argparse.Namespace) -> str | None:
    missing = [str(p) for p in args.images if not p.is_file()]
    if missing:
        return f"no such file: {', '.join(missing)}"
    if args.overlay and len(args.images) > 1:
        return "--overlay writes one image's overlay; use --overlay-dir DIR for several images"
    if not 0.0 <= args.opacity <= 1.0:
        return f"--opacity must lie in [0, 1], got {args.opacity}"
    if (args.overlay or args.overlay_dir) and args.maps == "none":
        return "overlays need maps; drop --maps none"
    return None


async def _main(args: argparse.Namespace) -> int:
    from service.app import ConfigError
    from service.client import APIError

    try:
        async with _client(args.url) as client:
            served = {m["name"]: m["attention"] for m in await client.models()}
            model = None if args.compare or args.attention else _model(served, args.model)
            answers = await _answer_all(client, args, model)
    except (ConfigError, APIError, OSError, TimeoutError) as exc:
        sys.stderr.write(f"attnserve predict: {exc}\n")
        return 2
    if args.json:
        sys.stdout.write(json.dumps([_json(a) for a in answers], indent=1) + "\n")
    else:
        sys.stdout.write(_table(answers))
    written = _write_overlays(args, answers, served)
    for path in written:
        sys.stderr.write(f"wrote {path}\n")
    for answer in answers:
        if answer.error:
            sys.stderr.write(f"attnserve predict: {answer.image}: {answer.error}\n")
    return 1 if any(a.error for a in answers) else 0


@contextlib.asynccontextmanager
async def _client(url: str | None) -> AsyncIterator[AsyncClient]:
    """A client of the server at `url`, or of the app served in this process."""
    import httpx

    from service.client import AsyncClient

    if url:
        async with AsyncClient(url) as client:
            yield client
        return
    from service.app import create_app

    app = create_app()
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with AsyncClient("http://attnserve", transport=transport) as client:
            await _wait_ready(client)
            yield client


async def _wait_ready(client: AsyncClient) -> None:
    """Wait until every model is ready; a model that failed to load ends the wait at once."""
    async with asyncio.timeout(READY_TIMEOUT_S):
        while True:
            models = await client.models()
            failed = [m["name"] for m in models if m["status"] == "failed"]
            if failed:
                raise OSError(f"model(s) failed to load: {', '.join(failed)}")
            if all(m["status"] == "ready" for m in models):
                return
            await asyncio.sleep(0.05)


def _model(served: dict[str, str], name: str | None) -> str:
    """`name`, or the first served model that has attention (`served`: name -> block)."""
    if name:
        return name
    if not served:
        raise OSError("the server serves no model")
    return next((m for m, block in served.items() if block != "none"), next(iter(served)))


async def _answer_all(
    client: AsyncClient, args: argparse.Namespace, model: str | None
) -> list[Answer]:
    """Every image's answer, a few requests at a time, with a progress bar for many images
    (on a terminal)."""
    from tqdm import tqdm

    from service.client import APIError

    gate = asyncio.Semaphore(CONCURRENT_REQUESTS)
    options = {"top_k": args.top_k, "maps": args.maps, "map_size": args.map_size}
    with tqdm(
        total=len(args.images), disable=None if len(args.images) > 1 else True, file=sys.stderr
    ) as bar:

        async def one(path: Path) -> Answer:
            async with gate:
                try:
                    data = path.read_bytes()
                    if args.compare:
                        results = await client.compare(data, **options)
                    else:
                        results = await client.predict(
                            data, model=model, attention=args.attention, **options
                        )
                    return Answer(path, results)
                except APIError as exc:
                    return Answer(path, [], str(exc))
                finally:
                    bar.update()

        return list(await asyncio.gather(*(one(path) for path in args.images)))


def _json(answer: Answer) -> dict[str, Any]:
    if answer.error:
        return {"image": str(answer.image), "error": answer.error}
    return {
        "image": str(answer.image),
        "results": [r.raw | {"model": r.model} for r in answer.results],
    }


def _table(answers: Sequence[Answer]) -> str:
    """One row per image, model and class: image, model, rank, label, probability."""
    rows = [("image", "model", "rank", "label", "probability")]
    for answer in answers:
        for result in answer.results:
            for rank, p in enumerate(result.predictions, start=1):
                rows.append(
                    (answer.image.name, result.model, str(rank), p.label, f"{p.probability:.5f}")
                )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def _write_overlays(
    args: argparse.Namespace, answers: Sequence[Answer], blocks: dict[str, str]
) -> list[Path]:
    """The overlay files asked for: `--overlay` (one image) or one per image (and model) in
    `--overlay-dir`; with `--compare` a grid per image, each panel titled with the model's
    block (`blocks`: name -> block) and its top prediction."""
    if not (args.overlay or args.overlay_dir):
        return []
    if args.overlay_dir:
        args.overlay_dir.mkdir(parents=True, exist_ok=True)
    style = {"colormap": args.colormap, "opacity": args.opacity}
    written = []
    for answer in answers:
        if answer.error:
            continue
        stem = answer.image.stem
        if args.compare:
            results = answer.results
            panels = [r.overlay(answer.image, min_side=GRID_PANEL_SIDE, **style) for r in results]
            picture = grid(panels, [_title(r, blocks.get(r.model, r.model)) for r in results])
            targets = [(args.overlay or args.overlay_dir / f"{stem}-compare.png", picture)]
        else:
            targets = [
                (
                    args.overlay or args.overlay_dir / f"{stem}-{r.model}.png",
                    r.overlay(answer.image, **style),
                )
                for r in answer.results
            ]
        for path, picture in targets:
            picture.save(path, format="PNG", optimize=True)
            written.append(path)
    return written


def _title(result: Result, block: str) -> str:
    """A grid panel's title: the model's block and its top prediction."""
    top = result.predictions[0]
    return f"{block}: {top.label} ({top.probability:.0%})"
