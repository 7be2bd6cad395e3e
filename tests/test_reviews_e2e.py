"""A technician's decisions against a running exchange (real sockets, SQLite and PostgreSQL):
the writer opens a review over MLLP, the technician decides it through the API, and the
writer honours the decision on the next update: a "not a match" is never relinked
automatically, a manual link is never broken automatically; an undo lifts the pairs."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

from tests.support import ExchangeProcess, MLLPConnection, msa, write_config
from tests.test_cli import exchange

HANSON = "HANSON^ELIZABETH||19470312|F|||12 ELM ST^^SPRINGFIELD^IL^62701||555-0100"
HANSEN = "HANSEN^BETH||19470312|F|||99 OAK AVE^^DECATUR^IL^62521"  # nickname, typo, moved: ~16 bits, a review
HANSEN_WITH_PHONE = HANSEN + "||555-0100"  # the same phone: ~28 bits, a link were it not for the technician
SOMEONE_ELSE = "KOWALCZYK^PIOTR||19800101|M|||1 MAIN ST^^CHICAGO^IL^60601"


def a0x(control_id: str, facility: str, mrn: str, pid: str, event: str = "A28") -> bytes:
    structure = "ADT_A05" if event in ("A28", "A31") else "ADT_A01"
    return (
        f"MSH|^~\\&|ADT|{facility}|EXCHANGE|EXCHANGE|20261127120000||ADT^{event}^{structure}|{control_id}|P|2.5.1\r"
        f"EVN|{event}|20261127120000\r"
        f"PID|1||{mrn}^^^{facility}^MR||{pid}\r"
        "PV1|1|N\r"
    ).encode()


def call(server: ExchangeProcess, method: str, path: str, token: str, body: dict | None = None) -> tuple[int, dict]:
    host, port = server.http
    request = urllib.request.Request(
        f"http://{host}:{port}/api{path}", method=method, headers={"Authorization": f"Bearer {token}"},
        data=json.dumps(body).encode() if body is not None else None,
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_decisions_are_sticky_for_the_writer(database_url, tmp_path):
    token = exchange("token", "create", "tess", "--role", "technician", "--database", database_url).stdout.strip()
    server = ExchangeProcess(write_config(tmp_path), database_url).start()
    try:
        with MLLPConnection(server.address) as mllp:
            def send(control_id, facility, mrn, pid, event="A28"):
                assert msa(mllp.request(a0x(control_id, facility, mrn, pid, event)))[0] == "AA"

            def person(facility, mrn):
                code, record = call(server, "GET", f"/records/{facility}/{mrn}", token)
                assert code == 200
                return record["person"]

            send("E1", "GENHOSP", "GH-1", HANSON)
            send("E2", "OAKNH", "OA-1", HANSEN)
            gh = person("GENHOSP", "GH-1")
            assert person("OAKNH", "OA-1") != gh
            code, body = call(server, "GET", "/reviews?state=open", token)
            assert code == 200
            [review] = body["reviews"]
            assert review["records"] == [{"facility": "OAKNH", "mrn": "OA-1"}, {"facility": "GENHOSP", "mrn": "GH-1"}]

            # not a match: the same phone later does not link them
            code, decided = call(server, "POST", f"/reviews/{review['id']}", token, {"decision": "not-a-match"})
            assert code == 200 and decided["state"] == "resolved"
            send("E3", "OAKNH", "OA-1", HANSEN_WITH_PHONE, "A31")
            assert person("OAKNH", "OA-1") != gh

            # undone: the pairs are lifted and the review reopens; the next update links them
            code, undone = call(server, "POST", f"/decisions/{decided['decision_id']}/undo", token, {})
            assert code == 200
            assert call(server, "GET", f"/reviews/{review['id']}", token)[1]["state"] == "open"
            send("E4", "OAKNH", "OA-1", HANSEN_WITH_PHONE + "~555-0199", "A31")
            assert person("OAKNH", "OA-1") == gh

            # split it off by hand, then link it again by hand: a manual link survives an update
            # that no longer looks like her
            code, split = call(server, "POST", f"/persons/{gh}/split", token, {"facility": "OAKNH", "mrn": "OA-1"})
            assert code == 200 and person("OAKNH", "OA-1") == split["person"]
            code, merged = call(server, "POST", "/persons/merge", token,
                                {"persons": [gh, split["person"]], "force": True, "reason": "she is"})
            assert code == 200 and person("OAKNH", "OA-1") == gh
            send("E5", "OAKNH", "OA-1", SOMEONE_ELSE, "A31")
            assert person("OAKNH", "OA-1") == gh
            open_ = call(server, "GET", "/reviews?state=open", token)[1]["reviews"]
            assert [(r["kind"], r["records"][0]["mrn"]) for r in open_] == [("link_looks_wrong", "OA-1")]
            code, view = call(server, "GET", f"/persons/{gh}", token)
            assert ("OAKNH", "OA-1", "manual") in {(r["facility"], r["mrn"], r["link"]) for r in view["records"]}
            code, history = call(server, "GET", f"/persons/{gh}/history", token)
            assert [(e["kind"], e["mrn"], e["actor"]) for e in history["events"]] == [
                ("auto", "GH-1", "exchange"),  # new records: a person each
                ("auto", "OA-1", "exchange"),
                ("not-a-match", "OA-1", "tess"),
                ("undo", "OA-1", "tess"),
                ("auto", "OA-1", "exchange"),  # linked by the A31 once the pairs were lifted
                ("split", "OA-1", "tess"),
                ("merge", "OA-1", "tess"),
            ]
    finally:
        server.stop()

    done = exchange("export", "links", "--database", database_url)
    assert done.returncode == 0, done.stderr
    rows = [line.split(",") for line in done.stdout.splitlines()[1:]]
    assert {(f, m) for f, _, m, _ in rows} == {("GENHOSP", "GH-1"), ("OAKNH", "OA-1")}
    assert len({p for *_, p in rows}) == 1
