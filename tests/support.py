"""Running the real exchange as a process, and talking MLLP to it, for
end-to-end tests. Real sockets on loopback, port 0, no sleeps beyond
polling for start-up."""
from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"  # 99 public HL7 v2 messages, tests/corpus/SOURCES.md

START, END = b"\x0b", b"\x1c\x0d"

DEMO_FACILITIES = """
[[facility]]
code = "GENHOSP"
name = "General Hospital"
kind = "hospital"
authority = "GENHOSP"

[[facility]]
code = "OAKNH"
name = "Oakwood Nursing Home"
kind = "nursing_home"
authority = "OAKNH"

[[facility]]
code = "HHCARE"
name = "Sunrise Home Health"
kind = "home_health"
authority = "HHCARE"
"""


def write_config(directory: Path, *, mllp='"tcp:0:interface=127.0.0.1"', server_extra="", facilities=DEMO_FACILITIES,
                 database: str | None = None) -> Path:
    """A configuration file in ``directory`` (its database: a SQLite file there unless given)."""
    path = directory / "exchange.toml"
    database = database or f"sqlite:///{directory / 'exchange.db'}"
    path.write_text(
        f"""[server]
mllp = {mllp}
http = "tcp:0:interface=127.0.0.1"
database = "{database}"
{server_extra}
{facilities}"""
    )
    return path


@dataclass
class ExchangeProcess:
    config: Path
    database: str
    proc: subprocess.Popen | None = None
    mllp: list[tuple[str, int]] = field(default_factory=list)
    http: tuple[str, int] | None = None
    output: list[str] = field(default_factory=list)

    def start(self, timeout: float = 60) -> "ExchangeProcess":
        self.mllp, self.http, self.output = [], None, []
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("EXCHANGE_DATABASE_URL", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "exchange.cli", "serve", "--config", str(self.config), "--database", self.database],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self._lines: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        while self.http is None:
            line = self._readline(deadline)
            if line is None:
                self.kill()
                raise RuntimeError("exchange did not start:\n" + "".join(self.output))
            m = re.search(r"MLLP listening on ([\d.]+):(\d+)", line)
            if m:
                self.mllp.append((m[1], int(m[2])))
            m = re.search(r"HTTP on http://([\d.]+):(\d+)", line)
            if m:
                self.http = (m[1], int(m[2]))
        return self

    def expect(self, pattern: str, timeout: float = 30) -> re.Match:
        """The first line printed (already or from now on) that matches ``pattern``."""
        for line in self.output:
            if m := re.search(pattern, line):
                return m
        deadline = time.monotonic() + timeout
        while (line := self._readline(deadline)) is not None:
            if m := re.search(pattern, line):
                return m
        raise AssertionError(f"the exchange never printed {pattern!r}:\n" + "".join(self.output))

    def _readline(self, deadline: float) -> str | None:
        """The next line the server printed, or None if it exited or the deadline passed."""
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None and self._lines.empty():
                    return None
                continue
            if line is None:
                return None
            self.output.append(line)
            return line
        return None

    def _pump(self) -> None:
        for raw in iter(self.proc.stdout.readline, b""):
            self._lines.put(raw.decode("utf-8", "replace"))
        self._lines.put(None)

    @property
    def address(self) -> tuple[str, int]:
        return self.mllp[0]

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 30) -> int:
        assert self.proc
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._reader.join(10)
        while not self._lines.empty():
            line = self._lines.get()
            if line is not None:
                self.output.append(line)
        return code

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                self.terminate(30)
            except subprocess.TimeoutExpired:
                self.kill()


class MLLPConnection:
    """A blocking MLLP peer for tests that need raw control (bytes, timing)."""

    def __init__(self, address: tuple[str, int], timeout: float = 30) -> None:
        self.sock = socket.create_connection(address, timeout=timeout)
        self.buffer = b""

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, payload: bytes) -> None:
        self.sock.sendall(START + payload + END)

    def read_frame(self) -> bytes:
        while END not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed")
            self.buffer += chunk
        frame, self.buffer = self.buffer.split(END, 1)
        return frame[frame.index(START) + 1 :]

    def request(self, payload: bytes) -> bytes:
        self.send(payload)
        return self.read_frame()

    def expect_silence(self, seconds: float = 0.5) -> bool:
        """True if nothing arrives within ``seconds`` (e.g. no ACK for an ACK)."""
        self.sock.settimeout(seconds)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            return True
        finally:
            self.sock.settimeout(30)
        self.buffer += chunk
        return False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def msa(ack: bytes) -> list[str]:
    """The MSA fields of an ACK: [MSA-1, MSA-2, MSA-3, ...]."""
    text = ack.decode("latin-1")
    sep = text[3]
    for segment in re.split(r"\r\n|\r|\n", text):
        if segment.startswith("MSA"):
            return segment.split(sep)[1:]
    raise AssertionError(f"no MSA segment in {ack!r}")


def adt(control_id: str, *, facility: str = "GENHOSP", event: str = "A01", version: str = "2.5.1",
        processing: str = "P", mrn: str = "100001", extra: str = "") -> bytes:
    """A small synthetic ADT message (no real patient)."""
    return (
        f"MSH|^~\\&|ADT|{facility}|EXCHANGE|EXCHANGE|20261127120000||ADT^{event}^ADT_A01|{control_id}|{processing}|{version}{extra}\r"
        f"EVN|{event}|20261127120000\r"
        f"PID|1||{mrn}^^^{facility}^MR||TESTPATIENT^ALPHA^Q||19700101|F|||1 MAIN ST^^SPRINGFIELD^IL^62701||555-0100\r"
        f"PV1|1|I|W1^101^A||||||||||||||||V{control_id}\r"
    ).encode()


def new_message(
    control_id: str | None = "MSG-1",
    *,
    facility: str | None = "GENHOSP",
    application: str = "ADT",
    version: str = "2.5.1",
    received_at=None,
    peer: str = "127.0.0.1:50123",
    **overrides,
):
    """A stored-message row (exchange.store.messages.NewMessage) for store and
    API tests: an accepted synthetic ADT^A01 with its AA."""
    from datetime import datetime, timezone

    from exchange.outcome import MessageState
    from exchange.store.messages import NewMessage

    cid = (control_id or "").encode()
    f, a, v = (facility or "").encode(), application.encode(), version.encode()
    fields = dict(
        raw=b"MSH|^~\\&|" + a + b"|" + f + b"|EXCHANGE|EXCHANGE|20261127120000||ADT^A01^ADT_A01|" + cid
        + b"|P|" + v + b"\rPID|1||100001^^^" + f + b"^MR||TESTPATIENT^ALPHA\r",
        received_at=received_at or datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc),
        facility=facility,
        control_id=control_id,
        sending_application=application,
        message_type="ADT",
        event="A01",
        structure="ADT_A01",
        version=version,
        processing_id="P",
        state=MessageState.ACCEPTED,
        ack_code="AA",
        ack=b"MSH|^~\\&|EXCHANGE|EXCHANGE|" + a + b"|" + f + b"|20261127120000||ACK^A01^ACK|X1|P|" + v
        + b"\rMSA|AA|" + cid + b"\r",
        reason=None,
        peer=peer,
        dedup=True,
    )
    fields.update(overrides)
    return NewMessage(**fields)


def api_request(server: "ExchangeProcess", database_url: str, method: str, path: str, body: dict | None = None,
                role: str = "technician") -> dict:
    """One call to the running exchange's HTTP API with a fresh bearer token of ``role``."""
    import json
    import urllib.request
    import uuid
    from datetime import datetime, timezone

    from sqlalchemy import create_engine

    from exchange.auth import create_token

    engine = create_engine(database_url)
    try:
        with engine.begin() as conn:
            token = create_token(conn, f"{role}-{uuid.uuid4().hex[:8]}", role, datetime.now(timezone.utc))
    finally:
        engine.dispose()
    host, port = server.http
    request = urllib.request.Request(f"http://{host}:{port}{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.load(r)


def delivery_config(destinations=("GENHOSP", "OAKNH", "HHCARE"), routes=()):
    """A running configuration (exchange.config.Config) whose facilities are ``destinations``
    ({code: deliver_to}, or codes: a placeholder endpoint), each subscribing to the default
    ADT^* and MDM^*: the copies tests queue by hand (reason "default", ADT or MDM) are
    still routed under it when the outbox checks them again."""
    from pathlib import Path

    from exchange.config import Config, FacilityConfig, ServerConfig

    if not isinstance(destinations, dict):
        destinations = {code: "127.0.0.1:1" for code in destinations}
    return Config(
        server=ServerConfig(mllp=("tcp:0:interface=127.0.0.1",), http="tcp:0:interface=127.0.0.1"),
        facilities=tuple(FacilityConfig(code=code, name=code, kind="hospital", authority=code, deliver_to=endpoint)
                         for code, endpoint in destinations.items()),
        path=Path("exchange.toml"),
        routes=tuple(routes),
    )
