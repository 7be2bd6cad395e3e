"""The configuration file: ``config/exchange.toml`` read into frozen values.

``load_config(path)`` reads and validates the whole file up front, so a bad
file stops the exchange before anything listens. Every problem is a
:class:`ConfigError` whose ``str`` is one line naming the file, the key and
the reason::

    config/exchange.toml: facility[2].kind: must be one of hospital, ... (got 'spaceship')

``facility[N]`` counts the ``[[facility]]`` tables from 1, in file order,
``route[N]`` the ``[[route]]`` tables (explicit routing rules, read into
:class:`RouteConfig`; the facility keys for routed copies are documented in
``config/exchange.toml`` and used by :mod:`exchange.routing`).

The database URL is taken from, in order: the ``database`` argument (the
``--database`` flag), the ``EXCHANGE_DATABASE_URL`` environment variable,
``server.database`` in the file, and finally ``sqlite:///var/exchange.db``.
A relative SQLite path (``sqlite:///var/exchange.db``, three slashes) is
relative to the current working directory of the process, not to the
configuration file; ``sqlite:////abs/path.db`` (four slashes) is absolute.

Endpoint strings are checked here without listening or connecting: the
type prefix, the port, the keywords the type understands and, for ``ssl:``,
that the key and certificate files exist and load. ``caCertsDir=DIR`` (or
``caCerts=FILE``) on an ``ssl:`` server endpoint is our extension, served by
``exchange.mllp.tls`` (stock Twisted does not accept it): clients must then
present a certificate signed by one of those CA certificates (mutual TLS).

Plain values only: importing this module does not start or need a reactor.
"""
from __future__ import annotations

import dataclasses

import codecs
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exchange.acceptance import matches
from exchange.mapping.events import DEFAULT_MAX_DOCUMENT_BYTES, FacilityContext

__all__ = [
    "Config",
    "ConfigError",
    "DEFAULT_DATABASE",
    "DEFAULT_TRUST",
    "FACILITY_KINDS",
    "FacilityConfig",
    "RECONCILE_JOBS",
    "ROUTING_VERSIONS",
    "RouteConfig",
    "Schedule",
    "ServerConfig",
    "WorkbenchConfig",
    "facility_contexts",
    "load_config",
    "matches_any",
    "parse_schedule",
    "resolve_charset",
]

DEFAULT_DATABASE = "sqlite:///var/exchange.db"
DATABASE_ENV = "EXCHANGE_DATABASE_URL"
DEFAULT_PATTERNS = ("ADT^*", "MDM^*")
DEFAULT_ACCEPT = (*DEFAULT_PATTERNS, "QBP^Q23")  # and IHE PIX queries (exchange.pix)

FACILITY_KINDS = ("hospital", "nursing_home", "home_health", "clinic", "pharmacy", "lab", "other")
# The person's best view (exchange.store.reviews): each field's value comes from the
# record of the most trusted facility kind (most trusted first), the most recent among them.
DEFAULT_TRUST = ("hospital", "nursing_home", "home_health")
PROCESSING_IDS = ("P", "T", "D")
# Reconciliation jobs (exchange.jobs) and when `exchange serve` runs them unless
# [server.reconcile] says otherwise: an interval, a cron expression (local time) or "off".
RECONCILE_JOBS = ("consistency", "match-model", "links")
_INTERVAL_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h|d)")
_INTERVAL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
LOG_LEVELS = ("debug", "info", "warn", "error", "critical")

# HL7 delimiters and whitespace may not appear in codes copied into MSH fields.
_CODE_RE = re.compile(r"[^\s|^~\\&]+")
_PATTERN_RE = re.compile(r"[A-Z0-9*]+\^[A-Z0-9*]+")
# A subscription may name a TXA-2 document type as a third part: MDM^T02^DS.
_SUBSCRIPTION_RE = re.compile(r"[A-Z0-9*]+\^[A-Z0-9*]+(?:\^[A-Z0-9*]+)?")
_FINGERPRINT_RE = re.compile(r"[0-9a-f]{64}")

_TOP_KEYS = ("server", "facility", "route", "workbench")
_SERVER_KEYS = (
    "mllp",
    "http",
    "database",
    "processing_id",
    "accept",
    "max_frame_bytes",
    "max_document_bytes",
    "idle_timeout",
    "application",
    "facility_id",
    "batch_max",
    "batch_gather",
    "max_pending",
    "log_level",
    "delivery_timeout",
    "retry_initial",
    "retry_max",
    "delivery_poll",
    "stale_session",
    "person_authority",
    "trust",
    "reconcile",
)
_FACILITY_KEYS = (
    "code",
    "name",
    "kind",
    "authority",
    "deliver_to",
    "subscribe",
    "charset",
    "tls_subject",
    "tls_fingerprint",
    "application",
    "exclude_documents",
    "receive_confidentiality",
    "keep_source_identifiers",
    "keep_z_segments",
    "version",
)
_WORKBENCH_KEYS = ("session_idle", "session_max", "login_attempts", "lockout")
_ROUTE_KEYS = (
    "name",
    "messages",
    "from",
    "from_kind",
    "patient_class",
    "document_type",
    "to",
    "to_kind",
    "allow_without_record",
)
# HL7 versions a destination may ask its copies in (``version``): those whose
# PID-3 is a CX with an identifier type code (2.3 on) and that hl7apy knows.
ROUTING_VERSIONS = ("2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.8", "2.8.1", "2.8.2")

# Keywords each server endpoint type understands (Twisted's parsers, plus
# caCertsDir/caCerts for ssl, see exchange.mllp.tls); the first one may be
# given without its name (tcp:2575, unix:/run/exchange.sock).
_ENDPOINT_KEYWORDS = {
    "tcp": ("port", "interface", "backlog"),
    "tcp6": ("port", "interface", "backlog"),
    "unix": ("address", "mode", "backlog", "lockfile"),
    "ssl": (
        "port",
        "interface",
        "backlog",
        "privateKey",
        "certKey",
        "sslmethod",
        "extraCertChain",
        "dhParameters",
        "caCertsDir",
        "caCerts",
    ),
}


class ConfigError(Exception):
    """A configuration problem; ``str(error)`` is one line: file, key, reason."""

    def __init__(self, path: str | os.PathLike[str], key: str, reason: str) -> None:
        self.path = str(path)
        self.key = key
        self.reason = reason
        where = f"{self.path}: {key}: " if key else f"{self.path}: "
        super().__init__(" ".join(f"{where}{reason}".split()))


@dataclass(frozen=True, slots=True)
class FacilityConfig:
    """One site of the network (a ``[[facility]]`` table)."""

    code: str  # MSH-4.1 (namespace id) it sends as
    name: str
    kind: str  # one of FACILITY_KINDS
    authority: str  # PID-3.4 assigning authority of its MRNs
    deliver_to: str | None = None  # client endpoint string for routed copies
    subscribe: tuple[str, ...] = DEFAULT_PATTERNS  # TYPE^EVENT patterns, '*' wildcard
    charset: str = "utf-8"  # Python codec: decodes its messages without MSH-18; every copy to it is encoded with it
    tls_subject: str | None = None  # expected client certificate subject (CN)
    tls_fingerprint: str | None = None  # expected SHA-256 of its certificate, 64 lowercase hex
    # -- routed copies (exchange.routing) --
    application: str | None = None  # MSH-5 of its copies (MSH-6 is its code); None: MSH-5 empty
    exclude_documents: tuple[str, ...] = ()  # TXA-2 document types it never receives (upper case)
    # TXA-18 statuses beyond usual control it may receive (upper case): "R", "V", ... (exchange.routing)
    receive_confidentiality: tuple[str, ...] = ()
    keep_source_identifiers: bool = False  # keep the sender's PID-2/3/4/18 and MRG-2/3/4 in its copies
    keep_z_segments: bool = False  # keep Z-segments in its copies
    version: str | None = None  # HL7 version its copies are rewritten to (one of ROUTING_VERSIONS)

    def wants(self, message_type: str, event: str) -> bool:
        """Whether a ``message_type^event`` matches one of its subscriptions
        (a document-type part ``MDM^T02^DS`` is ignored here; exchange.routing matches it)."""
        return matches_any(self.subscribe, message_type, event)


@dataclass(frozen=True, slots=True)
class Schedule:
    """When `exchange serve` runs a reconciliation job: every ``seconds``, on a
    ``cron`` expression (minute hour day month weekday, local time), or never."""

    text: str  # as written in the file
    seconds: float | None = None
    cron: str | None = None

    @property
    def off(self) -> bool:
        return self.seconds is None and self.cron is None


MAX_SECONDS = 365 * 24 * 3600  # no interval, timeout or wait in the configuration is longer than a year


def parse_schedule(text: str) -> Schedule:
    """``"30m"``, ``"1h"``, ``"24h"``, ``"7d"``, ``"90s"``; ``"0 3 * * *"`` (cron); ``"off"``.
    Raises ValueError with the reason."""
    value = text.strip()
    if value.lower() == "off":
        return Schedule(text)
    m = _INTERVAL_RE.fullmatch(value.lower())
    if m:
        seconds = float(m[1]) * _INTERVAL_UNITS[m[2]]
        if seconds < 1:
            raise ValueError(f"an interval must be at least 1s (got {text!r})")
        if seconds > MAX_SECONDS:
            raise ValueError(f"an interval must be at most 365d (got {text!r})")
        return Schedule(text, seconds=seconds)
    if len(value.split()) == 5:
        from apscheduler.triggers.cron import CronTrigger  # imported here: only needed to validate

        try:
            CronTrigger.from_crontab(value)
        except ValueError as e:
            raise ValueError(f"bad cron expression {text!r}: {e}") from None
        return Schedule(text, cron=value)
    raise ValueError(
        f'must be an interval such as "30m", "1h" or "7d", a cron expression such as "0 3 * * *", '
        f'or "off" (got {text!r})'
    )


# What parse_schedule gives for "1h" and "0 3 * * *" (built directly: importing this
# module must stay cheap, and the cron check imports APScheduler).
DEFAULT_SCHEDULES = (
    ("consistency", Schedule("1h", seconds=3600.0)),
    ("match-model", Schedule("0 3 * * *", cron="0 3 * * *")),
    ("links", Schedule("30 3 * * *", cron="30 3 * * *")),
)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """The ``[server]`` table."""

    mllp: tuple[str, ...]  # Twisted server endpoint strings
    http: str  # Twisted server endpoint string of the workbench and API
    database: str = DEFAULT_DATABASE  # SQLAlchemy URL, after the precedence rules
    processing_ids: tuple[str, ...] = ("P",)  # accepted MSH-11.1 values (TOML key processing_id)
    accept: tuple[str, ...] = DEFAULT_ACCEPT  # accepted TYPE^EVENT patterns
    max_frame_bytes: int = 16 * 1024 * 1024
    max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES  # 16 MiB: largest MDM document content applied (else AE, OBX-5)
    idle_timeout: float = 300.0  # seconds without bytes before a connection is closed; 0 disables
    application: str = "EXCHANGE"  # MSH-3 of our ACKs when the sender left MSH-5 empty
    facility_name: str = "EXCHANGE"  # MSH-4 of our ACKs when MSH-6 was empty (TOML key facility_id)
    batch_max: int = 500  # max messages per group commit
    batch_gather: float = 0.002  # seconds a batch may wait for the senders just answered (0: never waits)
    max_pending: int = 5000  # messages waiting for the writer before connections are paused
    log_level: str = "info"
    # -- delivery of routed copies (exchange.delivery) --
    delivery_timeout: float = 30.0  # seconds to connect to a destination, and to wait for each ACK
    retry_initial: float = 1.0  # seconds before the first retry of a copy not delivered
    retry_max: float = 300.0  # longest wait between retries (the wait doubles up to it, with jitter)
    delivery_poll: float = 2.0  # seconds between looks at the outbox without a wake-up (other nodes' copies, lock take-over)
    # PostgreSQL: seconds a node's session may wait for its client inside a transaction before any
    # node ends it (a stopped node's locks); a delivery session holding a destination, outside one,
    # this + 2 x delivery_timeout + delivery_poll (db.end_stale_sessions)
    stale_session: float = 60.0
    person_authority: str = "EXCHANGE"  # CX.4 of the enterprise person id in routed copies' PID-3 (type PI)
    trust: tuple[str, ...] = DEFAULT_TRUST  # facility kinds, most trusted first (the person's best view)
    reconcile: tuple[tuple[str, Schedule], ...] = DEFAULT_SCHEDULES  # (job, when), every job of RECONCILE_JOBS

    def schedule(self, job: str) -> Schedule:
        return dict(self.reconcile)[job]

    def accepts(self, message_type: str, event: str) -> bool:
        return matches_any(self.accept, message_type, event)


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """One explicit routing rule (a ``[[route]]`` table); see exchange.routing.rules.

    Every condition given must match (an empty tuple matches anything); the
    destinations are the facilities in ``to`` plus those of a kind in ``to_kind``.
    """

    name: str  # unique; recorded as the reason ("why") of each copy it adds
    messages: tuple[str, ...] = ()  # TYPE^EVENT patterns of the event
    from_codes: tuple[str, ...] = ()  # sending facility codes (TOML key from)
    from_kinds: tuple[str, ...] = ()  # sending facility kinds (TOML key from_kind)
    patient_classes: tuple[str, ...] = ()  # PV1-2 values (TOML key patient_class)
    document_types: tuple[str, ...] = ()  # TXA-2 values (TOML key document_type)
    to_codes: tuple[str, ...] = ()  # destination facility codes (TOML key to)
    to_kinds: tuple[str, ...] = ()  # destination facility kinds (TOML key to_kind)
    allow_without_record: bool = False  # may a destination with no record of the person receive?


@dataclass(frozen=True, slots=True)
class WorkbenchConfig:
    """The ``[workbench]`` table: login sessions and lock-out (exchange.accounts.Policy)."""

    session_idle: float = 1800.0  # seconds a session may go unused before it is over (30 min)
    session_max: float = 43200.0  # seconds after the login when any session is over (12 h)
    login_attempts: int = 5  # failed logins in a row that lock the user out ...
    lockout: float = 900.0  # ... for this many seconds (15 min)


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig
    facilities: tuple[FacilityConfig, ...]
    path: Path
    routes: tuple[RouteConfig, ...] = ()  # the [[route]] tables, in file order
    workbench: WorkbenchConfig = WorkbenchConfig()  # the [workbench] table
    text: str = ""  # the file as read: what a child process (a scheduled job) must run with

    def facility(self, code: str) -> FacilityConfig | None:
        """The facility whose code is ``code`` (MSH-4.1), or None."""
        for facility in self.facilities:
            if facility.code == code:
                return facility
        return None


SNAPSHOT_PREFIX = "exchange-config-"


def write_snapshot(config: Config) -> str | None:
    """A private copy (mode 600, in the temp directory) of the file as this process read it,
    for the child processes it starts (the writer, the scheduled jobs): they must run with the
    configuration this server runs, not with whatever the file says when they (re)start. The
    caller removes it; the name carries this process's id, so that copies left by a process
    that was killed are removed by the next one. None for a configuration not read from a file."""
    import tempfile

    if not config.text:
        return None
    _remove_stale_snapshots(tempfile.gettempdir())
    fd, name = tempfile.mkstemp(prefix=f"{SNAPSHOT_PREFIX}{os.getpid()}-", suffix=".toml")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(config.text)
    return name


def _remove_stale_snapshots(directory: str) -> None:
    """Remove this user's snapshots whose process is gone (kill -9 leaves them behind)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if not (name.startswith(SNAPSHOT_PREFIX) and name.endswith(".toml")):
            continue
        pid = name[len(SNAPSHOT_PREFIX):].split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive (or not ours to ask about)
        except ProcessLookupError:
            pass
        except OSError:
            continue
        path = os.path.join(directory, name)
        try:
            if os.stat(path).st_uid == os.getuid():
                os.unlink(path)
        except OSError:
            pass


def facility_contexts(config: Config) -> dict[str, FacilityContext]:
    """What the record-model mapping needs of each facility, by its code (MSH-4.1)."""
    authorities = {f.authority for f in config.facilities} | {config.server.person_authority}
    return {
        f.code: FacilityContext(f.code, f.authority, max_document_bytes=config.server.max_document_bytes,
                                foreign_authorities=frozenset(authorities - {f.authority}))
        for f in config.facilities
    }


def matches_any(patterns: tuple[str, ...], message_type: str, event: str) -> bool:
    """Whether ``message_type^event`` matches one of ``patterns`` ('*' is a wildcard),
    by the acceptance rules' own matcher (patterns are upper case once loaded)."""
    message_type, event = message_type.upper(), event.upper()
    return any(matches(pattern, message_type, event) for pattern in patterns)


def resolve_charset(name: str) -> str:
    """The canonical Python codec name for an HL7 MSH-18 or a Python charset name.

    HL7 names (table 0211: "8859/1", "UNICODE UTF-8", ...) are looked up with
    ``exchange.hl7.charset.codec_for``, anything else with ``codecs.lookup``.
    Raises LookupError when nothing resolves, ValueError when the codec is
    not ASCII-compatible (UTF-16/32 cannot be a default: MSH is read as bytes).
    """
    from exchange.hl7.charset import ascii_compatible, codec_for

    codec = codecs.lookup(codec_for(name) or name.strip()).name
    if not ascii_compatible(codec):
        raise ValueError(f"{codec} is not ASCII-compatible")
    return codec


def load_config(
    path: str | os.PathLike[str],
    *,
    database: str | None = None,
    environ: Mapping[str, str] = os.environ,
) -> Config:
    """Read and validate the configuration file; raise ConfigError on any problem."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(path, "", "file not found") from None
    except IsADirectoryError:
        raise ConfigError(path, "", "is a directory, not a file") from None
    except OSError as e:
        raise ConfigError(path, "", f"cannot read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(path, "", f"not UTF-8 (byte {e.start})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, "", f"TOML syntax error: {e}") from None
    return dataclasses.replace(_Reader(path).config(data, database, environ), text=text)


class _Reader:
    """Walks the parsed TOML; every check names its key."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, reason: str) -> ConfigError:
        return ConfigError(self.path, key, reason)

    # -- the file ---------------------------------------------------------

    def config(self, data: dict[str, Any], database: str | None, environ: Mapping[str, str]) -> Config:
        for key in data:
            if key not in _TOP_KEYS:
                raise self.fail(key, "unknown key (expected [server], [[facility]], [[route]] and [workbench] tables)")
        if "server" not in data:
            raise self.fail("server", "missing required table [server]")
        server = data["server"]
        if not isinstance(server, dict):
            raise self.fail("server", f"must be a table [server] (got {_kind(server)})")
        facilities = data.get("facility")
        if facilities is None or facilities == []:
            raise self.fail("facility", "no facilities configured (add at least one [[facility]] table)")
        if not isinstance(facilities, list) or not all(isinstance(f, dict) for f in facilities):
            raise self.fail("facility", "must be an array of tables, written [[facility]]")
        routes = data.get("route", [])
        if not isinstance(routes, list) or not all(isinstance(r, dict) for r in routes):
            raise self.fail("route", "must be an array of tables, written [[route]]")
        workbench = data.get("workbench", {})
        if not isinstance(workbench, dict):
            raise self.fail("workbench", f"must be a table [workbench] (got {_kind(workbench)})")
        parsed = self.facilities(facilities)
        server_config = self.server(server, database, environ)
        person_authority = server_config.person_authority.casefold()
        owners: dict[str, str] = {}
        for number, facility in enumerate(parsed, start=1):
            if person_authority in (facility.authority.casefold(), facility.code.casefold()):
                # a routed copy's PID-3 carries the person id under person_authority: a site would
                # read it as one of its own (or this facility's) MRNs
                raise self.fail("server.person_authority", f"{server_config.person_authority!r} is also the"
                                f" authority or code of facility[{number}]: choose one no site uses")
            other = owners.setdefault(facility.authority.casefold(), facility.code)
            if other != facility.code:
                # an MRN names one patient only with its authority: a PIX query, or a copy's PID-3,
                # could not tell whose MRN it is (authorities are compared without case)
                raise self.fail(f"facility[{number}].authority", f"{facility.authority!r} is also the authority of"
                                f" facility {other!r}: each site's MRNs need an authority of their own")
        return Config(
            server=server_config,
            facilities=parsed,
            path=self.path,
            routes=self.routes(routes, parsed),
            workbench=self.workbench(workbench),
        )

    def workbench(self, table: dict[str, Any]) -> WorkbenchConfig:
        """``[workbench]``: session lifetimes and the lock-out after failed logins."""
        self.no_unknown_keys(table, _WORKBENCH_KEYS, "workbench")
        defaults = WorkbenchConfig()
        idle = self.seconds(table, "session_idle", "workbench.session_idle", defaults.session_idle)
        longest = self.seconds(table, "session_max", "workbench.session_max", defaults.session_max)
        if longest < idle:
            raise self.fail(
                "workbench.session_max",
                f"must be at least workbench.session_idle ({idle:g}) (got {longest:g})",
            )
        return WorkbenchConfig(
            session_idle=idle,
            session_max=longest,
            login_attempts=self.integer(
                table, "login_attempts", "workbench.login_attempts", defaults.login_attempts, minimum=1
            ),
            lockout=self.seconds(table, "lockout", "workbench.lockout", defaults.lockout),
        )

    def server(self, table: dict[str, Any], database: str | None, environ: Mapping[str, str]) -> ServerConfig:
        self.no_unknown_keys(table, _SERVER_KEYS, "server")
        defaults = ServerConfig(mllp=(), http="")
        mllp = self.strings(table, "mllp", "server.mllp", required=True)
        if not mllp:
            raise self.fail("server.mllp", "must name at least one endpoint")
        for i, description in enumerate(mllp):
            key = "server.mllp" if isinstance(table["mllp"], str) else f"server.mllp[{i + 1}]"
            self.server_endpoint(key, description)
        http = self.string(table, "http", "server.http", required=True)
        self.server_endpoint("server.http", http)
        ports: dict[tuple[str, str], str] = {}
        for i, description in enumerate((*mllp, http)):
            key = "server.http" if i == len(mllp) else "server.mllp" if len(mllp) == 1 else f"server.mllp[{i + 1}]"
            port = _listening_port(description)
            if port is None or port[0] == "0":  # 0: any free port, a different one each
                continue
            for (other_port, interface), other in ports.items():
                if other_port == port[0] and (interface == port[1] or "" in (interface, port[1])):
                    raise self.fail(key, f"port {port[0]} is {other}'s too: each endpoint needs its own port")
            ports[port] = key
        processing_ids = self.strings(table, "processing_id", "server.processing_id") or defaults.processing_ids
        for pid in processing_ids:
            if pid not in PROCESSING_IDS:
                raise self.fail(
                    "server.processing_id", f"must be P, T or D (MSH-11.1) (got {pid!r})"
                )
        log_level = self.string(table, "log_level", "server.log_level") or defaults.log_level
        if log_level.lower() == "warning":
            log_level = "warn"
        if log_level.lower() not in LOG_LEVELS:
            raise self.fail(
                "server.log_level", f"must be one of {', '.join(LOG_LEVELS)} (got {log_level!r})"
            )
        return ServerConfig(
            mllp=mllp,
            http=http,
            database=self.database(table, database, environ),
            processing_ids=tuple(dict.fromkeys(processing_ids)),
            accept=self.patterns(table, "accept", "server.accept", defaults.accept),
            max_frame_bytes=self.integer(table, "max_frame_bytes", "server.max_frame_bytes", defaults.max_frame_bytes, minimum=1024),
            max_document_bytes=self.integer(
                table, "max_document_bytes", "server.max_document_bytes", defaults.max_document_bytes, minimum=1
            ),
            idle_timeout=self.number(table, "idle_timeout", "server.idle_timeout", defaults.idle_timeout),
            application=self.code(table, "application", "server.application") or defaults.application,
            facility_name=self.code(table, "facility_id", "server.facility_id") or defaults.facility_name,
            batch_max=self.integer(table, "batch_max", "server.batch_max", defaults.batch_max, minimum=1),
            batch_gather=self.batch_gather(table, defaults.batch_gather),
            max_pending=self.integer(table, "max_pending", "server.max_pending", defaults.max_pending, minimum=1),
            log_level=log_level.lower(),
            **self.delivery(table, defaults),
            stale_session=self.seconds(table, "stale_session", "server.stale_session", defaults.stale_session),
            person_authority=self.code(table, "person_authority", "server.person_authority")
            or defaults.person_authority,
            trust=self.trust(table, defaults.trust),
            reconcile=self.reconcile(table),
        )

    def reconcile(self, table: dict[str, Any]) -> tuple[tuple[str, Schedule], ...]:
        """``server.reconcile``: job name -> when `exchange serve` runs it (the others keep their default)."""
        given = table.get("reconcile", {})
        if not isinstance(given, dict):
            raise self.fail(
                "server.reconcile", f"must be a table of job = schedule, e.g. [server.reconcile] (got {_kind(given)})"
            )
        for name in given:
            if name not in RECONCILE_JOBS:
                raise self.fail(f"server.reconcile.{name}", f"unknown job (known: {', '.join(RECONCILE_JOBS)})")
        out = []
        for name in RECONCILE_JOBS:
            key = f"server.reconcile.{name}"
            value = self.string(given, name, key)
            if value is None:
                out.append((name, dict(DEFAULT_SCHEDULES)[name]))
                continue
            try:
                out.append((name, parse_schedule(value)))
            except ValueError as e:
                raise self.fail(key, str(e)) from None
        return tuple(out)

    def trust(self, table: dict[str, Any], default: tuple[str, ...]) -> tuple[str, ...]:
        """``server.trust``: facility kinds, most trusted first; each once."""
        if "trust" not in table:
            return default
        if not isinstance(table["trust"], list):
            raise self.fail("server.trust", f"must be a list of facility kinds (got {_kind(table['trust'])})")
        kinds = self.strings(table, "trust", "server.trust")
        if not kinds:
            raise self.fail("server.trust", "must name at least one facility kind")
        for i, kind in enumerate(kinds):
            if kind not in FACILITY_KINDS:
                raise self.fail(f"server.trust[{i + 1}]", f"must be one of {', '.join(FACILITY_KINDS)} (got {kind!r})")
            if kind in kinds[:i]:
                raise self.fail(f"server.trust[{i + 1}]", f"{kind!r} is listed twice")
        return kinds

    def facilities(self, tables: list[dict[str, Any]]) -> tuple[FacilityConfig, ...]:
        result: list[FacilityConfig] = []
        seen: dict[str, int] = {}
        for number, table in enumerate(tables, start=1):
            facility = self.facility(table, f"facility[{number}]")
            if facility.code in seen:
                raise self.fail(
                    f"facility[{number}].code",
                    f"duplicate facility code {facility.code!r} (also facility[{seen[facility.code]}])",
                )
            seen[facility.code] = number
            result.append(facility)
        return tuple(result)

    def facility(self, table: dict[str, Any], prefix: str) -> FacilityConfig:
        self.no_unknown_keys(table, _FACILITY_KEYS, prefix)
        code = self.code(table, "code", f"{prefix}.code", required=True)
        name = self.string(table, "name", f"{prefix}.name", required=True)
        if not name.strip():
            raise self.fail(f"{prefix}.name", "must not be empty")
        kind = self.string(table, "kind", f"{prefix}.kind", required=True)
        if kind not in FACILITY_KINDS:
            raise self.fail(
                f"{prefix}.kind", f"must be one of {', '.join(FACILITY_KINDS)} (got {kind!r})"
            )
        authority = self.code(table, "authority", f"{prefix}.authority", required=True)
        deliver_to = self.string(table, "deliver_to", f"{prefix}.deliver_to")
        if deliver_to is not None and not deliver_to.strip():
            raise self.fail(f"{prefix}.deliver_to", "must not be empty (leave the key out instead)")
        if deliver_to is not None:
            reason = check_client_endpoint(deliver_to)
            if reason:
                raise self.fail(f"{prefix}.deliver_to", reason)
        charset = self.string(table, "charset", f"{prefix}.charset")
        if charset is not None and not charset.strip():
            raise self.fail(f"{prefix}.charset", "must not be empty (leave the key out for utf-8)")
        if charset is not None:
            try:
                charset = resolve_charset(charset)
            except LookupError:
                raise self.fail(
                    f"{prefix}.charset",
                    f"unknown charset {charset!r} (use a Python codec name or an HL7 MSH-18 name such as 8859/1)",
                ) from None
            except ValueError as e:
                raise self.fail(f"{prefix}.charset", f"cannot be a default charset: {e}") from None
        tls_subject = self.string(table, "tls_subject", f"{prefix}.tls_subject")
        if tls_subject is not None and not tls_subject.strip():
            raise self.fail(f"{prefix}.tls_subject", "must not be empty (leave the key out instead)")
        fingerprint = self.string(table, "tls_fingerprint", f"{prefix}.tls_fingerprint")
        if fingerprint is not None:
            normalised = fingerprint.strip().lower()
            if normalised.startswith("sha256:"):
                normalised = normalised[len("sha256:"):]
            normalised = normalised.replace(":", "")
            if not _FINGERPRINT_RE.fullmatch(normalised):
                raise self.fail(
                    f"{prefix}.tls_fingerprint",
                    "must be a SHA-256 fingerprint: 64 hex digits, colons and a 'sha256:' prefix allowed",
                )
            fingerprint = normalised
        version = self.string(table, "version", f"{prefix}.version")
        if version is not None and version not in ROUTING_VERSIONS:
            raise self.fail(
                f"{prefix}.version", f"must be one of {', '.join(ROUTING_VERSIONS)} (got {version!r})"
            )
        return FacilityConfig(
            code=code,
            name=name,
            kind=kind,
            authority=authority,
            deliver_to=deliver_to,
            subscribe=self.patterns(
                table, "subscribe", f"{prefix}.subscribe", DEFAULT_PATTERNS, documents=True
            ),
            charset=charset or "utf-8",
            tls_subject=tls_subject,
            tls_fingerprint=fingerprint,
            application=self.code(table, "application", f"{prefix}.application"),
            exclude_documents=self.codes(table, "exclude_documents", f"{prefix}.exclude_documents"),
            receive_confidentiality=self.codes(table, "receive_confidentiality", f"{prefix}.receive_confidentiality"),
            keep_source_identifiers=self.boolean(
                table, "keep_source_identifiers", f"{prefix}.keep_source_identifiers"
            ),
            keep_z_segments=self.boolean(table, "keep_z_segments", f"{prefix}.keep_z_segments"),
            version=version,
        )

    def routes(
        self, tables: list[dict[str, Any]], facilities: tuple[FacilityConfig, ...]
    ) -> tuple[RouteConfig, ...]:
        result: list[RouteConfig] = []
        seen: dict[str, int] = {}
        codes = {f.code for f in facilities}
        for number, table in enumerate(tables, start=1):
            prefix = f"route[{number}]"
            route = self.route(table, prefix, codes)
            if route.name in seen:
                raise self.fail(
                    f"{prefix}.name", f"duplicate route name {route.name!r} (also route[{seen[route.name]}])"
                )
            seen[route.name] = number
            result.append(route)
        return tuple(result)

    def route(self, table: dict[str, Any], prefix: str, codes: set[str]) -> RouteConfig:
        self.no_unknown_keys(table, _ROUTE_KEYS, prefix)
        name = self.string(table, "name", f"{prefix}.name", required=True).strip()
        if not name:
            raise self.fail(f"{prefix}.name", "must not be empty")
        if name == "default":
            raise self.fail(f"{prefix}.name", "'default' is reserved for copies by subscription")

        def facilities(key: str) -> tuple[str, ...]:
            found = self.codes(table, key, f"{prefix}.{key}", upper=False)
            for i, code in enumerate(found):
                if code not in codes:
                    raise self.fail(f"{prefix}.{key}[{i + 1}]", f"unknown facility code {code!r}")
            return found

        def kinds(key: str) -> tuple[str, ...]:
            found = self.codes(table, key, f"{prefix}.{key}", upper=False)
            for i, kind in enumerate(found):
                if kind not in FACILITY_KINDS:
                    raise self.fail(
                        f"{prefix}.{key}[{i + 1}]",
                        f"must be one of {', '.join(FACILITY_KINDS)} (got {kind!r})",
                    )
            return found

        route = RouteConfig(
            name=name,
            messages=self.patterns(table, "messages", f"{prefix}.messages", ()),
            from_codes=facilities("from"),
            from_kinds=kinds("from_kind"),
            patient_classes=self.codes(table, "patient_class", f"{prefix}.patient_class"),
            document_types=self.codes(table, "document_type", f"{prefix}.document_type"),
            to_codes=facilities("to"),
            to_kinds=kinds("to_kind"),
            allow_without_record=self.boolean(table, "allow_without_record", f"{prefix}.allow_without_record"),
        )
        if not route.to_codes and not route.to_kinds:
            raise self.fail(f"{prefix}.to", "missing: name the destinations with to and/or to_kind")
        return route

    # -- single values ----------------------------------------------------

    def no_unknown_keys(self, table: dict[str, Any], allowed: tuple[str, ...], prefix: str) -> None:
        for key in table:
            if key not in allowed:
                raise self.fail(f"{prefix}.{key}", "unknown key")

    def string(self, table: dict[str, Any], name: str, key: str, *, required: bool = False) -> Any:
        if name not in table:
            if required:
                raise self.fail(key, "missing required key")
            return None
        value = table[name]
        if not isinstance(value, str):
            raise self.fail(key, f"must be a string (got {_kind(value)})")
        return value

    def strings(self, table: dict[str, Any], name: str, key: str, *, required: bool = False) -> tuple[str, ...]:
        """A string or a list of strings, as a tuple (empty when absent)."""
        if name not in table:
            if required:
                raise self.fail(key, "missing required key")
            return ()
        value = table[name]
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list):
            for i, item in enumerate(value):
                if not isinstance(item, str):
                    raise self.fail(f"{key}[{i + 1}]", f"must be a string (got {_kind(item)})")
            return tuple(value)
        raise self.fail(key, f"must be a string or a list of strings (got {_kind(value)})")

    def code(self, table: dict[str, Any], name: str, key: str, *, required: bool = False) -> Any:
        """A string copied into HL7 fields: no whitespace, no HL7 delimiters."""
        value = self.string(table, name, key, required=required)
        if value is not None and not _CODE_RE.fullmatch(value):
            raise self.fail(
                key, f"must be a non-empty code without spaces or any of | ^ ~ \\ & (got {value!r})"
            )
        return value

    def codes(self, table: dict[str, Any], name: str, key: str, *, upper: bool = True) -> tuple[str, ...]:
        """A list of codes (no spaces, no HL7 delimiters), upper-cased unless ``upper`` is false."""
        if name not in table:
            return ()
        if not isinstance(table[name], list):
            raise self.fail(key, f"must be a list of codes (got {_kind(table[name])})")
        values = self.strings(table, name, key)
        for i, value in enumerate(values):
            if not _CODE_RE.fullmatch(value):
                raise self.fail(
                    f"{key}[{i + 1}]",
                    f"must be a non-empty code without spaces or any of | ^ ~ \\ & (got {value!r})",
                )
        return tuple(dict.fromkeys(v.upper() if upper else v for v in values))

    def boolean(self, table: dict[str, Any], name: str, key: str) -> bool:
        if name not in table:
            return False
        value = table[name]
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false (got {_kind(value)})")
        return value

    def integer(self, table: dict[str, Any], name: str, key: str, default: int, *, minimum: int) -> int:
        if name not in table:
            return default
        value = table[name]
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"must be an integer (got {_kind(value)})")
        if value < minimum:
            raise self.fail(key, f"must be at least {minimum} (got {value})")
        return value

    def number(self, table: dict[str, Any], name: str, key: str, default: float) -> float:
        if name not in table:
            return default
        value = table[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(key, f"must be a number of seconds (got {_kind(value)})")
        if not 0 <= value < float("inf"):
            raise self.fail(key, f"must be 0 (disabled) or a positive number of seconds (got {value})")
        if value > MAX_SECONDS:
            raise self.fail(key, f"must be at most {MAX_SECONDS} seconds (a year) (got {value:g})")
        return float(value)

    def batch_gather(self, table: dict[str, Any], default: float) -> float:
        value = self.number(table, "batch_gather", "server.batch_gather", default)
        if value > 0.1:  # it delays ACKs: milliseconds, not seconds
            raise self.fail("server.batch_gather", f"must be at most 0.1 seconds (got {value:g})")
        return value

    def seconds(self, table: dict[str, Any], name: str, key: str, default: float) -> float:
        """A positive number of seconds (0 is not allowed: nothing to disable)."""
        if name not in table:
            return default
        value = table[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(key, f"must be a number of seconds (got {_kind(value)})")
        if not 0 < value < float("inf"):
            raise self.fail(key, f"must be a positive number of seconds (got {value})")
        if value > MAX_SECONDS:
            raise self.fail(key, f"must be at most {MAX_SECONDS} seconds (a year) (got {value:g})")
        return float(value)

    def delivery(self, table: dict[str, Any], defaults: ServerConfig) -> dict[str, float]:
        """The delivery worker's keys (exchange.delivery.policy.Settings)."""
        values = {
            name: self.seconds(table, name, f"server.{name}", getattr(defaults, name))
            for name in ("delivery_timeout", "retry_initial", "retry_max", "delivery_poll")
        }
        if values["retry_max"] < values["retry_initial"]:
            raise self.fail(
                "server.retry_max",
                f"must be at least server.retry_initial ({values['retry_initial']:g}) (got {values['retry_max']:g})",
            )
        return values

    def patterns(
        self, table: dict[str, Any], name: str, key: str, default: tuple[str, ...], *, documents: bool = False
    ) -> tuple[str, ...]:
        """TYPE^EVENT patterns; with ``documents``, MDM^EVENT^DOCTYPE (TXA-2) too."""
        if name not in table:
            return default
        value = table[name]
        if isinstance(value, str):
            raise self.fail(key, f'must be a list of TYPE^EVENT patterns, e.g. ["{value}"]')
        patterns = self.strings(table, name, key)
        result = []
        for i, pattern in enumerate(patterns):
            normalised = pattern.strip().upper()
            if documents and _SUBSCRIPTION_RE.fullmatch(normalised) and normalised.count("^") == 2:
                if not normalised.startswith("MDM^"):
                    raise self.fail(
                        f"{key}[{i + 1}]",
                        f"a document type (third part, TXA-2) only applies to MDM, e.g. MDM^T02^DS (got {pattern!r})",
                    )
            elif not _PATTERN_RE.fullmatch(normalised):
                example = " or MDM^T02^DS (TXA-2 document type)" if documents else ""
                raise self.fail(
                    f"{key}[{i + 1}]",
                    f"must look like TYPE^EVENT with * as a wildcard, e.g. ADT^A01 or MDM^*{example} (got {pattern!r})",
                )
            result.append(normalised)
        return tuple(dict.fromkeys(result))

    def database(self, table: dict[str, Any], argument: str | None, environ: Mapping[str, str]) -> str:
        if argument is not None:
            url, key = argument, "--database"
        elif environ.get(DATABASE_ENV):
            url, key = environ[DATABASE_ENV], DATABASE_ENV
        else:
            # Required: a server that quietly made a database of its own (relative to wherever it
            # was started) would acknowledge messages no other node, job or operator ever sees.
            url = self.string(table, "database", "server.database")
            key = "server.database"
            if url is None:
                raise self.fail(key, f"missing required key (or give --database, or set {DATABASE_ENV})")
        reason = check_database_url(url)
        if reason:
            raise self.fail(key, reason)
        return url

    # -- endpoint strings -------------------------------------------------

    def server_endpoint(self, key: str, description: str) -> None:
        """Check a Twisted server endpoint string without listening."""
        reason = check_server_endpoint(description)
        if reason:
            raise self.fail(key, f"{reason} in {description!r}")


def _listening_port(description: str) -> tuple[str, str] | None:
    """(port, interface) of a tcp:/ssl: server endpoint string; None for other kinds."""
    from exchange.mllp.tls import split_description  # imported here: only needed to validate

    kind, args, kwargs = split_description(description)
    if kind not in ("tcp", "ssl", "tcp6"):
        return None
    port = args[0] if args else kwargs.get("port")
    return (port.strip(), kwargs.get("interface", "").strip()) if port else None


def check_database_url(url: str) -> str | None:
    """Why ``url`` is not a database URL the exchange can use, or None."""
    if not (url.startswith("sqlite://") or url.startswith("postgresql")):
        return "must be an SQLAlchemy URL starting with sqlite:// or postgresql (e.g. sqlite:///var/exchange.db)"
    from sqlalchemy.engine import make_url  # imported here: only needed to validate

    try:
        parsed = make_url(url)
    except Exception as e:  # ArgumentError, ValueError: both mean "not a URL"
        return f"not a valid database URL: {e}"
    database = parsed.database or ""
    if parsed.get_backend_name() == "sqlite" and (
            database in ("", ":memory:") or ":memory:" in database or "mode=memory" in database
            or "memory" in str(parsed.query.get("mode", ""))):
        return "an in-memory SQLite database is lost on exit and not shared with the writer: give a file path"
    return None


def check_server_endpoint(description: str) -> str | None:
    """Why ``description`` is not a usable server endpoint string, or None.

    Reads (for ``ssl:``) the key and certificate files; opens no socket.
    """
    from twisted.internet.endpoints import _parse  # the strports tokenizer (escapes with '\\')

    if not description.strip():
        return "empty endpoint string"
    try:
        args, kwargs = _parse(description)
    except Exception as e:  # a malformed string: unbalanced escapes and such
        return f"cannot parse endpoint string: {e}"
    kind = args[0] if args else ""
    if kind not in _ENDPOINT_KEYWORDS:
        return f"endpoint type must be one of tcp, tcp6, ssl, unix (got {kind!r})"
    keywords = _ENDPOINT_KEYWORDS[kind]
    positional = args[1:]
    if len(positional) > 1:
        return f"too many positional values for {kind} (only the {keywords[0]} may be given without a name)"
    for name in kwargs:
        if name not in keywords:
            return f"{kind} endpoint does not understand {name!r} (known: {', '.join(keywords)})"
    if positional:
        if keywords[0] in kwargs:
            return f"{keywords[0]} given twice"
        kwargs[keywords[0]] = positional[0]
    if kind == "unix":
        if not kwargs.get("address"):
            return "unix endpoint needs a socket path, e.g. unix:/run/exchange.sock"
        return None
    port = kwargs.get("port")
    if port is None:
        return f"{kind} endpoint needs a port, e.g. {kind}:2575"
    if not (port.isascii() and port.isdigit()) or int(port) > 65535:
        return f"port must be a number from 0 to 65535 (got {port!r})"
    backlog = kwargs.get("backlog")
    if backlog is not None and not (backlog.isascii() and backlog.isdigit()):
        return f"backlog must be a number (got {backlog!r})"
    interface = kwargs.get("interface")
    if interface:
        family = 6 if kind == "tcp6" else 4
        try:
            address = ipaddress.ip_address(interface)
        except ValueError:
            address = None
        if address is None or address.version != family:
            return f"interface must be an IPv{family} address of this host (got {interface!r})"
    if kind == "ssl":
        return _check_tls_files(kwargs)
    return None


def check_client_endpoint(description: str) -> str | None:
    """Why ``description`` is not a usable ``deliver_to`` (``host:port`` or a Twisted
    client endpoint string), or None. Reads TLS files; opens no connection."""
    from twisted.internet.interfaces import IReactorPluggableNameResolver
    from zope.interface import implementer

    from exchange.mllp.client import client_endpoint  # Twisted, only to validate

    @implementer(IReactorPluggableNameResolver)
    class NoReactor:  # enough to build an endpoint, which is never used
        nameResolver = None

        def installNameResolver(self, resolver: Any) -> Any:
            return None

    try:
        client_endpoint(NoReactor(), description)
    except ValueError as e:
        text = str(e).rstrip(": ")
        return f"{text} (use host:port, or a client endpoint string such as tls:host=H:port=P:trustRoots=DIR)"
    return None


def _check_tls_files(kwargs: dict[str, str]) -> str | None:
    if "sslmethod" in kwargs:  # Twisted's legacy version pin: it would bypass exchange.mllp.tls
        return ("sslmethod is not supported: ssl: listeners take TLS 1.2 and newer with forward-secret"
                " AEAD suites only")
    private_key = kwargs.get("privateKey")
    if not private_key:
        return "ssl endpoint needs privateKey=FILE (PEM; certKey=FILE too unless the same file holds the certificate)"
    files = {"privateKey": private_key}
    for name in ("certKey", "extraCertChain", "dhParameters"):
        if kwargs.get(name):
            files[name] = kwargs[name]
    for name, file in files.items():
        if not os.path.isfile(file):
            return f"{name} file {file!r} does not exist"
        if not os.access(file, os.R_OK):
            return f"{name} file {file!r} is not readable"
    ca_dir = kwargs.get("caCertsDir")
    if ca_dir is not None:
        if not os.path.isdir(ca_dir):
            return f"caCertsDir {ca_dir!r} is not a directory"
        if not any(name.endswith(".pem") for name in os.listdir(ca_dir)):
            return f"caCertsDir {ca_dir!r} holds no *.pem CA certificate"
    ca_file = kwargs.get("caCerts")
    if ca_file is not None:
        if not os.path.isfile(ca_file):
            return f"caCerts file {ca_file!r} does not exist"
        if b"-----BEGIN CERTIFICATE-----" not in Path(ca_file).read_bytes():
            return f"caCerts file {ca_file!r} holds no PEM certificate"
    try:
        from twisted.internet import ssl

        cert_pem = Path(kwargs.get("certKey") or private_key).read_bytes()
        key_pem = Path(private_key).read_bytes()
        ssl.PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)
    except Exception as e:  # OpenSSL errors are lists of tuples; keep one line
        return f"cannot load the TLS key and certificate: {type(e).__name__}: {e}"
    return None


def _kind(value: object) -> str:
    names = {
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        list: "a list",
        dict: "a table",
    }
    return names.get(type(value), type(value).__name__)
