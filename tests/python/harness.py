"""The pieces every Python test uses: the real dolores binary on a free port, restartable
on the same port and data dir (each run with its own connection pool, up once it answers
``/healthz``, its log in every failure), a listener run in a thread, and a TCP
pass-through that can be cut and can count requests."""

from __future__ import annotations

import atexit
import os
import queue
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable, List, Optional

import httpx

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


class ServerFailed(AssertionError):
    """A harness call that failed, or a server that misbehaved; the message carries the
    server's log (every run's stderr), so a failure says what the server saw."""


class _NotUp(RuntimeError):
    """One start attempt that did not come up (``restart()`` tries again)."""


class DoloresServer:
    """One ``dolores serve`` process at a time. ``restart()`` comes back on the same
    port with the same data dir; ``kill()`` is kill -9.

    Each run (each process) gets its own HTTP connection pool, ``http``, closed when the
    run is killed or stopped, so no connection of a dead run is ever reused. A run is
    up once ``/healthz`` answers through that pool while its process is alive: that is
    when ``start()`` and ``restart()`` return. ``request()`` and ``get_json()`` go
    through it and raise ``ServerFailed`` with the server's log. ``close()`` fails the
    test, with the log, when a run panicked, exited by itself, or exited non-zero other
    than by ``kill()``."""

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
        #: The current run's own connection pool (None between runs).
        self.http: Optional[httpx.Client] = None
        self._runs = 0
        self._ended_by_us = False
        self._exit_noted = False
        self._problems: List[str] = []

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
        """Starts a run and returns once it answers ``/healthz``."""
        try:
            self._start_once(time.monotonic() + 10)
        except _NotUp as e:
            raise self.failure(f"dolores did not start: {e}") from None
        return self

    def restart(self) -> None:
        """Starts again on the same port and data dir, once the last run has ended (the
        port may take a moment to be free after a kill); returns once it answers."""
        if self.process is not None and self.process.poll() is None:
            raise self.failure("restart() while the server still runs: kill() or stop() it first")
        self._note_exit()
        deadline = time.monotonic() + 10
        while True:
            try:
                self._start_once(deadline)
                return
            except _NotUp as e:
                if time.monotonic() > deadline:
                    raise self.failure(f"dolores did not come back within 10 s: {e}") from None
                time.sleep(0.1)

    def _start_once(self, deadline: float) -> None:
        self._runs += 1
        run = self._runs
        out = Path(self._tmp) / f"stdout-{run}"
        err = Path(self._tmp) / f"stderr-{run}"
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            process = spawn(self.command(), stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, env=clean_env())
        try:
            url = self._first_line(process, out, deadline)
            http = httpx.Client(base_url=url, timeout=10)
            try:
                self._wait_healthy(process, http, deadline)
            except BaseException:
                http.close()
                raise
        except BaseException:
            # A run that did not come up is no run of the server's: it goes quietly
            # (its stderr stays in the log).
            if process.poll() is None:
                process.kill()
            process.wait(5)
            raise
        self.process, self.http, self.url = process, http, url
        # The URL carries the base path when the server has one.
        self.port = int(urllib.parse.urlsplit(url).port or 0)
        self._ended_by_us = False
        self._exit_noted = False

    @staticmethod
    def _first_line(process: subprocess.Popen, out: Path, deadline: float) -> str:
        while True:
            first = out.read_text(errors="replace").split("\n", 1)
            if len(first) == 2:
                break
            if process.poll() is not None:
                raise _NotUp(f"it exited with {process.returncode} before listening")
            if time.monotonic() > deadline:
                raise _NotUp("it printed no address")
            time.sleep(0.02)
        marker = "listening on "
        if marker not in first[0]:
            raise _NotUp(f"unexpected first line: {first[0]!r}")
        return first[0].split(marker, 1)[1].split()[0].rstrip("/")

    @staticmethod
    def _wait_healthy(process: subprocess.Popen, http: httpx.Client, deadline: float) -> None:
        last = "no answer yet"
        while True:
            if process.poll() is not None:
                raise _NotUp(f"it exited with {process.returncode} before answering /healthz ({last})")
            try:
                response = http.get("/healthz", timeout=2)
                if response.status_code == 200 and process.poll() is None:
                    return
                last = f"/healthz answered {response.status_code}: {response.text[:200]}"
            except httpx.HTTPError as e:
                last = f"/healthz: {e!r}"
            if time.monotonic() > deadline:
                raise _NotUp(f"no healthy answer in time ({last})")
            time.sleep(0.02)

    # ---- requests through the run's own pool -------------------------------------------

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request to ``path`` (under the server's URL) through this run's own
        pool, whatever its status; raises ``ServerFailed`` when no answer comes."""
        process, http = self.process, self.http
        if process is None or http is None or process.poll() is not None:
            code = None if process is None else process.returncode
            raise self.failure(f"{method} {path}: the server is not running (exit code {code})")
        try:
            return http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise self.failure(f"{method} {path} failed: {e!r}") from e

    def get_json(self, path: str, **kwargs: Any) -> Any:
        """``GET path``, which must answer 200 with JSON."""
        response = self.request("GET", path, **kwargs)
        if response.status_code != 200:
            raise self.failure(f"GET {path} answered {response.status_code}: {response.text[:500]}")
        try:
            return response.json()
        except ValueError:
            raise self.failure(f"GET {path} answered something not JSON: {response.text[:500]!r}") from None

    # ---- ending runs ---------------------------------------------------------------------

    def kill(self) -> None:
        """kill -9: no flush, no goodbye."""
        self._signal(signal.SIGKILL)

    def stop(self) -> Optional[int]:
        """SIGTERM: a clean shutdown; returns the exit code."""
        return self._signal(signal.SIGTERM)

    def _signal(self, sig: int) -> Optional[int]:
        process = self.process
        if self.http is not None:
            self.http.close()
            self.http = None
        if process is None:
            return None
        if process.poll() is not None:
            self._note_exit()
            return process.returncode
        self._ended_by_us = True
        process.send_signal(sig)
        try:
            code = process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait(5)
            self._problems.append(f"run {self._runs} did not exit within 10 s of {signal.Signals(sig).name}")
        if sig != signal.SIGKILL and code != 0:
            self._problems.append(f"run {self._runs} exited with {code} after {signal.Signals(sig).name}")
        self._exit_noted = True
        return code

    def _note_exit(self) -> None:
        """Records a run that ended without being asked to."""
        process = self.process
        if process is None or self._exit_noted or process.poll() is None:
            return
        self._exit_noted = True
        if not self._ended_by_us:
            self._problems.append(f"run {self._runs} exited by itself with {process.returncode}")

    def close(self) -> None:
        """Stops the server; fails (with the log) if any run misbehaved."""
        try:
            self.stop()
            for err in sorted(Path(self._tmp).glob("stderr-*")):
                if "panicked" in err.read_text(errors="replace"):
                    self._problems.append(f"{err.name.replace('stderr-', 'run ')} panicked")
            if self._problems:
                raise self.failure("dolores misbehaved: " + "; ".join(self._problems))
        finally:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def log(self) -> str:
        """Every run's stderr, oldest first."""
        return "".join(p.read_text(errors="replace") for p in self._stderr_files())

    def _stderr_files(self) -> List[Path]:
        return sorted(Path(self._tmp).glob("stderr-*"), key=lambda p: int(p.name.split("-")[1]))

    def failure(self, message: str) -> ServerFailed:
        """``ServerFailed(message)`` with each run's stderr (the last 4000 characters
        of each) appended."""
        parts = [message]
        for err in self._stderr_files():
            text = err.read_text(errors="replace")
            if len(text) > 4000:
                text = "…" + text[-4000:]
            parts.append(f"---- dolores {err.name.replace('stderr-', 'run ')} stderr ----\n{text or '(empty)'}")
        return ServerFailed("\n".join(parts))


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


class RequestLines:
    """Reads what an HTTP/1.1 client sends on one connection, request after request
    (each head, then a body of its Content-Length), and hands each request line to
    ``record``. A chunked body or an upgrade (a WebSocket) ends the reading: what
    follows is no longer requests it can tell apart."""

    def __init__(self, record: Callable[[str], None]) -> None:
        self._record = record
        self._buffer = b""
        self._body_left = 0
        self._done = False

    def feed(self, data: bytes) -> None:
        if self._done:
            return
        self._buffer += data
        while True:
            if self._body_left:
                taken = min(self._body_left, len(self._buffer))
                self._buffer = self._buffer[taken:]
                self._body_left -= taken
                if self._body_left:
                    return
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self._buffer[:end].decode("latin-1").split("\r\n")
            self._buffer = self._buffer[end + 4 :]
            self._record(head[0])
            for field in head[1:]:
                name, _, value = field.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    self._body_left = int(value.strip())
                elif name in ("transfer-encoding", "upgrade"):
                    self._done = True
                    return


class Forwarder:
    """A TCP pass-through to ``127.0.0.1:target_port`` that can be cut: ``cut()`` ends
    every connection through it and refuses new ones until ``restore()`` — a network
    drop, for one browser only. With ``record_requests``, ``requests`` lists the request
    line of every HTTP/1.1 request that went through (``"GET /listen/u?… HTTP/1.1"``):
    what the server was asked, counted on the wire."""

    def __init__(self, target_port: int, *, record_requests: bool = False) -> None:
        self.target_port = target_port
        self.record_requests = record_requests
        self.requests: List[str] = []
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
            requests = RequestLines(self._record) if self.record_requests else None
            threading.Thread(target=self._pump, args=(downstream, upstream, requests), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, downstream, None), daemon=True).start()

    def _record(self, line: str) -> None:
        with self._lock:
            self.requests.append(line)

    def _pump(self, source: socket.socket, sink: socket.socket, requests: Optional[RequestLines]) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if requests is not None:
                    requests.feed(data)
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
