"""The pieces every Python test uses: the real dolores binary on a free port, restartable
on the same port and data dir, and a listener run in a thread."""

from __future__ import annotations

import atexit
import os
import queue
import urllib.parse
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, List, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DOLORES_BIN = Path(os.environ.get("DOLORES_BIN") or REPO / "target/debug/dolores")
if not DOLORES_BIN.is_absolute():
    DOLORES_BIN = (REPO / DOLORES_BIN).resolve()

API_KEY = "python-test-key"
TOKEN_SECRET = "python-test-secret"
#: How long a test waits for something that should happen: generous for a loaded CI
#: machine; a passing test returns as soon as the condition holds.
WAIT = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(condition: Callable[[], Any], timeout: float = WAIT, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def clean_env(extra: Optional[dict] = None) -> dict:
    """The environment without DOLORES_* settings (they would change the server or the
    client under test) nor the tests' Django settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOLORES_") or k == "DOLORES_BIN"}
    env.pop("DJANGO_SETTINGS_MODULE", None)  # pytest-django's, not a child's
    env.setdefault("RUST_LOG", "warn")
    env.update(extra or {})
    return env


_children: "set[subprocess.Popen]" = set()


@atexit.register
def _kill_children() -> None:
    """Whatever a failed test left running does not outlive the test run."""
    for child in list(_children):
        if child.poll() is None:
            child.kill()


def spawn(*args: Any, **kwargs: Any) -> subprocess.Popen:
    """``subprocess.Popen``, killed at exit if still running."""
    child = subprocess.Popen(*args, **kwargs)
    _children.add(child)
    return child


class DoloresServer:
    """One ``dolores serve`` process. ``restart()`` comes back on the same port with the
    same data dir; ``kill()`` is kill -9."""

    def __init__(
        self,
        *,
        data: Optional[Path] = None,
        token_secret: Optional[str] = None,
        cors_origins: Optional[List[str]] = None,
        heartbeat: str = "1s",
        args: Optional[List[str]] = None,
        port: int = 0,
    ) -> None:
        if not DOLORES_BIN.exists():
            raise RuntimeError(f"no dolores binary at {DOLORES_BIN}: run `cargo build`, or set DOLORES_BIN")
        self._tmp = tempfile.mkdtemp(prefix="dolores-py-")
        self.data = data
        self.token_secret = token_secret
        self.cors_origins = cors_origins or []
        self.heartbeat = heartbeat
        self.args = args or []
        self.port = port
        self.url = ""
        self.process: Optional[subprocess.Popen] = None
        self._runs = 0

    def command(self) -> List[str]:
        cmd = [str(DOLORES_BIN), "serve", "--listen", f"127.0.0.1:{self.port}", "--api-key", API_KEY]
        cmd += ["--data", str(self.data)] if self.data else ["--memory"]
        if self.token_secret:
            cmd += ["--token-secret", self.token_secret]
        if self.cors_origins:
            cmd += ["--cors-origins", ",".join(self.cors_origins)]
        cmd += ["--heartbeat", self.heartbeat, *self.args]
        return cmd

    def start(self) -> "DoloresServer":
        self._runs += 1
        out = Path(self._tmp) / f"stdout-{self._runs}"
        err = Path(self._tmp) / f"stderr-{self._runs}"
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            self.process = spawn(
                self.command(), stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, env=clean_env()
            )
        deadline = time.monotonic() + 10
        while True:
            first = out.read_text(errors="replace").split("\n", 1)
            if len(first) == 2:
                break
            if self.process.poll() is not None:
                raise RuntimeError(f"dolores exited with {self.process.returncode}: {err.read_text(errors='replace')}")
            if time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError(f"dolores did not start in 10 s: {err.read_text(errors='replace')}")
            time.sleep(0.02)
        line = first[0]
        marker = "listening on "
        if marker not in line:
            raise RuntimeError(f"unexpected first line from dolores: {line!r}")
        self.url = line.split(marker, 1)[1].split()[0].rstrip("/")
        # The URL carries the base path when the server has one.
        self.port = int(urllib.parse.urlsplit(self.url).port or 0)
        return self

    def kill(self) -> None:
        """kill -9: no flush, no goodbye."""
        self._signal(signal.SIGKILL)

    def stop(self) -> Optional[int]:
        """SIGTERM: a clean shutdown; returns the exit code."""
        return self._signal(signal.SIGTERM)

    def _signal(self, sig: int) -> Optional[int]:
        process = self.process
        if process is None or process.poll() is not None:
            return None if process is None else process.returncode
        process.send_signal(sig)
        try:
            return process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait(5)

    def restart(self) -> None:
        """Starts again on the same port and data dir (the port may take a moment to be
        free after a kill)."""
        deadline = time.monotonic() + 10
        while True:
            try:
                self.start()
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(Path(self._tmp).glob("stderr-*")))


class Collector:
    """Runs ``listener`` (a ``Listener``) in a thread and collects its events."""

    def __init__(self, listener: Any) -> None:
        self.listener = listener
        self.events: List[Any] = []
        self.error: Optional[BaseException] = None
        self._queue: "queue.Queue[Any]" = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for event in self.listener:
                self.events.append(event)
                self._queue.put(event)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            self.error = e
            self._queue.put(e)

    def next(self, timeout: float = WAIT) -> Any:
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no event within {timeout} s (got {self.events})") from None
        if isinstance(item, BaseException):
            raise item
        return item

    def take(self, n: int, timeout: float = WAIT) -> List[Any]:
        deadline = time.monotonic() + timeout
        return [self.next(max(0.01, deadline - time.monotonic())) for _ in range(n)]

    def quiet(self, seconds: float) -> None:
        """Asserts that nothing more comes for ``seconds``."""
        try:
            item = self._queue.get(timeout=seconds)
        except queue.Empty:
            return
        raise AssertionError(f"unexpected {item!r}")

    def failure(self, timeout: float = WAIT) -> BaseException:
        """Waits for the listener to raise, and returns what it raised."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                item = self._queue.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"the listener did not fail within {timeout} s") from None
            if isinstance(item, BaseException):
                return item

    def close(self) -> None:
        self.listener.close()
        self._thread.join(10)
        assert not self._thread.is_alive(), "the listener did not stop"


class Forwarder:
    """A TCP pass-through to ``127.0.0.1:target_port`` that can be cut: ``cut()`` ends
    every connection through it and refuses new ones until ``restore()`` — a network
    drop, for one browser only."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(64)
        self.port = int(self._server.getsockname()[1])
        self.blocked = False
        self._sockets: set = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                downstream, _ = self._server.accept()
            except OSError:
                return
            if self.blocked:
                downstream.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                downstream.close()
                continue
            with self._lock:
                self._sockets.update((downstream, upstream))
            for a, b in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with self._lock:
            self._sockets.discard(source)
            self._sockets.discard(sink)
        source.close()

    def cut(self) -> None:
        self.blocked = True
        with self._lock:
            sockets = list(self._sockets)
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def restore(self) -> None:
        self.blocked = False

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._server.close()
