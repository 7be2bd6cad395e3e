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
COMMIT_IN_FLIGHT = Gauge(
    "exchange_commit_in_flight_seconds",
    "How long the commit in flight has taken (0 when none is; /healthz says stalled from 30 s)",
)
STALE_SESSIONS_ENDED = Counter(
    "exchange_stale_sessions_ended_total",
    "PostgreSQL sessions of a stopped node, silent while holding locks, that this node ended",
    ["role"],
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


# -- delivery of routed copies (exchange.delivery); destination codes come from the configuration
DELIVERY_ATTEMPTS = Counter(
    "exchange_delivery_attempts_total",
    "Copies sent to a destination, by outcome: delivered (AA/CA), failed (AE/AR/CE/CR),"
    " timeout, connection (refused, lost, broken), protocol (no MSA, wrong MSA-2)",
    ["destination", "outcome"],
)
DELIVERY_QUEUE = Gauge(
    "exchange_delivery_queue_depth", "Copies queued for a destination (the outbox, all nodes)", ["destination"]
)
DELIVERY_LATENCY = Histogram(
    "exchange_delivery_latency_seconds",
    "From a copy's commit in the outbox (just before the inbound ACK) to the destination's AA/CA",
    ["destination"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0),
)
DELIVERY_SERVING = Gauge(
    "exchange_delivery_serving",
    "1 while this node delivers a destination's copies (holds its lock), else 0",
    ["destination"],
)


@cache
def delivery_attempts(destination: str, outcome: str):
    return DELIVERY_ATTEMPTS.labels(destination=destination, outcome=outcome)


@cache
def delivery_latency(destination: str):
    return DELIVERY_LATENCY.labels(destination=destination)
MATCH_DECISIONS = Counter(
    "exchange_match_decisions_total", "Patient index decisions about new or changed records", ["action"]
)
COPIES_QUEUED = Counter("exchange_copies_queued_total", "Copies routed to a facility and queued", ["destination"])
