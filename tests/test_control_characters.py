"""A NUL (an escaped \\X00\\) in any field of an ADT or an MDM: PostgreSQL keeps no NUL in text,
SQLite does. Every such message is answered as on SQLite -- applied, or AE 102 where the field is
a key (a patient identifier, a document or visit number) -- never the general AE 207 of a batch
the database refused (found by the PIX audit: a NUL in QPD-3 failed the batch on PostgreSQL)."""
from __future__ import annotations

import hl7

from tests.test_e2e_index import ELIZABETH, message, pid

A01 = ("MSH|^~\\&|APP|OAKNH|EXCHANGE|EXCHANGE|20261127120000||ADT^A01^ADT_A01|CTRL|P|2.5\r"
       "EVN|A01|20261127120000|||OP^SMITH^JOHN\r"
       "PID|1||OA917082^^^OAKNH^MR~123^^^SSA^SS||HANSON^ELIZABETH^M^JR^DR||19400304|F|ALIAS^A||"
       "12 OAK ST^^SPRINGFIELD^IL^62701^USA^H||555-0100|555-0200|EN|M|CHR|ACC1|219-09-9999|DL1||BIRTHPL|Y|2|US|Y"
       "|US|20200101|N\r"
       "PD1|||FAC^^1|DOC^X||||||||N\r"
       "NK1|1|HANSON^JOHN|SPO^Spouse|1 ELM^^X^IL|555-1111\r"
       "PV1|1|I|W1^1^A^GEN|E|||ATT1^DOC^A|REF1^R^B|CON1^C^D|MED||||1|||ATT1^DOC^A|IN|V100|||||||||||||||||||||"
       "||||20261127120000\r"
       "PV2|||CHEST PAIN\r"
       "DG1|1||I10^HTN^I10|HTN||A\r"
       "AL1|1|DA|PEN^Penicillin|SV|RASH\r")
MDM = ("MSH|^~\\&|APP|OAKNH|EXCHANGE|EXCHANGE|20261127120000||MDM^T02^MDM_T02|CTRL|P|2.5\r"
       "EVN|T02|20261127120000\r"
       "PID|1||OA917082^^^OAKNH^MR||HANSON^ELIZABETH^M||19400304|F\r"
       "PV1|1|I|W1^1^A|||||||||||||||V100\r"
       "TXA|1|DS^Discharge summary|TX|20261127|AUTH^A^B|20261127|20261127|||AUTH^A^B|TRANS^T|DOC1|PAR0|||FILE1"
       "|AU|R|AV|STOR|||AUTH2^X^Y\r"
       "OBX|1|TX|DS^Discharge||line one~line two||||||F\r"
       "OBX|2|ED|PDF^PDF||^AP^PDF^Base64^SGVsbG8=||||||F\r")
KEYS = {"A01 PID-3", "A01 PV1-19", "MDM PID-3", "MDM TXA-12", "MDM TXA-13"}  # answered AE 102


def with_nul(label: str, text: str) -> dict[str, bytes]:
    """``text`` once per field (MSH-3 on, but MSH-9..12), a NUL put into its first component."""
    segments = text.rstrip("\r").split("\r")
    out = {}
    for s, segment in enumerate(segments):
        fields = segment.split("|")
        for f in range(1, len(fields)):
            if fields[0] == "MSH" and (f < 3 or 9 <= f <= 12):
                continue
            first, sep, rest = fields[f].partition("^")
            changed = fields[:f] + [f"{first or 'X'}\\X00\\Z{sep}{rest}"] + fields[f + 1:]
            number = f if fields[0] != "MSH" else f + 1  # MSH-1 is the separator itself
            lines = segments[:s] + ["|".join(changed)] + segments[s + 1:]
            out[f"{label} {fields[0]}-{number}"] = ("\r".join(lines) + "\r").replace("CTRL", f"NUL-{s}-{f}").encode()
    return out


def test_a_nul_in_any_field_is_answered_as_on_sqlite(batch):
    cases = {**with_nul("A01", A01), **with_nul("MDM", MDM)}
    answers = batch(message("OAKNH", "A28", pid("OAKNH", "OA917082", **ELIZABETH)), *cases.values())[1:]
    codes = {}
    for name, answer in zip(cases, answers):
        ack = hl7.parse(answer.ack.decode())
        errors = {str(err[3][0][0]) for err in ack.segments("ERR")} if answer.ack_code != "AA" else set()
        codes[name] = (answer.ack_code, errors)
    assert not [name for name, (_, errors) in codes.items() if "207" in errors]
    assert {name for name, (code, errors) in codes.items() if code == "AE" and "102" in errors} == KEYS
    assert codes["A01 MSH-4"][0] == "AR"  # no such facility
    assert sum(code == "AA" for code, _ in codes.values()) > 0.8 * len(codes)


def test_keys_longer_than_the_store_keeps_are_refused_on_both_databases(batch):
    """Found by a privacy audit: on PostgreSQL a 900-character MRN was kept cut to 199, and a
    second patient whose MRN began with the same 199 characters was refused AE 207 (internal)."""
    long_a, long_b = "A" * 199 + "1", "A" * 199 + "2"
    a40 = (f"MSH|^~\\&|APP|OAKNH|EXCHANGE|EXCHANGE|20261127120000||ADT^A40^ADT_A39|M1|P|2.5\r"
           f"EVN|A40|20261127120000\rPID|1||OA917082^^^OAKNH^MR||HANSON^ELIZABETH\rMRG|{long_b}^^^OAKNH^MR\r")
    cases = {
        ("PID-3", "identifier", 199): A01.replace("OA917082^^^OAKNH^MR", f"{long_a}^^^OAKNH^MR"),
        ("PV1-19", "visit number", 250): A01.replace("|V100|", f"|{'V' * 251}|"),
        ("TXA-12", "document number", 427): MDM.replace("|DOC1|", f"|{'D' * 428}|"),
        ("TXA-13", "parent document number", 427): MDM.replace("|PAR0|", f"|{'P' * 428}|"),
        ("MRG-1", "prior identifier", 199): a40,
    }
    raws = [raw.replace("CTRL", f"LONG{n}").encode() for n, raw in enumerate(cases.values())]
    answers = batch(message("OAKNH", "A28", pid("OAKNH", "OA917082", **ELIZABETH)), *raws)[1:]
    for (location, what, limit), answer in zip(cases, answers):
        ack = hl7.parse(answer.ack.decode())
        assert answer.ack_code == "AE" and str(ack.segment("ERR")[3][0][0]) == "102", location
        assert str(ack.segment("MSA")[3]) == f"{location} {what} is longer than {limit} characters"
    fits = A01.replace("OA917082^^^OAKNH^MR", f"{'A' * 199}^^^OAKNH^MR").replace("CTRL", "FITS").encode()
    assert batch(fits)[0].ack_code == "AA"
    # found by a workbench audit: a record whose MRN is ".." could not be opened (the browser resolves it)
    for n, dots in enumerate((".", "..")):
        answer = batch(A01.replace("OA917082^^^OAKNH^MR", f"{dots}^^^OAKNH^MR").replace("CTRL", f"DOTS{n}").encode())[0]
        assert answer.ack_code == "AE" and b"PID-3 identifier cannot be '.' or '..'" in answer.ack



def test_a_problem_in_a_second_pid_mrg_or_pv1_names_that_segment(batch):
    """Found by a verification audit: the second patient's bad field of an A24 or A17 was reported
    in ERR-2 as the first PID's (PID^1^3), and a too-long PV1-50 as PV1-19."""
    def msg(event, *segments, control):
        return ("\r".join([f"MSH|^~\\&|APP|OAKNH|EXCHANGE|EXCHANGE|20261127120000||ADT^{event}|{control}|P|2.5",
                           f"EVN|{event}|20261127120000", *segments]) + "\r").encode()

    long_mrn = "M" * 200
    a24 = msg("A24", "PID|1||OA1^^^OAKNH^MR||DOE^JANE", f"PID|2||{long_mrn}^^^OAKNH^MR||DOE^JOHN", control="L1")
    a17 = msg("A17", "PID|1||OA1^^^OAKNH^MR||DOE^JANE||19700101", "PV1|1|I|W1^1^A||||||||||||||||V1",
              "PID|2||OA2^^^OAKNH^MR||DOE^JOHN||1970130X", "PV1|1|I|W2^2^B||||||||||||||||V2", control="L2")
    a01 = msg("A01", "PID|1||OA3^^^OAKNH^MR||DOE^JIM", "PV1|1|I|W1^1^A" + "|" * 47 + "V" * 251, control="L3")
    answers = batch(a24, a17, a01)
    errs = [[s for s in a.ack.decode().split("\r") if s.startswith("ERR")] for a in answers]
    assert answers[0].ack_code == "AE" and errs[0][0].startswith("ERR||PID^2^3|102^")
    assert answers[1].ack_code == "AA" and errs[1] == [
        "ERR||PID^2^7|102^Data type error^HL70357|W||||PID(2)-7: unparseable timestamp ignored"]
    assert answers[2].ack_code == "AE" and errs[2][0].startswith("ERR||PV1^1^50|102^")
