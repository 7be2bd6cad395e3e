"""Receiving systems written by others, standing in for the facilities'
interface engines, each in a thread of the test process on a loopback port:

- ``Hl7Peer``: python-hl7's asyncio MLLP server (``hl7.mllp.start_hl7_server``);
  it keeps connections open and ACKs with ``Message.create_ack``. Per copy,
  ``answer(control_id, times_seen)`` may say "AE", "wrong-msa2" or "silent"
  instead of AA; while ``gate`` is cleared it reads copies but holds its answers.
- ``HL7apyPeer``: hl7apy's ``MLLPServer`` (one message per connection, then it
  hangs up); its handler parses each copy with hl7apy and builds the ACK with
  hl7apy's ``Message``.

Both record the MSH-10 of every copy they receive, in arrival order.
"""
from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable

import hl7
import hl7.mllp
from hl7apy.core import Message as HL7apyMessage
from hl7apy.mllp import AbstractHandler, MLLPServer
from hl7apy.parser import parse_message


def free_port() -> int:
    """A loopback port nobody listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Hl7Peer:
    def __init__(
        self,
        port: int = 0,
        answer: Callable[[str, int], str] = lambda control_id, seen: "AA",
        delay: float = 0.0,
        ssl_context=None,
    ) -> None:
        self.port = port
        self.ssl_context = ssl_context  # TLS (with verify_mode CERT_REQUIRED: mutual TLS)
        self.client_subjects: list[str] = []  # the CN of each client certificate, per connection
        self.answer = answer
        self.delay = delay
        self.received: list[str] = []
        self.connections = 0
        self.lock = threading.Lock()
        self.gate = threading.Event()  # cleared: copies are read but not answered until it is set
        self.gate.set()
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "Hl7Peer":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "python-hl7 server did not start"
        if self._error:
            raise self._error
        return self

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        try:
            self._server = self._loop.run_until_complete(
                hl7.mllp.start_hl7_server(self._client, "127.0.0.1", self.port, ssl=self.ssl_context)
            )
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self._error = exc
            self._ready.set()
            return
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        self._loop.close()

    async def _client(self, reader, writer) -> None:
        certificate = writer.get_extra_info("peercert")
        with self.lock:
            self.connections += 1
            if certificate:
                subject = dict(item for rdn in certificate["subject"] for item in rdn)
                self.client_subjects.append(subject.get("commonName", ""))
        try:
            while True:
                message = await reader.readmessage()
                control_id = str(message.segment("MSH")(10))
                with self.lock:
                    seen = self.received.count(control_id)
                    self.received.append(control_id)
                action = self.answer(control_id, seen)
                self.gate.wait(30)  # blocks this peer's loop: it is one destination
                if self.delay:
                    await asyncio.sleep(self.delay)
                if action == "silent":
                    continue  # no answer: the sender must time out and drop the connection
                ack = str(message.create_ack("AE" if action == "AE" else "AA", message_id=f"R{control_id}"))
                if action == "AE":
                    ack = ack.replace(f"MSA|AE|{control_id}", f"MSA|AE|{control_id}|MRN not on file")
                elif action == "wrong-msa2":
                    ack = ack.replace(f"MSA|AA|{control_id}", "MSA|AA|SOMETHING-ELSE")
                writer.writeblock(ack.encode())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def stop(self) -> None:
        if self._loop is None or self._server is None:
            return

        async def shutdown() -> None:
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._server.wait_closed()
            self._loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop)
        self._thread.join(10)


class _HL7apyHandler(AbstractHandler):
    def __init__(self, message: str, peer: "HL7apyPeer") -> None:
        super().__init__(message)
        self.peer = peer

    def reply(self) -> str:
        incoming = parse_message(self.incoming_message, find_groups=False)
        control_id = incoming.msh.msh_10.value
        with self.peer.lock:
            self.peer.received.append(control_id)
        ack = HL7apyMessage("ACK", version="2.5")
        ack.msh.msh_3 = "HH-ENGINE"
        ack.msh.msh_4 = incoming.msh.msh_6.value
        ack.msh.msh_5 = incoming.msh.msh_3.value
        ack.msh.msh_6 = incoming.msh.msh_4.value
        ack.msh.msh_7 = time.strftime("%Y%m%d%H%M%S")
        ack.msh.msh_9 = "ACK^A01^ACK"
        ack.msh.msh_10 = f"R{control_id}"
        ack.msh.msh_11 = "P"
        ack.msa.msa_1 = "AA"
        ack.msa.msa_2 = control_id
        return ack.to_mllp()


class HL7apyPeer:
    def __init__(self, message_type: str = "ADT^A01^ADT_A01") -> None:
        self.received: list[str] = []
        self.lock = threading.Lock()
        self.server = MLLPServer("127.0.0.1", 0, {message_type: (_HL7apyHandler, self)}, timeout=10)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "HL7apyPeer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
