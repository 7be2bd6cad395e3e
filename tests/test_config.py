"""exchange.config: load_config, its defaults, precedence and every error."""
from __future__ import annotations

import datetime
import os
from pathlib import Path

import pytest

from exchange.config import (
    Config,
    ConfigError,
    FacilityConfig,
    ServerConfig,
    check_server_endpoint,
    facility_contexts,
    load_config,
    matches_any,
)

from exchange.mapping.events import FacilityContext

REPO = Path(__file__).resolve().parent.parent

MINIMAL = """\
[server]
mllp = "tcp:2575:interface=127.0.0.1"
http = "tcp:8080:interface=127.0.0.1"
database = "sqlite:///var/exchange.db"

[[facility]]
code = "GENHOSP"
name = "General Hospital"
kind = "hospital"
authority = "GENHOSP"
"""

FACILITY_2 = """
[[facility]]
code = "OAKNH"
name = "Oakwood Nursing Home"
kind = "nursing_home"
authority = "OAKNH"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exchange.toml"
    path.write_text(text, encoding="utf-8")
    return path


def load(tmp_path: Path, text: str, **kwargs) -> Config:
    kwargs.setdefault("environ", {})
    return load_config(write(tmp_path, text), **kwargs)


def error_of(tmp_path: Path, text: str, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(tmp_path / "exchange.toml") + ": ")
    return message.split(": ", 1)[1]


def with_server(extra: str) -> str:
    if extra.startswith("database ="):  # in place of MINIMAL's
        return MINIMAL.replace('database = "sqlite:///var/exchange.db"', extra, 1)
    return MINIMAL.replace("[server]\n", "[server]\n" + extra + "\n", 1)


def with_facility(extra: str) -> str:
    return MINIMAL + extra + "\n"


# -- the shipped file -------------------------------------------------------


def test_shipped_config_is_valid_and_has_the_demo_network():
    config = load_config(REPO / "config" / "exchange.toml", environ={})
    assert [(f.code, f.kind, f.authority) for f in config.facilities] == [
        ("GENHOSP", "hospital", "GENHOSP"),
        ("OAKNH", "nursing_home", "OAKNH"),
        ("HHCARE", "home_health", "HHCARE"),
    ]
    assert [f.name for f in config.facilities] == [
        "General Hospital",
        "Oakwood Nursing Home",
        "Sunrise Home Health",
    ]
    assert config.server.mllp == ("tcp:2575:interface=127.0.0.1",)
    assert config.server.http == "tcp:8080:interface=127.0.0.1"
    assert config.server.database == "sqlite:///var/exchange.db"
    assert config.facility("OAKNH").name == "Oakwood Nursing Home"


def test_shipped_config_documents_every_key():
    """Every key line (active or commented out) has a comment line above it."""
    lines = (REPO / "config" / "exchange.toml").read_text().splitlines()
    for i, line in enumerate(lines):
        stripped = line.lstrip("# ").strip()
        is_key = "=" in stripped and stripped.split("=", 1)[0].strip().isidentifier()
        if is_key and not line.startswith("#     ") and i > 0:
            assert lines[i - 1].startswith("#"), f"line {i + 1} has no comment above it: {line}"
    text = "\n".join(lines)
    for key in ("tls_subject", "tls_fingerprint", "deliver_to", "caCertsDir", "subscribe", "charset"):
        assert key in text
    assert "mutual TLS" in text


def test_shipped_config_commented_out_values_are_valid(tmp_path):
    """Uncommenting the optional keys gives a valid file too."""
    out = []
    for line in (REPO / "config" / "exchange.toml").read_text().splitlines():
        candidate = line[2:] if line.startswith("# ") else line
        key = candidate.split("=", 1)[0].strip()
        if "=" in candidate and key.isidentifier() and key not in ("mllp",):
            out.append(candidate)
        else:
            out.append(line)
    config = load(tmp_path, "\n".join(out))
    genhosp = config.facility("GENHOSP")
    assert genhosp.deliver_to == "127.0.0.1:3575"
    assert genhosp.tls_subject == "adt.genhosp.example"
    assert genhosp.tls_fingerprint == "00112233445566778899aabbccddeeff" * 2
    assert config.facility("OAKNH").subscribe == ("ADT^A01", "ADT^A02", "ADT^A03", "MDM^*")
    assert config.facility("OAKNH").charset == "iso8859-1"


# -- values and defaults ------------------------------------------------------


def test_minimal_file_gets_the_defaults(tmp_path):
    config = load(tmp_path, MINIMAL)
    assert config.server == ServerConfig(
        mllp=("tcp:2575:interface=127.0.0.1",),
        http="tcp:8080:interface=127.0.0.1",
        database="sqlite:///var/exchange.db",
        processing_ids=("P",),
        accept=("ADT^*", "MDM^*", "QBP^Q23"),
        max_frame_bytes=16 * 1024 * 1024,
        max_document_bytes=16 * 1024 * 1024,
        idle_timeout=300.0,
        application="EXCHANGE",
        facility_name="EXCHANGE",
        batch_max=500,
        batch_gather=0.002,
        max_pending=5000,
        log_level="info",
    )
    assert config.facilities == (
        FacilityConfig(code="GENHOSP", name="General Hospital", kind="hospital", authority="GENHOSP"),
    )
    facility = config.facilities[0]
    assert facility.subscribe == ("ADT^*", "MDM^*")
    assert facility.charset == "utf-8"
    assert facility.deliver_to is None and facility.tls_subject is None and facility.tls_fingerprint is None
    assert config.path == tmp_path / "exchange.toml"


def test_every_server_key(tmp_path):
    config = load(
        tmp_path,
        """\
[server]
mllp = ["tcp:2575:interface=127.0.0.1", "tcp6:2577:interface=\\\\:\\\\:1", "unix:/tmp/exchange.sock"]
http = "tcp:0"
database = "postgresql+psycopg://exchange@localhost/exchange"
processing_id = ["P", "T"]
accept = ["adt^a0*", "MDM^T02"]
max_frame_bytes = 1024
max_document_bytes = 1
idle_timeout = 0
application = "HUB"
facility_id = "HUBFAC"
batch_max = 10
batch_gather = 0
max_pending = 20
log_level = "DEBUG"

[[facility]]
code = "GENHOSP"
name = "General Hospital"
kind = "hospital"
authority = "GENHOSP"
deliver_to = "tls:host=adt.genhosp.example:port=2575"
subscribe = ["ADT^A01", "MDM^*"]
charset = "UNICODE UTF-8"
tls_subject = "adt.genhosp.example"
tls_fingerprint = "SHA256:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89"
""",
    )
    server = config.server
    assert server.mllp == ("tcp:2575:interface=127.0.0.1", "tcp6:2577:interface=\\:\\:1", "unix:/tmp/exchange.sock")
    assert server.http == "tcp:0"
    assert server.database == "postgresql+psycopg://exchange@localhost/exchange"
    assert server.processing_ids == ("P", "T")
    assert server.accept == ("ADT^A0*", "MDM^T02")
    assert (server.max_frame_bytes, server.idle_timeout, server.batch_max, server.max_pending) == (1024, 0.0, 10, 20)
    assert (server.application, server.facility_name, server.log_level) == ("HUB", "HUBFAC", "debug")
    assert server.max_document_bytes == 1
    assert server.batch_gather == 0.0
    facility = config.facility("GENHOSP")
    assert facility.deliver_to == "tls:host=adt.genhosp.example:port=2575"
    assert facility.subscribe == ("ADT^A01", "MDM^*")
    assert facility.charset == "utf-8"
    assert facility.tls_subject == "adt.genhosp.example"
    assert facility.tls_fingerprint == "abcdef0123456789" * 4


@pytest.mark.parametrize(
    "name, codec",
    [("8859/1", "iso8859-1"), ("UNICODE UTF-8", "utf-8"), ("latin-1", "iso8859-1"), ("cp1252", "cp1252"), ("ASCII", "ascii")],
)
def test_charset_resolves_to_a_python_codec(tmp_path, name, codec):
    config = load(tmp_path, with_facility(f'charset = "{name}"'))
    assert config.facilities[0].charset == codec


def test_facility_lookup(tmp_path):
    config = load(tmp_path, MINIMAL + FACILITY_2)
    assert config.facility("OAKNH").kind == "nursing_home"
    assert config.facility("NOPE") is None
    assert config.facility("genhosp") is None  # MSH-4.1 comparison is exact


def test_facility_contexts_carry_the_authority_and_the_document_limit(tmp_path):
    contexts = facility_contexts(load(tmp_path, with_server("max_document_bytes = 2048") + FACILITY_2))
    assert contexts == {
        "GENHOSP": FacilityContext("GENHOSP", "GENHOSP", max_document_bytes=2048,
                                   foreign_authorities=frozenset({"OAKNH", "EXCHANGE"})),
        "OAKNH": FacilityContext("OAKNH", "OAKNH", max_document_bytes=2048,
                                 foreign_authorities=frozenset({"GENHOSP", "EXCHANGE"})),
    }
    default = facility_contexts(load(tmp_path, MINIMAL))["GENHOSP"]
    assert default.max_document_bytes == 16 * 1024 * 1024


def test_processing_id_as_a_string(tmp_path):
    assert load(tmp_path, with_server('processing_id = "T"')).server.processing_ids == ("T",)


def test_idle_timeout_accepts_a_float(tmp_path):
    assert load(tmp_path, with_server("idle_timeout = 2.5")).server.idle_timeout == 2.5


def test_matches_any():
    assert matches_any(("ADT^*", "MDM^T0*"), "ADT", "A01")
    assert matches_any(("ADT^*", "MDM^T0*"), "MDM", "T02")
    assert not matches_any(("ADT^*", "MDM^T0*"), "MDM", "T11")
    assert not matches_any(("ADT^*",), "ORU", "R01")
    facility = FacilityConfig("X", "X", "lab", "X", subscribe=("ADT^A01",))
    assert facility.wants("ADT", "A01") and not facility.wants("ADT", "A03")


# -- database precedence ---------------------------------------------------------


def test_database_argument_beats_environment_beats_file(tmp_path):
    text = with_server('database = "sqlite:///from-file.db"')
    env = {"EXCHANGE_DATABASE_URL": "sqlite:///from-env.db"}
    assert load(tmp_path, text).server.database == "sqlite:///from-file.db"
    assert load(tmp_path, text, environ=env).server.database == "sqlite:///from-env.db"
    assert (
        load(tmp_path, text, environ=env, database="sqlite:///from-flag.db").server.database
        == "sqlite:///from-flag.db"
    )
    assert load(tmp_path, MINIMAL, environ={"EXCHANGE_DATABASE_URL": ""}).server.database == "sqlite:///var/exchange.db"


def test_a_file_without_server_database_needs_the_flag_or_the_environment(tmp_path):
    """Found by a contract audit: such a file started a server on sqlite:///var/exchange.db
    relative to wherever it was started (a node on a stray database of its own)."""
    text = MINIMAL.replace('database = "sqlite:///var/exchange.db"\n', "")
    assert error_of(tmp_path, text).startswith("server.database: missing required key")
    assert error_of(tmp_path, text, environ={"EXCHANGE_DATABASE_URL": ""}).startswith("server.database: missing")
    assert load(tmp_path, text, environ={"EXCHANGE_DATABASE_URL": "sqlite:///e.db"}).server.database == "sqlite:///e.db"
    assert load(tmp_path, text, database="sqlite:///f.db").server.database == "sqlite:///f.db"


def test_database_default_reads_the_real_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("EXCHANGE_DATABASE_URL", "sqlite:////tmp/env.db")
    assert load_config(write(tmp_path, MINIMAL)).server.database == "sqlite:////tmp/env.db"


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"database": "mysql://x/y"}, "--database"),
        ({"environ": {"EXCHANGE_DATABASE_URL": "oracle://x"}}, "EXCHANGE_DATABASE_URL"),
        ({"database": "postgresql+psycopg://u@h:notaport/db"}, "--database"),
    ],
)
def test_bad_database_url_names_where_it_came_from(tmp_path, kwargs, key):
    message = error_of(tmp_path, MINIMAL, **kwargs)
    assert message.startswith(f"{key}: ")


def test_bad_database_url_in_file(tmp_path):
    message = error_of(tmp_path, with_server('database = "var/exchange.db"'))
    assert message.startswith("server.database: must be an SQLAlchemy URL")


# -- errors ---------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml", environ={})
    assert str(info.value) == f"{tmp_path / 'nope.toml'}: file not found"


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path, environ={})


def test_unreadable_file(tmp_path, monkeypatch):
    path = write(tmp_path, MINIMAL)

    def refuse(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value) == f"{path}: cannot read: Permission denied"


def test_toml_syntax_error_names_the_line(tmp_path):
    message = error_of(tmp_path, MINIMAL + "\nthis is not toml\n")
    assert message.startswith("TOML syntax error: ")
    assert "(at line 12, column 6)" in message  # MINIMAL is 10 lines, then a blank one


def test_not_utf8(tmp_path):
    path = tmp_path / "exchange.toml"
    path.write_bytes(MINIMAL.encode() + b"# caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path, environ={})


@pytest.mark.parametrize(
    "text, expected",
    [
        # unknown keys
        ('colour = "blue"\n' + MINIMAL, "colour: unknown key"),
        (with_server('port = 2575'), "server.port: unknown key"),
        (MINIMAL + FACILITY_2 + 'colour = "blue"\n', "facility[2].colour: unknown key"),
        (with_facility('colour = "blue"'), "facility[1].colour: unknown key"),
        # missing required keys
        (MINIMAL.replace('mllp = "tcp:2575:interface=127.0.0.1"\n', ""), "server.mllp: missing required key"),
        (MINIMAL.replace('http = "tcp:8080:interface=127.0.0.1"\n', ""), "server.http: missing required key"),
        (MINIMAL.replace('database = "sqlite:///var/exchange.db"\n', ""),
         "server.database: missing required key (or give --database, or set EXCHANGE_DATABASE_URL)"),
        (MINIMAL.replace('code = "GENHOSP"\n', ""), "facility[1].code: missing required key"),
        (MINIMAL.replace('name = "General Hospital"\n', ""), "facility[1].name: missing required key"),
        (MINIMAL.replace('kind = "hospital"\n', ""), "facility[1].kind: missing required key"),
        (MINIMAL.replace('authority = "GENHOSP"\n', ""), "facility[1].authority: missing required key"),
        (MINIMAL.split("[[facility]]")[0], "facility: no facilities configured"),
        ("[[facility]]\ncode='X'\nname='X'\nkind='lab'\nauthority='X'\n", "server: missing required table"),
        # endpoint values
        (MINIMAL.replace('"tcp:2575:interface=127.0.0.1"', '"tcp:\u00b2"'), "server.mllp: port must be a number"),
        (MINIMAL.replace('"tcp:2575:interface=127.0.0.1"', '"tcp:2575:interface=999.1.1.1"'),
         "server.mllp: interface must be an IPv4 address of this host (got '999.1.1.1')"),
        # structure
        ('server = "tcp:2575"\n[[facility]]\ncode="X"', "server: must be a table"),
        (MINIMAL.split("[[facility]]")[0] + '[facility]\ncode = "X"\n', "facility: must be an array of tables"),
        # wrong types
        (MINIMAL.replace('"tcp:2575:interface=127.0.0.1"', "2575"), "server.mllp: must be a string or a list of strings (got an integer)"),
        (MINIMAL.replace('"tcp:2575:interface=127.0.0.1"', '["tcp:2575", 7]'), "server.mllp[2]: must be a string (got an integer)"),
        (MINIMAL.replace('"tcp:2575:interface=127.0.0.1"', "[]"), "server.mllp: must name at least one endpoint"),
        (MINIMAL.replace('"tcp:8080:interface=127.0.0.1"', '["tcp:8080"]'), "server.http: must be a string (got a list)"),
        (MINIMAL.replace('name = "General Hospital"', "name = 42"), "facility[1].name: must be a string (got an integer)"),
        (MINIMAL.replace('name = "General Hospital"', 'name = " "'), "facility[1].name: must not be empty"),
        (with_server('max_frame_bytes = "16M"'), "server.max_frame_bytes: must be an integer (got a string)"),
        (with_server("max_frame_bytes = true"), "server.max_frame_bytes: must be an integer (got a boolean)"),
        (with_server("max_frame_bytes = 100"), "server.max_frame_bytes: must be at least 1024 (got 100)"),
        (with_server('max_document_bytes = "16M"'), "server.max_document_bytes: must be an integer (got a string)"),
        (with_server("max_document_bytes = 1.5"), "server.max_document_bytes: must be an integer (got a number)"),
        (with_server("max_document_bytes = 0"), "server.max_document_bytes: must be at least 1 (got 0)"),
        (with_server("max_document_bytes = -1"), "server.max_document_bytes: must be at least 1 (got -1)"),
        (with_server("batch_max = 0"), "server.batch_max: must be at least 1 (got 0)"),
        (with_server("max_pending = -1"), "server.max_pending: must be at least 1 (got -1)"),
        (with_server("batch_gather = 2"), "server.batch_gather: must be at most 0.1 seconds (got 2)"),
        (with_server("batch_gather = -0.001"), "server.batch_gather: must be 0 (disabled) or a positive number"),
        (with_server("idle_timeout = -5"), "server.idle_timeout: must be 0 (disabled) or a positive number"),
        (with_server('idle_timeout = "5m"'), "server.idle_timeout: must be a number of seconds (got a string)"),
        (with_server('processing_id = "X"'), "server.processing_id: must be P, T or D (MSH-11.1) (got 'X')"),
        (with_server('log_level = "loud"'), "server.log_level: must be one of debug, info, warn, error, critical"),
        (with_server('application = "EX CHANGE"'), "server.application: must be a non-empty code"),
        (with_server('facility_id = "A^B"'), "server.facility_id: must be a non-empty code"),
        (with_facility('deliver_to = 2575'), "facility[1].deliver_to: must be a string (got an integer)"),
        # values
        (
            MINIMAL + FACILITY_2.replace("nursing_home", "spaceship"),
            "facility[2].kind: must be one of hospital, nursing_home, home_health, clinic, pharmacy, lab, other (got 'spaceship')",
        ),
        (MINIMAL + FACILITY_2.replace('"OAKNH"\nname', '"GENHOSP"\nname'), "facility[2].code: duplicate facility code 'GENHOSP' (also facility[1])"),
        (MINIMAL.replace('code = "GENHOSP"', 'code = ""'), "facility[1].code: must be a non-empty code"),
        (MINIMAL.replace('code = "GENHOSP"', 'code = "GEN|HOSP"'), "facility[1].code: must be a non-empty code"),
        (MINIMAL.replace('authority = "GENHOSP"', 'authority = "GEN HOSP"'), "facility[1].authority: must be a non-empty code"),
        # patterns
        (with_facility('subscribe = ["ADT"]'), "facility[1].subscribe[1]: must look like TYPE^EVENT"),
        (with_facility('subscribe = ["ADT^A01", "ADT|A03"]'), "facility[1].subscribe[2]: must look like TYPE^EVENT"),
        (with_facility('subscribe = "ADT^*"'), 'facility[1].subscribe: must be a list of TYPE^EVENT patterns, e.g. ["ADT^*"]'),
        (with_server('accept = ["ADT^A01^ADT_A01"]'), "server.accept[1]: must look like TYPE^EVENT"),
        (with_server('accept = ["*"]'), "server.accept[1]: must look like TYPE^EVENT"),
        # charsets
        (with_facility('charset = "spaceship"'), "facility[1].charset: unknown charset 'spaceship'"),
        (with_facility('charset = "UNICODE UTF-16"'), "facility[1].charset: cannot be a default charset: utf-16 is not ASCII-compatible"),
        (with_facility('charset = ""'), "facility[1].charset: must not be empty"),
        # TLS identity
        (with_facility('tls_fingerprint = "abc"'), "facility[1].tls_fingerprint: must be a SHA-256 fingerprint"),
        (with_facility('tls_fingerprint = "' + "g" * 64 + '"'), "facility[1].tls_fingerprint: must be a SHA-256 fingerprint"),
        (with_facility('tls_subject = ""'), "facility[1].tls_subject: must not be empty"),
        # found by a black-box audit: these started half a server, hung it or printed a traceback
        (with_server("idle_timeout = 1e300"), "server.idle_timeout: must be at most 31536000 seconds (a year)"),
        (with_server("retry_max = 1e300"), "server.retry_max: must be at most 31536000 seconds"),
        ("[workbench]\nlockout = 1e300\n" + MINIMAL, "workbench.lockout: must be at most 31536000 seconds"),
        (with_server('reconcile = {consistency = "3000000d"}'),
         "server.reconcile.consistency: an interval must be at most 365d"),
        (with_server('database = "sqlite://"'), "server.database: an in-memory SQLite database is lost on exit"),
        (with_server('database = "sqlite:///:memory:"'), "server.database: an in-memory SQLite database"),
        (with_server('database = "sqlite:///file::memory:?uri=true"'), "server.database: an in-memory SQLite"),
        (with_server('database = "sqlite:///file:x?mode=memory&uri=true"'), "server.database: an in-memory SQLite"),
        (MINIMAL.replace('"tcp:8080:interface=127.0.0.1"', '"tcp:2575:interface=127.0.0.1"'),
         "server.http: port 2575 is server.mllp's too"),
        (MINIMAL.replace('"tcp:2575:interface=127.0.0.1"', '["tcp:2575", "tcp:2576", "tcp:2575:interface=127.0.0.1"]'),
         "server.mllp[3]: port 2575 is server.mllp[1]'s too"),
        (with_server('person_authority = "GENHOSP"'),
         "server.person_authority: 'GENHOSP' is also the authority or code of facility[1]"),
        (with_server('person_authority = "genhosp"'),
         "server.person_authority: 'genhosp' is also the authority or code of facility[1]"),
        (MINIMAL + FACILITY_2.replace('authority = "OAKNH"', 'authority = "GenHosp"'),
         "facility[2].authority: 'GenHosp' is also the authority of facility 'GENHOSP': each site's MRNs need an"
         " authority of their own"),
    ],
)
def test_errors_name_the_key_and_the_reason(tmp_path, text, expected):
    assert error_of(tmp_path, text).startswith(expected)


# -- endpoint strings ---------------------------------------------------------------


@pytest.mark.parametrize(
    "description, expected",
    [
        ("tcp:2575", None),
        ("tcp:port=2575:interface=127.0.0.1:backlog=10", None),
        ("tcp6:0", None),
        ("unix:/tmp/x.sock:mode=660", None),
        ("", "empty endpoint string"),
        ("2575", "endpoint type must be one of tcp, tcp6, ssl, unix (got '2575')"),
        ("http:8080", "endpoint type must be one of"),
        ("tcp", "tcp endpoint needs a port"),
        ("tcp:port", "port must be a number from 0 to 65535 (got 'port')"),
        ("tcp:99999", "port must be a number from 0 to 65535"),
        ("tcp:2575:interfce=127.0.0.1", "tcp endpoint does not understand 'interfce'"),
        ("tcp:2575:2576", "too many positional values for tcp"),
        ("tcp:2575:port=2576", "port given twice"),
        ("tcp:2575:backlog=many", "backlog must be a number"),
        ("unix:", "unix endpoint needs a socket path"),
        ("ssl:2576", "ssl endpoint needs privateKey=FILE"),
        ("ssl:2576:privateKey=/nonexistent/server.key", "privateKey file '/nonexistent/server.key' does not exist"),
    ],
)
def test_check_server_endpoint(description, expected):
    reason = check_server_endpoint(description)
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and reason.startswith(expected)


def test_bad_endpoint_in_the_file_names_the_key(tmp_path):
    message = error_of(tmp_path, MINIMAL.replace('"tcp:8080:interface=127.0.0.1"', '"tpc:8080"'))
    assert message == "server.http: endpoint type must be one of tcp, tcp6, ssl, unix (got 'tpc') in 'tpc:8080'"
    message = error_of(tmp_path, MINIMAL.replace('"tcp:2575:interface=127.0.0.1"', '["tcp:2575", "ssl:2576"]'))
    assert message.startswith("server.mllp[2]: ssl endpoint needs privateKey=FILE")


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "exchange.test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = tmp_path / "server.key", tmp_path / "server.crt"
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def test_ssl_endpoint_with_real_files(tmp_path):
    key, cert = _self_signed(tmp_path)
    cas = tmp_path / "clients"
    cas.mkdir()
    assert check_server_endpoint(f"ssl:2576:privateKey={key}:certKey={cert}") is None
    # caCertsDir: must be a directory holding *.pem
    assert check_server_endpoint(f"ssl:2576:privateKey={key}:certKey={cert}:caCertsDir={cas}").endswith("holds no *.pem CA certificate")
    (cas / "ca.pem").write_bytes(cert.read_bytes())
    assert check_server_endpoint(f"ssl:2576:privateKey={key}:certKey={cert}:caCertsDir={cas}") is None
    assert check_server_endpoint(f"ssl:2576:privateKey={key}:certKey={cert}:caCerts={cas / 'ca.pem'}") is None
    assert "is not a directory" in check_server_endpoint(f"ssl:2576:privateKey={key}:certKey={cert}:caCertsDir={cert}")
    # a certificate file that is not one
    assert check_server_endpoint(f"ssl:2576:privateKey={key}:certKey={key}").startswith(
        "cannot load the TLS key and certificate"
    )
    # Twisted's legacy version pin would bypass the TLS 1.2+ / AEAD-only listener (and with
    # caCertsDir made `serve` exit 1 at start): refused, whatever its value
    for method in ("NOPE", "SSLv23_METHOD", "TLSv1_2_METHOD"):
        for extra in ("", f":caCertsDir={cas}"):
            assert check_server_endpoint(f"ssl:2576:privateKey={key}:certKey={cert}:sslmethod={method}{extra}") == (
                "sslmethod is not supported: ssl: listeners take TLS 1.2 and newer with forward-secret AEAD suites only")

    config = load(
        tmp_path,
        MINIMAL.replace(
            '"tcp:2575:interface=127.0.0.1"',
            f'["tcp:2575", "ssl:2576:privateKey={key}:certKey={cert}:caCertsDir={cas}"]',
        ),
    )
    assert config.server.mllp[1].startswith("ssl:2576:")


def test_config_error_attributes(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, with_facility('colour = "blue"'))
    assert info.value.path == str(tmp_path / "exchange.toml")
    assert info.value.key == "facility[1].colour"
    assert info.value.reason == "unknown key"


# -- routing: facility keys for copies, [[route]] tables ----------------------


ROUTE = """
[[route]]
name = "discharge summaries to home health"
messages = ["MDM^T02"]
to = ["GENHOSP"]
"""


def test_shipped_config_routes_the_issue_scenarios():
    config = load_config(REPO / "config" / "exchange.toml", environ={})
    oaknh, hhcare = config.facility("OAKNH"), config.facility("HHCARE")
    assert all(f.deliver_to for f in config.facilities)
    assert oaknh.wants("ADT", "A01") and oaknh.wants("ADT", "A03")
    assert "MDM^T02^DS" in hhcare.subscribe
    assert oaknh.exclude_documents == ("BH",) and hhcare.exclude_documents == ("BH",)
    assert [r.name for r in config.routes] == ["emergency visits of residents"]
    assert config.server.person_authority == "EXCHANGE"


def test_routing_keys_default(tmp_path):
    config = load(tmp_path, MINIMAL)
    facility = config.facilities[0]
    assert facility.application is None and facility.version is None
    assert facility.exclude_documents == () and facility.receive_confidentiality == ()
    assert facility.keep_source_identifiers is False and facility.keep_z_segments is False
    assert config.routes == ()
    assert config.server.person_authority == "EXCHANGE"


def test_routing_facility_keys(tmp_path):
    config = load(
        tmp_path,
        with_server('person_authority = "EMPI"')
        + """application = "ADT_IN"
exclude_documents = ["bh", "SUD", "BH"]
receive_confidentiality = ["r"]
keep_source_identifiers = true
keep_z_segments = true
version = "2.3"
subscribe = ["ADT^A01", "mdm^t02^ds", "MDM^*^HP"]
""",
    )
    facility = config.facilities[0]
    assert facility.application == "ADT_IN"
    assert facility.exclude_documents == ("BH", "SUD") and facility.receive_confidentiality == ("R",)
    assert facility.keep_source_identifiers and facility.keep_z_segments
    assert facility.version == "2.3"
    assert facility.subscribe == ("ADT^A01", "MDM^T02^DS", "MDM^*^HP")
    assert facility.wants("MDM", "T02")  # the document part is routing's business
    assert config.server.person_authority == "EMPI"


def test_route_tables(tmp_path):
    config = load(
        tmp_path,
        MINIMAL
        + FACILITY_2
        + """
[[route]]
name = "ER visits"
messages = ["ADT^A04", "adt^a01"]
from = ["GENHOSP"]
from_kind = ["hospital"]
patient_class = ["e"]
document_type = ["ds"]
to = ["OAKNH"]
to_kind = ["nursing_home", "home_health"]
allow_without_record = true

[[route]]
name = "all to nursing homes"
to_kind = ["nursing_home"]
""",
    )
    first, second = config.routes
    assert first.name == "ER visits"
    assert first.messages == ("ADT^A04", "ADT^A01")
    assert first.from_codes == ("GENHOSP",) and first.from_kinds == ("hospital",)
    assert first.patient_classes == ("E",) and first.document_types == ("DS",)
    assert first.to_codes == ("OAKNH",) and first.to_kinds == ("nursing_home", "home_health")
    assert first.allow_without_record is True
    assert second.messages == () and second.from_codes == () and second.allow_without_record is False


@pytest.mark.parametrize(
    "text, expected",
    [
        (with_server('person_authority = "EX CHANGE"'), "server.person_authority: must be a non-empty code"),
        (with_facility('application = "A^B"'), "facility[1].application: must be a non-empty code"),
        (with_facility('exclude_documents = "BH"'), "facility[1].exclude_documents: must be a list of codes (got a string)"),
        (with_facility('exclude_documents = ["B H"]'), "facility[1].exclude_documents[1]: must be a non-empty code"),
        (with_facility('receive_confidentiality = "V"'), "facility[1].receive_confidentiality: must be a list of codes (got a string)"),
        (with_facility('exclude_documents = [1]'), "facility[1].exclude_documents[1]: must be a string (got an integer)"),
        (with_facility('keep_source_identifiers = "yes"'), "facility[1].keep_source_identifiers: must be true or false (got a string)"),
        (with_facility("keep_z_segments = 1"), "facility[1].keep_z_segments: must be true or false (got an integer)"),
        (with_facility('version = "2.2"'), "facility[1].version: must be one of 2.3, 2.3.1, 2.4"),
        (with_facility("version = 2.5"), "facility[1].version: must be a string (got a number)"),
        (with_facility('subscribe = ["ADT^A01^DS"]'), "facility[1].subscribe[1]: a document type (third part, TXA-2) only applies to MDM"),
        (with_facility('subscribe = ["MDM^T02^MDM_T02"]'), "facility[1].subscribe[1]: must look like TYPE^EVENT"),
        (with_facility('subscribe = ["MDM^T02^DS^X"]'), "facility[1].subscribe[1]: must look like TYPE^EVENT"),
        # [[route]]
        (MINIMAL + '[route]\nname = "x"\n', "route: must be an array of tables, written [[route]]"),
        (MINIMAL + ROUTE + 'colour = "blue"\n', "route[1].colour: unknown key"),
        (MINIMAL + ROUTE.replace('name = "discharge summaries to home health"\n', ""), "route[1].name: missing required key"),
        (MINIMAL + ROUTE.replace('"discharge summaries to home health"', '" "'), "route[1].name: must not be empty"),
        (MINIMAL + ROUTE.replace('"discharge summaries to home health"', '"default"'), "route[1].name: 'default' is reserved"),
        (MINIMAL + ROUTE + ROUTE, "route[2].name: duplicate route name 'discharge summaries to home health' (also route[1])"),
        (MINIMAL + ROUTE.replace('to = ["GENHOSP"]', ""), "route[1].to: missing: name the destinations with to and/or to_kind"),
        (MINIMAL + ROUTE.replace('to = ["GENHOSP"]', 'to = ["NOWHERE"]'), "route[1].to[1]: unknown facility code 'NOWHERE'"),
        (MINIMAL + ROUTE + 'from = ["GENHOSP", "X"]\n', "route[1].from[2]: unknown facility code 'X'"),
        (MINIMAL + ROUTE + 'from_kind = ["spaceship"]\n', "route[1].from_kind[1]: must be one of hospital"),
        (MINIMAL + ROUTE + 'to_kind = "nursing_home"\n', "route[1].to_kind: must be a list of codes (got a string)"),
        (MINIMAL + ROUTE.replace('["MDM^T02"]', '["MDM^T02^DS"]'), "route[1].messages[1]: must look like TYPE^EVENT"),
        (MINIMAL + ROUTE + 'patient_class = ["I E"]\n', "route[1].patient_class[1]: must be a non-empty code"),
        (MINIMAL + ROUTE + "allow_without_record = 1\n", "route[1].allow_without_record: must be true or false (got an integer)"),
    ],
)
def test_routing_errors_name_the_key_and_the_reason(tmp_path, text, expected):
    assert error_of(tmp_path, text).startswith(expected)


# -- server.trust (the person's best view) ----------------------------------------


def test_trust_defaults_and_order(tmp_path):
    assert load(tmp_path, MINIMAL).server.trust == ("hospital", "nursing_home", "home_health")
    config = load(tmp_path, with_server('trust = ["home_health", "hospital"]'))
    assert config.server.trust == ("home_health", "hospital")


@pytest.mark.parametrize(
    "value, expected",
    [
        ('"hospital"', "server.trust: must be a list of facility kinds (got a string)"),
        ("[]", "server.trust: must name at least one facility kind"),
        ('["hospital", "spaceship"]', "server.trust[2]: must be one of hospital, nursing_home"),
        ('["hospital", "hospital"]', "server.trust[2]: 'hospital' is listed twice"),
        ('["hospital", 3]', "server.trust[2]: must be a string (got an integer)"),
    ],
)
def test_trust_errors_name_the_key_and_the_reason(tmp_path, value, expected):
    assert error_of(tmp_path, with_server(f"trust = {value}")).startswith(expected)


# -- delivery of routed copies --------------------------------------------------------


def test_delivery_defaults_and_values(tmp_path):
    server = load(tmp_path, MINIMAL).server
    assert (server.delivery_timeout, server.retry_initial, server.retry_max, server.delivery_poll) == (30.0, 1.0, 300.0, 2.0)
    text = with_server("delivery_timeout = 5\nretry_initial = 0.5\nretry_max = 60\ndelivery_poll = 1.5")
    server = load(tmp_path, text).server
    assert (server.delivery_timeout, server.retry_initial, server.retry_max, server.delivery_poll) == (5.0, 0.5, 60.0, 1.5)
    assert load(tmp_path, with_server("retry_initial = 7\nretry_max = 7")).server.retry_max == 7.0
    assert (server.stale_session, load(tmp_path, with_server("stale_session = 30")).server.stale_session) == (60.0, 30.0)


@pytest.mark.parametrize(
    "text, expected",
    [
        (with_server("delivery_timeout = 0"), "server.delivery_timeout: must be a positive number of seconds (got 0)"),
        (with_server("retry_initial = -1"), "server.retry_initial: must be a positive number of seconds (got -1)"),
        (with_server('retry_max = "5m"'), "server.retry_max: must be a number of seconds (got a string)"),
        (with_server("delivery_poll = true"), "server.delivery_poll: must be a number of seconds (got a boolean)"),
        (with_server("delivery_poll = inf"), "server.delivery_poll: must be a positive number of seconds (got inf)"),
        (with_server("stale_session = 0"), "server.stale_session: must be a positive number of seconds (got 0)"),
        (with_server("retry_initial = 10\nretry_max = 5"), "server.retry_max: must be at least server.retry_initial (10) (got 5)"),
        (with_server("retry_max = 0.5"), "server.retry_max: must be at least server.retry_initial (1) (got 0.5)"),
        (with_facility('deliver_to = "bogus:x"'), "facility[1].deliver_to: bad endpoint 'bogus:x': Unknown endpoint type"),
        (with_facility('deliver_to = "tcp:host=nh.example"'), "facility[1].deliver_to: bad endpoint 'tcp:host=nh.example'"),
        (with_facility('deliver_to = "3575"'), "facility[1].deliver_to: bad endpoint '3575'"),
    ],
)
def test_delivery_errors_name_the_key_and_the_reason(tmp_path, text, expected):
    assert error_of(tmp_path, text).startswith(expected)


@pytest.mark.parametrize(
    "deliver_to",
    ["127.0.0.1:3575", "[::1]:3575", "nh.example:3575", "tcp:host=127.0.0.1:port=3575", "tls:host=nh.example:port=3575"],
)
def test_deliver_to_accepts_host_port_and_client_endpoint_strings(tmp_path, deliver_to):
    assert load(tmp_path, with_facility(f'deliver_to = "{deliver_to}"')).facilities[0].deliver_to == deliver_to


# -- server.reconcile (when `exchange serve` runs the reconciliation jobs) -----------------------------


def test_reconcile_defaults_and_values(tmp_path):
    from exchange.config import RECONCILE_JOBS, Schedule

    server = load(tmp_path, MINIMAL).server
    assert [name for name, _ in server.reconcile] == list(RECONCILE_JOBS) == ["consistency", "match-model", "links"]
    assert server.schedule("consistency") == Schedule("1h", seconds=3600.0)
    assert server.schedule("match-model") == Schedule("0 3 * * *", cron="0 3 * * *")
    text = with_server('reconcile.consistency = "90s"\nreconcile.match-model = "off"')
    server = load(tmp_path, text).server
    assert server.schedule("consistency").seconds == 90.0 and server.schedule("match-model").off
    server = load(tmp_path, MINIMAL.replace("\n[[facility]]", '[server.reconcile]\nmatch-model = "30 2 * * 0"\n'
                                                              "\n[[facility]]", 1)).server
    assert server.schedule("match-model").cron == "30 2 * * 0" and server.schedule("consistency").seconds == 3600.0
    for text, seconds in (("30m", 1800.0), ("24h", 86400.0), ("7d", 604800.0), ("1.5h", 5400.0)):
        assert load(tmp_path, with_server(f'reconcile.consistency = "{text}"')).server.schedule("consistency").seconds \
            == seconds


@pytest.mark.parametrize(
    "text, expected",
    [
        ('reconcile = "1h"', "server.reconcile: must be a table of job = schedule"),
        ('reconcile.nightly = "1h"', "server.reconcile.nightly: unknown job (known: consistency, match-model, links)"),
        ("reconcile.consistency = 3600", "server.reconcile.consistency: must be a string (got an integer)"),
        ('reconcile.consistency = "hourly"', "server.reconcile.consistency: must be an interval such as"),
        ('reconcile.consistency = "0.5s"', "server.reconcile.consistency: an interval must be at least 1s"),
        ('reconcile.match-model = "0 25 * * *"', "server.reconcile.match-model: bad cron expression '0 25 * * *'"),
        ('reconcile.match-model = "* * * *"', "server.reconcile.match-model: must be an interval such as"),
    ],
)
def test_reconcile_errors_name_the_key_and_the_reason(tmp_path, text, expected):
    assert error_of(tmp_path, with_server(text)).startswith(expected)


# -- [workbench] --------------------------------------------------------------------


def test_workbench_defaults_and_values(tmp_path):
    from exchange.config import WorkbenchConfig

    assert load(tmp_path, MINIMAL).workbench == WorkbenchConfig(1800.0, 43200.0, 5, 900.0)
    config = load(tmp_path, MINIMAL + "\n[workbench]\nsession_idle = 600\nsession_max = 3600\n"
                                      "login_attempts = 3\nlockout = 60\n")
    assert config.workbench == WorkbenchConfig(600.0, 3600.0, 3, 60.0)
    shipped = load_config(REPO / "config" / "exchange.toml", environ={})
    assert shipped.workbench == WorkbenchConfig()


@pytest.mark.parametrize("table, expected", [
    ("colour = 1", "workbench.colour: unknown key"),
    ("session_idle = 0", "workbench.session_idle: must be a positive number of seconds"),
    ('session_idle = "30m"', "workbench.session_idle: must be a number of seconds"),
    ("session_idle = 600\nsession_max = 60", "workbench.session_max: must be at least workbench.session_idle"),
    ("login_attempts = 0", "workbench.login_attempts: must be at least 1"),
    ("login_attempts = 2.5", "workbench.login_attempts: must be an integer"),
    ("lockout = -1", "workbench.lockout: must be a positive number of seconds"),
])
def test_workbench_errors_name_the_key(tmp_path, table, expected):
    assert error_of(tmp_path, MINIMAL + "\n[workbench]\n" + table + "\n").startswith(expected)


def test_workbench_must_be_a_table(tmp_path):
    text = MINIMAL.replace("[server]\n", 'workbench = "yes"\n[server]\n', 1)
    assert error_of(tmp_path, text).startswith("workbench: must be a table [workbench]")


def test_a_snapshot_left_by_a_killed_process_is_removed_by_the_next_one(tmp_path, monkeypatch):
    """kill -9 of `exchange serve` left its configuration snapshots in the temp directory."""
    import subprocess
    import sys
    import tempfile

    from exchange.config import load_config, write_snapshot
    from tests.support import write_config

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f"exchange-config-{gone}-abc.toml"
    stale.write_text("x")
    alive = tmp_path / f"exchange-config-{os.getpid()}-def.toml"
    alive.write_text("x")
    other = tmp_path / "exchange-config-oldstyle.toml"
    other.write_text("x")
    config = load_config(write_config(tmp_path))
    snapshot = write_snapshot(config)
    try:
        assert not stale.exists() and alive.exists() and other.exists()
        assert os.path.basename(snapshot).startswith(f"exchange-config-{os.getpid()}-")
        assert open(snapshot, encoding="utf-8").read() == config.text
    finally:
        os.unlink(snapshot)
