"""The peer servers of `python -m bench.peers`, run from the peers' own virtual environment:
LitServe (bench/peer_litserve.py) and TorchServe (bench/peerapps.py's handler), each in its own
process group, stopped as a whole.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from bench.server import free_port

if TYPE_CHECKING:
    from bench.peerserve import Exported

__all__ = ["LitServer", "PeerSkipped", "TorchServer"]

BENCH_DIR = Path(__file__).resolve().parent
PEER_DEFAULTS = {"workers": "1", "batch": "32", "delay_ms": "5"}


class PeerSkipped(RuntimeError):
    """A server kind that cannot run here (not installed), with the reason."""


class _PeerProcess:
    """A peer server run from the peers' virtual environment in its own process group."""

    def __init__(
        self, spec: str, options: dict[str, str], exported: dict[str, Exported], args: Any
    ) -> None:
        self.spec, self.exported, self.args = spec, exported, args
        self.options = {**PEER_DEFAULTS, **options}
        self.workers = int(self.options["workers"])
        self.threads = max(1, (os.cpu_count() or 1) // self.workers)
        self.venv_bin = Path(args.peers_venv) / "bin"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir = Path()

    def _new_dir(self) -> None:
        """A fresh directory for the server's files and logs (removed after a clean stop)."""
        self.dir = Path(tempfile.mkdtemp(prefix=f"attnserve-peer-{self.spec.split('+')[0]}-"))

    def path(self, model: str) -> str:
        return f"/predictions/{model}"

    def log_offset(self) -> int:
        return 0

    def access_records(self, start: int, end: int) -> list[dict[str, Any]]:
        return []

    def _python_has(self, module: str) -> None:
        python = self.venv_bin / "python"
        if not python.is_file():
            raise PeerSkipped(f"no virtual environment at {self.args.peers_venv}")
        done = subprocess.run([python, "-c", f"import {module}"], capture_output=True)
        if done.returncode:
            raise PeerSkipped(f"{module} is not installed in {self.args.peers_venv}")

    def _env(self) -> dict[str, str]:
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads), PEER_THREADS=str(self.threads))
        env.update(PATH=f"{self.venv_bin}:{env.get('PATH', '')}", TMPDIR=str(self.dir))
        env.pop("VIRTUAL_ENV", None)
        return env

    def _spawn(self, command: list[str]) -> None:
        """Start `command` in its own process group (stopped as a whole) but in this session:
        a new session would be a new scheduler autogroup, with another CPU share than the
        attnserve server and the client."""
        log = (self.dir / "server.log").open("wb")
        self.proc = subprocess.Popen(
            command,
            cwd=self.dir,
            env=self._env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            process_group=0,
        )

    def _wait(self, ready: Any, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.spec} exited:\n{self._log_tail()}")
            try:
                if ready():
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.spec} not ready after {timeout_s:.0f}s:\n{self._log_tail()}")

    def _log_tail(self) -> str:
        return "\n".join((self.dir / "server.log").read_text(errors="replace").splitlines()[-30:])

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if exc_type is None:
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            print(f"{self.spec}: log kept in {self.dir}", file=sys.stderr)


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        return bytes(response.read())


class LitServer(_PeerProcess):
    """LitServe 0.2 (bench/peer_litserve.py): `workers` worker processes of `threads` each."""

    def check_installed(self) -> None:
        self._python_has("litserve")

    def __enter__(self) -> LitServer:
        self._new_dir()
        command = [
            str(self.venv_bin / "python"),
            str(BENCH_DIR / "peer_litserve.py"),
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
            "--threads",
            str(self.threads),
            "--batch",
            self.options["batch"],
            "--delay-ms",
            self.options["delay_ms"],
        ]
        for name, files in self.exported.items():
            command += ["--model", f"{name}={files.script}"]
        self._spawn(command)
        self._wait(lambda: _get(f"http://127.0.0.1:{self.port}/health") == b"ok")
        return self


class TorchServer(_PeerProcess):
    """TorchServe 0.12 (Java frontend, Python workers running bench/peerapps.py's handler):
    `workers` workers of `threads` each per model, batching `batch` / `delay_ms`."""

    def check_installed(self) -> None:
        self._python_has("ts")
        for tool in ("torchserve", "torch-model-archiver"):
            if not (self.venv_bin / tool).is_file():
                raise PeerSkipped(f"{tool} is not installed in {self.args.peers_venv}")
        if shutil.which("java") is None:
            raise PeerSkipped("TorchServe needs a Java runtime (java is not on PATH)")

    def _archive(self, files: Exported) -> Path:
        """The model's .mar (built once, in the export directory)."""
        store = files.script.parent / "torchserve"
        if not (store / f"{files.name}.mar").is_file():
            store.mkdir(exist_ok=True)
            subprocess.run(
                [
                    str(self.venv_bin / "torch-model-archiver"),
                    "--model-name",
                    files.name,
                    "--version",
                    "1.0",
                    "--serialized-file",
                    str(files.script),
                    "--handler",
                    str(BENCH_DIR / "peerapps.py"),
                    "--extra-files",
                    str(files.script.with_name("meta.json")),
                    "--export-path",
                    str(store),
                    "--force",
                ],
                check=True,
                env=self._env(),
            )
        return store / f"{files.name}.mar"

    def __enter__(self) -> TorchServer:
        self._new_dir()
        store = self.dir / "store"
        store.mkdir()
        models = {}
        for name, files in self.exported.items():
            (store / f"{name}.mar").symlink_to(self._archive(files))
            models[name] = {
                "1.0": {
                    "defaultVersion": True,
                    "marName": f"{name}.mar",
                    "minWorkers": self.workers,
                    "maxWorkers": self.workers,
                    "batchSize": int(self.options["batch"]),
                    "maxBatchDelay": int(float(self.options["delay_ms"])),
                    "responseTimeout": 120,
                }
            }
        self.management = free_port()
        config = [
            f"inference_address=http://127.0.0.1:{self.port}",
            f"management_address=http://127.0.0.1:{self.management}",
            f"metrics_address=http://127.0.0.1:{free_port()}",
            f"model_store={store}",
            f"load_models={','.join(f'{n}.mar' for n in models)}",
            f"models={json.dumps(models)}",
            "disable_token_authorization=true",
            "disable_system_metrics=true",
            "install_py_dep_per_model=false",
            "job_queue_size=1000",
        ]
        (self.dir / "config.properties").write_text("\n".join(config) + "\n")
        self._spawn(
            [
                str(self.venv_bin / "torchserve"),
                "--start",
                "--foreground",
                "--ncs",
                "--model-store",
                str(store),
                "--ts-config",
                str(self.dir / "config.properties"),
                "--disable-token-auth",
            ]
        )
        self._wait(self._ready)
        return self

    def _ready(self) -> bool:
        for name in self.exported:
            (described,) = json.loads(_get(f"http://127.0.0.1:{self.management}/models/{name}"))
            ready = [w for w in described.get("workers", []) if w.get("status") == "READY"]
            if len(ready) < self.workers:
                return False
        return True
