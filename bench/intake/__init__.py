"""Intake benchmark: ``.venv/bin/python -m bench.intake [--targets ...] [-n N] [--check]``.

- ``messages``: synthetic ADT^A01/A04/A08 v2.5.1 messages (no real patients).
- ``client``: the load client, asyncio raw streams, run in its own process.
- ``baseline``: python-hl7's asyncio MLLP server that parses and ACKs.
- ``runner``: starts each target, drives the client, samples RSS, prints the table.
"""
