"""Synthetic v2.5.1 messages for the intake benchmark, one generator per workload:

- ``adt``: ADT^A01/A04/A08 (``generate``);
- ``mdm-text``: MDM^T02 with a 30-line text document in OBX TX lines (``generate_mdm_text``);
- ``mdm-pdf``: MDM^T02 with a 200 KB PDF as Base64 in one OBX ED (``generate_mdm_pdf``).

Everything here is made up: names come from short lists, identifiers from a
seeded random generator, and every MSH-10 carries the run id so that repeated
runs against the same database are not taken for resends.
"""
from __future__ import annotations

import base64
import random
from dataclasses import dataclass
from datetime import datetime, timedelta

FACILITY = "GENHOSP"  # MSH-4 and the PID-3.4 authority of its MRNs

FAMILY = (
    "Abernathy Brightwater Calloway Dunmore Ellsworth Fairbanks Galloway Hartwell "
    "Ivers Jettison Kilbride Larkspur Merriweather Norcott Oakhurst Pembrook Quennell "
    "Redfern Stanwick Thornbury Underhill Vantongeren Whitlock Yarborough Zeller"
).split()
GIVEN_F = "Adela Brisa Corinne Delphine Evadne Florence Giselle Honora Imelda Junia".split()
GIVEN_M = "Alaric Bertram Cosmo Dorian Emrys Fitzroy Gideon Horatio Ignatius Jasper".split()
MIDDLE = "A B C D E F G H J K L M N P R S T W".split()
STREETS = "Alder Birch Cedar Dogwood Elm Fir Hawthorn Juniper Linden Maple Oak Rowan".split()
CITIES = (("Springfield", "IL", "62701"), ("Riverton", "WY", "82501"),
          ("Fairview", "OR", "97024"), ("Georgetown", "TX", "78626"),
          ("Madison", "WI", "53703"), ("Salem", "MA", "01970"))
ALLERGENS = (("PCN", "Penicillin", "HIVES"), ("SULFA", "Sulfonamides", "RASH"),
             ("LATEX", "Latex", "ITCHING"), ("PNUT", "Peanut", "ANAPHYLAXIS"),
             ("ASA", "Aspirin", "WHEEZING"))
DIAGNOSES = (("I10", "Essential (primary) hypertension"), ("E11.9", "Type 2 diabetes mellitus"),
             ("J18.9", "Pneumonia, unspecified organism"), ("N39.0", "Urinary tract infection"),
             ("R07.9", "Chest pain, unspecified"), ("S72.001A", "Fracture of right femur"),
             ("K35.80", "Unspecified acute appendicitis"))
UNITS = ("MED^101^A", "MED^102^B", "SURG^210^A", "ICU^05^1", "CARD^314^B", "ORTHO^402^A")
DOCTORS = ("1234^Quill^Harriet^M^^^MD", "2345^Fenwick^Oswin^^^^DO",
           "3456^Ashdown^Mirela^T^^^MD", "4567^Brackley^Tobias^^^^MD")
RELATIONS = (("SPO", "Spouse"), ("PAR", "Parent"), ("CHD", "Child"), ("SIB", "Sibling"))
EVENTS = ("A01", "A04", "A08")


@dataclass(frozen=True, slots=True)
class Patient:
    mrn: str
    enterprise_id: str
    national_id: str
    family: str
    given: str
    middle: str
    sex: str
    birth_date: str
    street: str
    city: tuple[str, str, str]
    phone: str
    apartment: int
    work_phone: str


def _patient(rng: random.Random, number: int) -> Patient:
    sex = rng.choice("FM")
    born = datetime(1930, 1, 1) + timedelta(days=rng.randrange(0, 33000))
    return Patient(
        mrn=f"MR{number:08d}",
        enterprise_id=f"E{rng.randrange(10**9):09d}",
        # 9xx-prefixed numbers are never issued as SSNs: safe as synthetic ids.
        national_id=f"9{rng.randrange(10**8):08d}",
        family=rng.choice(FAMILY),
        given=rng.choice(GIVEN_F if sex == "F" else GIVEN_M),
        middle=rng.choice(MIDDLE),
        sex=sex,
        birth_date=born.strftime("%Y%m%d"),
        street=f"{rng.randrange(1, 9999)} {rng.choice(STREETS)} St",
        city=rng.choice(CITIES),
        phone=f"555{rng.randrange(10**7):07d}",
        apartment=rng.randrange(1, 40),
        work_phone=f"{rng.randrange(10**7):07d}",
    )


def _message(rng: random.Random, p: Patient, control_id: str, event: str,
             when: datetime, visit: int) -> bytes:
    ts = when.strftime("%Y%m%d%H%M%S")
    city, state, zip_code = p.city
    family2 = rng.choice(FAMILY)
    rel_code, rel_text = rng.choice(RELATIONS)
    unit = rng.choice(UNITS)
    doctor = rng.choice(DOCTORS)
    allergen = rng.choice(ALLERGENS)
    dx_code, dx_text = rng.choice(DIAGNOSES)
    pclass = "I" if event == "A01" else rng.choice("OE")
    admitted = (when - timedelta(minutes=rng.randrange(0, 600))).strftime("%Y%m%d%H%M")
    weight = f"{rng.uniform(45, 120):.1f}"
    segments = (
        f"MSH|^~\\&|ADTSYS|{FACILITY}|EXCHANGE|EXCHANGE|{ts}||ADT^{event}^ADT_A01|"
        f"{control_id}|P|2.5.1|||||USA||EN",
        f"EVN|{event}|{ts}|||{rng.randrange(100, 999)}^Registrar^Pat^^^^^^{FACILITY}|{ts}",
        f"PID|1||{p.mrn}^^^{FACILITY}^MR~{p.enterprise_id}^^^GENHOSP_EMPI^PI"
        f"~{p.national_id}^^^SSA^SS~V{visit:09d}^^^{FACILITY}^AN||"
        f"{p.family}^{p.given}^{p.middle}^^^^L||{p.birth_date}|{p.sex}|||"
        f"{p.street}^Apt {p.apartment}^{city}^{state}^{zip_code}^USA^H||"
        f"^PRN^PH^^1^{p.phone[:3]}^{p.phone[3:]}~^NET^Internet^{p.given.lower()}.{p.family.lower()}"
        f"@example.invalid|^WPN^PH^^1^555^{p.work_phone}|EN^English|"
        f"{rng.choice('MSDW')}|NON|V{visit:09d}^^^{FACILITY}^AN|||N||||||||N",
        f"PD1|||{FACILITY} Family Practice^^{rng.randrange(1000, 9999)}|{doctor}",
        f"NK1|1|{family2}^{rng.choice(GIVEN_F + GIVEN_M)}^^^^^L|{rel_code}^{rel_text}^HL70063|"
        f"{p.street}^^{city}^{state}^{zip_code}^USA|^PRN^PH^^1^555^{rng.randrange(10**7):07d}||EC^Emergency Contact",
        f"PV1|1|{pclass}|{unit}^{FACILITY}^^^^N||||{doctor}|{rng.choice(DOCTORS)}||"
        f"{rng.choice(('MED', 'SUR', 'CAR', 'ORT'))}||||{rng.choice('127')}|||{doctor}|"
        f"{'IP' if pclass == 'I' else 'OP'}|V{visit:09d}^^^{FACILITY}^VN|SP|||||||||||||||||||"
        f"{FACILITY}||A|||{admitted}",
        f"PV2|||{dx_code}^{dx_text}^I10||||||{(when + timedelta(days=3)).strftime('%Y%m%d')}"
        f"|3|||||||||||N",
        f"OBX|1|NM|29463-7^Body weight^LN||{weight}|kg^kilogram^UCUM|||||F|||{ts}",
        f"AL1|1|DA|{allergen[0]}^{allergen[1]}^L|{rng.choice(('MI', 'MO', 'SV'))}|{allergen[2]}|"
        f"{rng.randrange(1990, 2020)}0101",
        f"DG1|1||{dx_code}^{dx_text}^I10||{ts}|A|||||||||1|{doctor}",
    )
    return ("\r".join(segments) + "\r").encode("ascii")


def generate(count: int, run_id: str, *, prefix: str = "", seed: int = 2575,
             patients: int | None = None) -> list[tuple[bytes, bytes]]:
    """``count`` ADT messages as ``(mllp_frame, control_id)`` pairs.

    About a third as many patients as messages, so A08 updates and repeat
    visits hit patients the run has already registered.
    """
    return _generate(count, run_id, prefix, seed, patients,
                     lambda rng, p, control_id, when, i: _message(rng, p, control_id, rng.choice(EVENTS),
                                                                  when, 100000 + i))


# -- MDM^T02: a new document with its content ---------------------------------------

DOCUMENT_LINES = 30  # OBX TX lines of the text workload
PDF_BYTES = 200 * 1024  # the PDF workload's document, before Base64 (~273 KB in OBX-5)
DOCUMENT_TYPES = (("DS", "Discharge summary"), ("HP", "History and physical"),
                  ("CN", "Consultation note"), ("PN", "Progress note"))
SECTIONS = ("History", "Examination", "Assessment", "Plan", "Medications", "Follow-up")
PHRASES = (
    "patient reports improved appetite and sleep", "no acute distress noted on examination",
    "vital signs stable throughout the stay", "wound clean and dry with no erythema",
    "continue current regimen and monitor closely", "labs reviewed and within expected range",
    "ambulating independently with a walker", "pain controlled on oral analgesics",
    "tolerating a regular diet without nausea", "follow up in the clinic in two weeks",
    "education provided to the patient and family", "imaging shows no interval change",
)


def generate_mdm_text(count: int, run_id: str, *, prefix: str = "T", seed: int = 2575,
                      patients: int | None = None) -> list[tuple[bytes, bytes]]:
    """``count`` MDM^T02 messages, each a new document of DOCUMENT_LINES OBX TX lines (~2.5 KB of text)."""
    def build(rng, p, control_id, when, i):
        lines = []
        for n in range(DOCUMENT_LINES):
            if n % 6 == 0:
                lines.append(f"{SECTIONS[(n // 6) % len(SECTIONS)]}:")
            else:  # \T\ is an escaped "&": the mapping decodes escapes on some lines
                lines.append(f"{rng.choice(PHRASES).capitalize()}; {rng.choice(PHRASES)} \\T\\ "
                             f"{rng.choice(PHRASES)}.")
        obx = [f"OBX|{n}|TX|{'11490-0^Discharge summary^LN'}||{line}||||||F"
               for n, line in enumerate(lines, start=1)]
        return _mdm(rng, p, control_id, when, "TX", obx)

    return _generate(count, run_id, prefix, seed, patients, build)


def generate_mdm_pdf(count: int, run_id: str, *, prefix: str = "P", seed: int = 2575,
                     patients: int | None = None) -> list[tuple[bytes, bytes]]:
    """``count`` MDM^T02 messages, each a new document: a PDF_BYTES PDF, Base64, in one OBX ED."""
    rng = random.Random(f"{seed}-{prefix}-pdf")
    # A few made-up PDFs (a header, then incompressible bytes), shared by the messages.
    pdfs = []
    for _ in range(4):
        head = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\nstream\n"
        tail = b"\nendstream\n%%EOF\n"
        body = rng.randbytes(PDF_BYTES - len(head) - len(tail))
        pdfs.append(base64.b64encode(head + body + tail).decode("ascii"))

    def build(rng, p, control_id, when, i):
        obx = [f"OBX|1|ED|18842-5^Discharge summary^LN||^application^pdf^Base64^{pdfs[i % len(pdfs)]}||||||F"]
        return _mdm(rng, p, control_id, when, "AP", obx)

    return _generate(count, run_id, prefix, seed, patients, build)


def _mdm(rng: random.Random, p: Patient, control_id: str, when: datetime, presentation: str,
         obx: list[str]) -> bytes:
    ts = when.strftime("%Y%m%d%H%M%S")
    city, state, zip_code = p.city
    doctor = rng.choice(DOCTORS)
    doc_code, doc_text = rng.choice(DOCUMENT_TYPES)
    txa = [""] * 20
    txa[0], txa[1], txa[2], txa[3] = "TXA", "1", f"{doc_code}^{doc_text}^HL70270", presentation
    txa[4] = txa[6] = ts  # TXA-4 activity, TXA-6 origination
    txa[5] = txa[9] = doctor  # TXA-5 primary activity provider, TXA-9 originator
    txa[12] = f"DOC{control_id}^{FACILITY}"  # TXA-12 unique document number
    txa[17], txa[19] = "AU", "AV"  # TXA-17 authenticated, TXA-19 available
    segments = (
        f"MSH|^~\\&|DOCSYS|{FACILITY}|EXCHANGE|EXCHANGE|{ts}||MDM^T02^MDM_T02|"
        f"{control_id}|P|2.5.1|||||USA||EN",
        f"EVN|T02|{ts}",
        f"PID|1||{p.mrn}^^^{FACILITY}^MR~{p.enterprise_id}^^^GENHOSP_EMPI^PI||"
        f"{p.family}^{p.given}^{p.middle}^^^^L||{p.birth_date}|{p.sex}|||"
        f"{p.street}^^{city}^{state}^{zip_code}^USA^H||^PRN^PH^^1^{p.phone[:3]}^{p.phone[3:]}",
        f"PV1|1|{rng.choice('IO')}|{rng.choice(UNITS)}^{FACILITY}||||{doctor}",
        "|".join(txa),
        *obx,
    )
    return ("\r".join(segments) + "\r").encode("ascii")


def patient_pool(count: int, *, prefix: str = "", seed: int = 2575,
                 patients: int | None = None) -> list[Patient]:
    """The patients ``generate(count, ..., prefix=, seed=, patients=)`` draws its messages from
    (the same for the MDM generators): e.g. to register them at other facilities first."""
    return _pool(random.Random(f"{seed}-{prefix}"), count, patients)


def _pool(rng: random.Random, count: int, patients: int | None) -> list[Patient]:
    return [_patient(rng, n) for n in range(max(1, patients or count // 3))]


def _generate(count, run_id, prefix, seed, patients, build) -> list[tuple[bytes, bytes]]:
    rng = random.Random(f"{seed}-{prefix}")
    pool = _pool(rng, count, patients)
    start = datetime(2024, 3, 1, 8, 0, 0)
    out = []
    for i in range(count):
        control_id = f"{run_id}{prefix}{i:07d}"  # MSH-10: at most 20 characters in v2.5.1
        payload = build(rng, rng.choice(pool), control_id, start + timedelta(seconds=3 * i), i)
        out.append((b"\x0b" + payload + b"\x1c\x0d", control_id.encode("ascii")))
    return out


WORKLOADS = {"adt": generate, "mdm-text": generate_mdm_text, "mdm-pdf": generate_mdm_pdf}
