"""Baseline target: python-hl7's asyncio MLLP server, parse and ACK, store nothing.

This is what a Python user would otherwise reach for. ``readmessage()``
already returns an ``hl7.Message`` (it calls ``hl7.parse`` itself), so the
handler only builds the ACK with ``create_ack()``.

    python -m bench.intake.baseline --port 2575
"""
from __future__ import annotations

import argparse
import asyncio
import signal

import hl7
from hl7.mllp import start_hl7_server

IDLE_TIMEOUT = 120.0  # seconds a connection may sit idle before it is closed


async def handle(reader, writer) -> None:
    try:
        while True:
            async with asyncio.timeout(IDLE_TIMEOUT):
                message: hl7.Message = await reader.readmessage()
            writer.writemessage(message.create_ack())
            async with asyncio.timeout(IDLE_TIMEOUT):
                await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
        pass
    finally:
        writer.close()


async def serve(host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await start_hl7_server(handle, host, port)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
