"""Prometheus metrics (served at /metrics). Labels carry no PHI and are bounded:
facility codes come from the configuration ("unknown" otherwise), ACK codes
from a fixed set."""
from functools import cache

from prometheus_client import Counter, Gauge, Histogram

RECEIVED = Counter(
    "exchange_messages_received_total", "Messages received over MLLP", ["facility"]
)
ACKS = Counter("exchange_acks_total", "ACKs sent, by MSA-1 code ('none' for inbound ACKs)", ["code"])
DUPLICATES = Counter("exchange_duplicates_total", "Resent messages answered with the stored ACK")
PENDING = Gauge("exchange_intake_pending", "Messages waiting for the writer thread")
BATCH_SIZE = Histogram(
    "exchange_commit_batch_size",
    "Messages per group commit",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
COMMIT_SECONDS = Histogram(
    "exchange_commit_seconds",
    "Time to store and commit one batch",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
)
COMMIT_FAILURES = Counter(
    "exchange_commit_failures_total", "Messages that could not be committed (no ACK sent)"
)
ACK_LATENCY = Histogram(
    "exchange_ack_latency_seconds",
    "From a frame's arrival to its ACK being ready",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
)
CONNECTIONS = Gauge("exchange_mllp_connections", "Open MLLP connections")
FRAMING_ERRORS = Counter(
    "exchange_mllp_framing_errors_total", "Connections closed for framing errors", ["kind"]
)
DISCARDED_BYTES = Counter(
    "exchange_mllp_discarded_bytes_total", "Bytes outside MLLP frames that were skipped"
)


# Labelled children, looked up once: .labels() costs microseconds per call.
@cache
def received(facility: str):
    return RECEIVED.labels(facility=facility)


@cache
def acks(code: str):
    return ACKS.labels(code=code)
