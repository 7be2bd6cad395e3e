"""The whole pipeline end to end: `exchange serve` as a process, facilities
sending over MLLP, and receiving systems written by others (python-hl7's
asyncio MLLP server, hl7apy's MLLP server) standing in for the facilities'
interface engines. Intake -> record model -> patient index -> routing ->
outbox -> delivery, on SQLite and PostgreSQL."""
from __future__ import annotations

import asyncio
import threading
import time

import hl7
import hl7.mllp
import pytest

from tests.delivery.peers import HL7apyPeer
from tests.support import ExchangeProcess, MLLPConnection, api_request, msa, write_config


class Capture:
    """python-hl7's asyncio MLLP server keeping every message it receives (as text), ACKing AA."""

    def __init__(self, port: int = 0) -> None:
        self.messages: list[str] = []
        self.lock = threading.Lock()
        self.port = 0
        ready = threading.Event()

        def run() -> None:
            self.loop = asyncio.new_event_loop()
            server = self.loop.run_until_complete(hl7.mllp.start_hl7_server(self._client, "127.0.0.1", port))
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            self.loop.run_forever()

        threading.Thread(target=run, daemon=True).start()
        assert ready.wait(10)

    async def _client(self, reader, writer) -> None:
        try:
            while True:
                message = await reader.readmessage()
                with self.lock:
                    self.messages.append(str(message))
                writer.writeblock(str(message.create_ack("AA")).encode())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass

    def wait_for(self, count: int, timeout: float = 15) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.messages) >= count:
                    return list(self.messages)
            time.sleep(0.05)
        with self.lock:
            return list(self.messages)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


def facilities(nursing_home: int, home_health: int, hospital: int) -> str:
    return f"""
[[facility]]
code = "GENHOSP"
name = "General Hospital"
kind = "hospital"
authority = "GENHOSP"
deliver_to = "127.0.0.1:{hospital}"

[[facility]]
code = "OAKNH"
name = "Oakwood Nursing Home"
kind = "nursing_home"
authority = "OAKNH"
deliver_to = "127.0.0.1:{nursing_home}"
subscribe = ["ADT^A01", "ADT^A03", "MDM^*"]

[[facility]]
code = "HHCARE"
name = "Sunrise Home Health"
kind = "home_health"
authority = "HHCARE"
deliver_to = "127.0.0.1:{home_health}"
subscribe = ["ADT^A03", "MDM^T02^DS"]
"""


def adt(control_id: str, facility: str, event: str, mrn: str, *, pd1: str = "", visit: str = "") -> bytes:
    segments = [
        f"MSH|^~\\&|APP|{facility}|EXCHANGE|EXCHANGE|20261127120000||ADT^{event}^ADT_A01|{control_id}|P|2.5.1",
        f"EVN|{event}|20261127120000",
        f"PID|1||{mrn}^^^{facility}^MR||HANSON^ELIZABETH^M||19400304|F|||12 OAK ST^^SPRINGFIELD^IL^62701"
        f"||555-0100||||||219-09-9999",
    ]
    if pd1:
        segments.append(pd1)
    segments.append(f"PV1|1|I|W1^101^A||||||||||||||||{visit or 'V' + control_id}")
    return ("\r".join(segments) + "\r").encode()


def discharge_summary(control_id: str, mrn: str, *, number: str = "DOC-1", confidentiality: str = "") -> bytes:
    return ("\r".join([
        f"MSH|^~\\&|DOC|GENHOSP|EXCHANGE|EXCHANGE|20261127130000||MDM^T02^MDM_T02|{control_id}|P|2.5.1",
        "EVN|T02|20261127130000",
        f"PID|1||{mrn}^^^GENHOSP^MR||HANSON^ELIZABETH^M||19400304|F",
        "PV1|1|I|W1^101^A||||||||||||||||VDOC1",
        f"TXA|1|DS|TX|20261127130000||||||||{number}|||||AU|{confidentiality}|AV",
        "OBX|1|TX|18842-5^Discharge summary^LN||Discharged home with home health follow-up.",
    ]) + "\r").encode()


@pytest.fixture
def network(tmp_path, database_url):
    nursing_home, home_health, hospital = Capture(), Capture(), Capture()
    config = write_config(tmp_path, facilities=facilities(nursing_home.port, home_health.port, hospital.port))
    server = ExchangeProcess(config, database_url).start()
    yield server, nursing_home, home_health, hospital
    server.stop()
    for peer in (nursing_home, home_health, hospital):
        peer.stop()


def field(text: str, segment: str, number: int) -> str:
    for line in text.replace("\n", "\r").split("\r"):
        if line.startswith(segment + "|"):
            return line.split("|")[number]
    raise AssertionError(f"no {segment} in {text!r}")


def test_a_resident_admitted_at_the_hospital_reaches_the_nursing_home_in_its_own_mrn(network, database_url):
    server, nursing_home, home_health, hospital = network
    with MLLPConnection(server.address) as conn:
        assert msa(conn.request(adt("NH-1", "OAKNH", "A28", "OA917082")))[0] == "AA"  # the resident
        assert msa(conn.request(adt("GH-1", "GENHOSP", "A01", "GH-44107")))[0] == "AA"  # admitted
        assert msa(conn.request(adt("HH-1", "HHCARE", "A28", "HH-3391")))[0] == "AA"  # home health knows her
        assert msa(conn.request(discharge_summary("GH-2", "GH-44107")))[0] == "AA"
    (admit, summary) = nursing_home.wait_for(2)[:2]
    assert field(admit, "MSH", 8) == "ADT^A01^ADT_A01"
    # MSH-3, MSH-4 the exchange, MSH-6 the destination (split("|") counts MSH-2 as field 1)
    assert (field(admit, "MSH", 2), field(admit, "MSH", 3), field(admit, "MSH", 5)) == ("EXCHANGE", "EXCHANGE", "OAKNH")
    ids = field(admit, "PID", 3).split("~")
    assert ids[0].split("^")[0] == "OA917082" and ids[0].split("^")[3] == "OAKNH"  # its own MRN
    assert not any(i.startswith("GH-44107") for i in ids)  # not the hospital's
    assert any(i.split("^")[4] == "PI" for i in ids)  # the enterprise person id
    assert field(summary, "MSH", 8).startswith("MDM^T02")
    (to_home_health,) = home_health.wait_for(1)
    assert field(to_home_health, "MSH", 8).startswith("MDM^T02")
    assert field(to_home_health, "PID", 3).split("~")[0].split("^")[0] == "HH-3391"
    # the hospital (subscribed to everything) hears of home health's registration, never of its own messages
    (to_hospital,) = hospital.wait_for(1)
    assert field(to_hospital, "MSH", 8).startswith("ADT^A28") and field(to_hospital, "PV1", 19) == "VHH-1"
    assert field(to_hospital, "PID", 3).split("~")[0].split("^")[0] == "GH-44107"
    time.sleep(0.5)
    assert len(hospital.messages) == 1
    # every copy's outcome is recorded (on SQLite by the writer, with its next transaction)
    deadline = time.monotonic() + 10
    while True:
        deliveries = api_request(server, database_url, "GET", "/api/deliveries?state=delivered", role="admin")
        if len(deliveries["deliveries"]) == 4 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert sorted(d["facility"] for d in deliveries["deliveries"]) == ["GENHOSP", "HHCARE", "OAKNH", "OAKNH"]


def test_an_opted_out_person_reaches_nobody(network):
    server, nursing_home, home_health, hospital = network
    with MLLPConnection(server.address) as conn:
        assert msa(conn.request(adt("NH-10", "OAKNH", "A28", "OA-555")))[0] == "AA"
        optout = adt("GH-10", "GENHOSP", "A01", "GH-555", pd1="PD1||||||||||||Y")
        assert msa(conn.request(optout))[0] == "AA"
        assert msa(conn.request(adt("GH-11", "GENHOSP", "A03", "GH-555", visit="VGH-10")))[0] == "AA"
    assert nursing_home.wait_for(1, timeout=3) == []
    assert home_health.messages == [] and hospital.messages == []


def test_a_very_restricted_document_reaches_nobody(network):
    """TXA-18 V or R: no site of this network is configured to receive restricted documents."""
    server, nursing_home, home_health, hospital = network
    with MLLPConnection(server.address) as conn:
        assert msa(conn.request(adt("NH-30", "OAKNH", "A28", "OA-30")))[0] == "AA"
        assert msa(conn.request(adt("HH-30", "HHCARE", "A28", "HH-30")))[0] == "AA"
        assert msa(conn.request(adt("GH-30", "GENHOSP", "A04", "GH-30")))[0] == "AA"
        for n, status in enumerate(("V", "R", "U")):
            summary = discharge_summary(f"GH-3{n + 1}", "GH-30", number=f"DOC-{status}", confidentiality=status)
            assert msa(conn.request(summary))[0] == "AA"
    (to_home_health,) = home_health.wait_for(1)
    assert field(to_home_health, "TXA", 12).startswith("DOC-U") and field(to_home_health, "TXA", 18) == "U"
    documents = [m for m in nursing_home.wait_for(1) if field(m, "MSH", 8).startswith("MDM")]
    assert [field(m, "TXA", 12).split("^")[0] for m in documents] == ["DOC-U"]
    time.sleep(0.5)
    assert not any("DOC-V" in m or "DOC-R" in m for m in nursing_home.messages + home_health.messages
                   + hospital.messages)


def test_hl7apy_server_as_the_receiving_engine(tmp_path, database_url):
    peer = HL7apyPeer("ADT^A01^ADT_A01").start()
    others = Capture()
    config = write_config(tmp_path, facilities=facilities(peer.port, others.port, others.port))
    server = ExchangeProcess(config, database_url).start()
    try:
        with MLLPConnection(server.address) as conn:
            assert msa(conn.request(adt("NH-20", "OAKNH", "A28", "OA-20")))[0] == "AA"
            assert msa(conn.request(adt("GH-20", "GENHOSP", "A01", "GH-20")))[0] == "AA"
        deadline = time.monotonic() + 15
        while not peer.received and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(peer.received) == 1 and peer.received[0].endswith("-1")
    finally:
        server.stop()
        peer.stop()
        others.stop()


def test_an_opt_out_set_through_the_api_stops_copies_until_cleared(network, database_url):
    server, nursing_home, home_health, hospital = network
    with MLLPConnection(server.address) as conn:
        assert msa(conn.request(adt("NH-30", "OAKNH", "A28", "OA-30")))[0] == "AA"
        person = api_request(server, database_url, "GET", "/api/records/OAKNH/OA-30")["person"]
        answer = api_request(server, database_url, "POST", f"/api/persons/{person}/opt-out", {"protected": True})
        assert answer["opt_out"]["protected"] is True and answer["opt_out"]["by"].startswith("api technician-")
        assert msa(conn.request(adt("GH-30", "GENHOSP", "A01", "GH-30")))[0] == "AA"
        assert nursing_home.wait_for(1, timeout=2) == []
        # a facility saying PD1-12 = N does not lift the patient's own request
        assert msa(conn.request(adt("GH-31", "GENHOSP", "A03", "GH-30", pd1="PD1||||||||||||N",
                                    visit="VGH-30")))[0] == "AA"
        assert nursing_home.wait_for(1, timeout=2) == []
        api_request(server, database_url, "POST", f"/api/persons/{person}/opt-out",
                    {"protected": False, "reason": "consent form signed"})
        opt_out = api_request(server, database_url, "GET", f"/api/persons/{person}")["opt_out"]
        assert opt_out["protected"] is False
        assert [(e["protected"], e["by"][:15], e["reason"]) for e in opt_out["history"]] == [
            (True, "api technician-", None), (False, "api technician-", "consent form signed")]
        assert msa(conn.request(adt("GH-32", "GENHOSP", "A03", "GH-30", visit="VGH-30")))[0] == "AA"
    (copy,) = nursing_home.wait_for(1)
    assert field(copy, "MSH", 8).startswith("ADT^A03")


def test_a_copy_waiting_for_a_destination_that_was_down_is_withheld_after_an_opt_out(
        tmp_path, database_url):
    """Routing decides when the event is applied; an opt-out or a split that commits while the
    copy waits for its destination must still stop it (checked again just before sending)."""
    from tests.delivery.peers import free_port

    down = free_port()  # the nursing home's engine is down: nothing listens there yet
    home_health, hospital = Capture(), Capture()
    config = write_config(tmp_path, facilities=facilities(down, home_health.port, hospital.port),
                          server_extra="retry_initial = 0.2\nretry_max = 0.5\ndelivery_poll = 0.2")
    server = ExchangeProcess(config, database_url).start()
    nursing_home = None
    try:
        with MLLPConnection(server.address) as conn:
            assert msa(conn.request(adt("NH-40", "OAKNH", "A28", "OA-40")))[0] == "AA"
            assert msa(conn.request(adt("GH-40", "GENHOSP", "A01", "GH-40")))[0] == "AA"  # a copy for OAKNH waits
            person = api_request(server, database_url, "GET", "/api/records/OAKNH/OA-40")["person"]
            assert api_request(server, database_url, "GET", "/api/records/GENHOSP/GH-40")["person"] == person
            api_request(server, database_url, "POST", f"/api/persons/{person}/opt-out", {"protected": True})
            nursing_home = Capture(down)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                (copy,) = api_request(server, database_url, "GET", "/api/messages/GENHOSP/GH-40",
                                      role="admin")["deliveries"]
                if copy["state"] != "queued":
                    break
                time.sleep(0.1)
            assert (copy["facility"], copy["state"], copy["last_error"]) == (
                "OAKNH", "withheld", "withheld: the person has opted out")
            assert nursing_home.wait_for(1, timeout=1) == []
    finally:
        server.stop()
        for peer in (nursing_home, home_health, hospital):
            if peer is not None:
                peer.stop()


def bh_note(control_id: str, mrn: str, number: int) -> bytes:
    return ("\r".join([
        f"MSH|^~\\&|DOC|OAKNH|EXCHANGE|EXCHANGE|20261127130000||MDM^T02^MDM_T02|{control_id}|P|2.5.1",
        "EVN|T02|20261127130000",
        f"PID|1||{mrn}^^^OAKNH^MR||HANSON^ELIZABETH^M||19400304|F",
        f"TXA|1|BH|TX|20261127130000||||||||PSY-{number}|||||AU||AV",
        "OBX|1|TX|11488-4^Consult note^LN||Synthetic behavioural health note.",
    ]) + "\r").encode()


def test_copies_queued_before_a_restart_meet_the_new_configuration(tmp_path, database_url):
    """Found by a black-box audit: BH notes queued for HHCARE while it was down, and A08 copies
    queued for GENHOSP, all went out after a restart with exclude_documents = ["BH"] added to
    HHCARE and ADT^A08 removed from GENHOSP's subscribe."""
    from tests.delivery.peers import free_port

    hospital_port, home_health_port = free_port(), free_port()  # both engines are down

    def network(hhcare: str, genhosp: str) -> str:
        return f"""
[[facility]]
code = "GENHOSP"
name = "General Hospital"
kind = "hospital"
authority = "GENHOSP"
deliver_to = "127.0.0.1:{hospital_port}"
subscribe = {genhosp}

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
deliver_to = "127.0.0.1:{home_health_port}"
subscribe = ["MDM^*"]
{hhcare}
"""

    fast = "retry_initial = 0.2\nretry_max = 0.5\ndelivery_poll = 0.2"
    config = write_config(tmp_path, facilities=network("", '["ADT^A08", "MDM^*"]'), server_extra=fast)
    server = ExchangeProcess(config, database_url).start()
    hospital = home_health = None
    try:
        with MLLPConnection(server.address) as conn:
            for message in (adt("GH-50", "GENHOSP", "A28", "GH-50"), adt("HH-50", "HHCARE", "A28", "HH-50"),
                            adt("NH-50", "OAKNH", "A28", "OA-50")):
                assert msa(conn.request(message))[0] == "AA"
            for n in range(5):
                assert msa(conn.request(bh_note(f"BH-5{n}", "OA-50", n)))[0] == "AA"
            assert msa(conn.request(adt("NH-51", "OAKNH", "A08", "OA-50")))[0] == "AA"
        deliveries = api_request(server, database_url, "GET", "/api/deliveries?state=queued", role="admin")
        queued = sorted((d["facility"], d["message"]["control_id"]) for d in deliveries["deliveries"])
        notes = [f"BH-5{n}" for n in range(5)]
        assert queued == sorted([("GENHOSP", c) for c in notes + ["NH-51"]] + [("HHCARE", c) for c in notes])
        server.stop()

        config = write_config(tmp_path, facilities=network('exclude_documents = ["BH"]', '["MDM^*"]'),
                              server_extra=fast)
        hospital, home_health = Capture(hospital_port), Capture(home_health_port)
        server = ExchangeProcess(config, database_url).start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            deliveries = api_request(server, database_url, "GET", "/api/deliveries?limit=100", role="admin")
            if all(d["state"] != "queued" for d in deliveries["deliveries"]):
                break
            time.sleep(0.1)
        outcome = {(d["facility"], d["message"]["control_id"]): (d["state"], d["last_error"])
                   for d in deliveries["deliveries"]}
        excluded = ("withheld", "withheld: the destination now excludes this document type")
        assert outcome == {**{("HHCARE", c): excluded for c in notes},
                           **{("GENHOSP", c): ("delivered", None) for c in notes},
                           ("GENHOSP", "NH-51"): ("withheld", "withheld: the destination no longer subscribes to this event")}
        assert [field(m, "MSH", 8).split("^")[0] for m in hospital.wait_for(5)] == ["MDM"] * 5
        assert home_health.wait_for(1, timeout=1) == []
        assert len(hospital.wait_for(6, timeout=1)) == 5
    finally:
        server.stop()
        for peer in (hospital, home_health):
            if peer is not None:
                peer.stop()
