"""A receiving facility for the pipeline benchmark: python-hl7's asyncio MLLP server.

Stands in for a facility's interface engine: it reads each routed copy
(``hl7.mllp.start_hl7_server``'s stream reader), answers AA with MSA-2 = the
copy's MSH-10, and records for every copy its MSH-10, when it arrived
(``time.perf_counter_ns``, CLOCK_MONOTONIC on Linux: the load client's clock)
and the wall-clock time. Runs in a process of its own, started by
``bench/pipeline.py``, so that it does not take the load client's GIL.

By default it reads each copy as bytes (``readblock``) and takes MSH-10 with a
split, as a lean engine would; ``--parse`` makes it parse every copy with
``hl7.parse`` and answer with ``Message.create_ack``, like the baseline.

On SIGTERM it writes what it received to ``--out`` (a pickle
``{"control_ids": [...], "received_ns": array, "acked_ns": array,
"received_wall": array}``) and exits.

    python -m bench.pipeline_peer --port 3576 --out peer.pickle [--parse]
"""
from __future__ import annotations

import argparse
import array
import asyncio
import pickle
import signal
import time

import hl7
from hl7.mllp import start_hl7_server

IDLE_TIMEOUT = 600.0


class Recorder:
    def __init__(self, name: str) -> None:
        self.name = name.encode("ascii")
        self.control_ids: list[str] = []
        self.received_ns = array.array("q")
        self.acked_ns = array.array("q")
        self.received_wall = array.array("d")

    def raw_ack(self, block: bytes, _reader=None) -> tuple[str, bytes]:
        """(MSH-10, an AA ACK) of a copy read as bytes."""
        msh = block.split(b"\r", 1)[0]
        sep = msh[3:4] or b"|"
        fields = msh.split(sep)
        control_id = fields[9] if len(fields) > 9 else b""
        version = fields[11] if len(fields) > 11 else b"2.5.1"
        ack = b"".join((
            b"MSH|^~\\&|RECV|", self.name, b"|", fields[2] if len(fields) > 2 else b"", b"|",
            fields[3] if len(fields) > 3 else b"", b"|",
            time.strftime("%Y%m%d%H%M%S").encode(), b"||ACK|R", control_id, b"|P|", version,
            b"\rMSA|AA|", control_id, b"\r"))
        return control_id.decode("ascii", "replace"), ack

    @staticmethod
    def parsed_ack(block: bytes, reader) -> tuple[str, bytes]:
        """(MSH-10, ``Message.create_ack("AA")``) of a copy parsed with ``hl7.parse``, as the baseline does."""
        message = hl7.parse(block.decode(reader.encoding, reader.encoding_errors))
        ack = message.create_ack("AA")
        return str(message.segment("MSH")(10)), str(ack).encode(reader.encoding, reader.encoding_errors)

    async def handle(self, reader, writer, answer) -> None:
        """Answer each copy with ``answer(block, reader) -> (control_id, ack)`` and record its times."""
        clock = time.perf_counter_ns
        try:
            while True:
                async with asyncio.timeout(IDLE_TIMEOUT):
                    block = await reader.readblock()
                t0, wall = clock(), time.time()
                control_id, ack = answer(block, reader)
                writer.writeblock(ack)
                self.record(control_id, t0, clock(), wall)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()

    def record(self, control_id: str, received: int, acked: int, wall: float) -> None:
        self.control_ids.append(control_id)
        self.received_ns.append(received)
        self.acked_ns.append(acked)
        self.received_wall.append(wall)

    def dump(self, path: str) -> None:
        with open(path, "wb") as f:
            pickle.dump({"control_ids": self.control_ids, "received_ns": self.received_ns,
                         "acked_ns": self.acked_ns, "received_wall": self.received_wall}, f,
                        protocol=pickle.HIGHEST_PROTOCOL)


async def serve(args) -> None:
    recorder = Recorder(args.name)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    answer = recorder.parsed_ack if args.parse else recorder.raw_ack

    async def handler(reader, writer) -> None:
        await recorder.handle(reader, writer, answer)

    server = await start_hl7_server(handler, args.host, args.port)
    async with server:
        await stop.wait()
    recorder.dump(args.out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="RECV", help="MSH-4 of its ACKs (the facility's code)")
    parser.add_argument("--out", required=True, help="where to write what it received, at SIGTERM")
    parser.add_argument("--parse", action="store_true",
                        help="parse every copy with hl7.parse and ACK with create_ack")
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
