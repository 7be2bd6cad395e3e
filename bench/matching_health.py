"""Matching accuracy on healthcare-shaped data (a script, not a test).

A seeded generator of its own (reproducible: same ``--seed``, same data)
makes persons registered at two or three of three facilities (a hospital,
a nursing home, home health) with the variations registration clerks
produce, and the people a patient index must keep apart:

- **variations** of one person between registrations: nicknames (Liz /
  Elizabeth, Bob / Robert), married names (the new surname alone,
  hyphenated, or with the maiden name as a second PID-5 repetition), day
  and month swapped, one digit of the birth date or the SSN wrong, two SSN
  digits swapped, a move (new address, often a new phone), the SSN missing
  (more often at the nursing home and home health), typos in names, the
  middle name full, as an initial or missing, a JR/SR suffix left out;
- **hard negatives**: twins (same surname, birth date, address and phone,
  another given name, sequential SSNs), a father and son (same given and
  surname, JR / SR, same address and phone), spouses (same surname, address
  and phone); and, unless ``--no-overlays``, shapes a black-box audit found
  linked: a grown child under a parent's SSN (named after the parent half
  the time), a brother or sister under the same SSN, and twins of one given
  name told apart by the middle name (same home, SSNs in sequence).

Every registration is an ADT^A28 (PID-3 MRN, PID-5 name(s), PID-7 birth
date, PID-8 sex, PID-11 address, PID-13 phone, PID-19 SSN); they arrive in
a random order. Then, per method:

- false automatic links (pairs of records of different persons put in one
  person; target 0), with how many of them are twins, father and son, or
  spouses;
- the share of true cross-facility pairs linked automatically (target >= 95 %);
- of the true pairs not linked, how many are shown together in an open
  review (target: all of them), and how many open reviews there are per
  record (target < 5 %);
- for the missed pairs, which variations they carry.

Methods: a plain deterministic rule (same SSN, or same family name, given
name and birth date), the offline simulation of the live decisions
(``bench/matching_offline.py``: fast, to iterate on the model), and the
exchange itself through the real intake path (``exchange serve`` on a
fresh SQLite or PostgreSQL database, MLLP, ``exchange export links`` and the
review queue: ``bench/matching.py`` starts and reads it)::

    .venv/bin/python bench/matching_health.py                  # offline and SQLite
    .venv/bin/python bench/matching_health.py --postgresql     # and PostgreSQL
    .venv/bin/python bench/matching_health.py --offline-only --persons 20000

All of it is synthetic: no real patient.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import shutil
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import bench.matching as live  # noqa: E402
from bench.intake.runner import (  # noqa: E402
    TargetSkipped,
    child_env,
    free_port,
    healthz_probe,
    kill_children,
    spawn,
    stop,
    wait_ready,
)
from bench.matching_offline import deterministic, em_model, simulate  # noqa: E402
from exchange.hl7.header import read_header  # noqa: E402
from exchange.mapping.events import FacilityContext, MappingError, map_message  # noqa: E402
from exchange.mapping.message import Message  # noqa: E402
from exchange.mapping.state import MemoryState  # noqa: E402
from exchange.matching.decide import Action  # noqa: E402
from exchange.matching.features import features_of  # noqa: E402
from exchange.matching.model import default_model, term_frequencies  # noqa: E402
from exchange.matching.nicknames import canonical_given_names  # noqa: E402
from exchange.store.training import monotone  # noqa: E402  (what the match-model job applies to EM's estimate)

FACILITIES = (("HOSP", "Mercy Hospital", "hospital"), ("NURS", "Oakwood Nursing Home", "nursing_home"),
              ("HOME", "Sunrise Home Health", "home_health"))
SSN_KEPT = {"HOSP": 0.85, "NURS": 0.6, "HOME": 0.5}  # share of registrations with the SSN, by facility

# --- names and places (synthetic; frequent names first, drawn with Zipf-like weights) ----------------------

SURNAMES = """SMITH JOHNSON WILLIAMS BROWN JONES GARCIA MILLER DAVIS RODRIGUEZ MARTINEZ HERNANDEZ LOPEZ GONZALEZ
WILSON ANDERSON THOMAS TAYLOR MOORE JACKSON MARTIN LEE PEREZ THOMPSON WHITE HARRIS SANCHEZ CLARK RAMIREZ LEWIS
ROBINSON WALKER YOUNG ALLEN KING WRIGHT SCOTT TORRES NGUYEN HILL FLORES GREEN ADAMS NELSON BAKER HALL RIVERA
CAMPBELL MITCHELL CARTER ROBERTS GOMEZ PHILLIPS EVANS TURNER DIAZ PARKER CRUZ EDWARDS COLLINS REYES STEWART MORRIS
MORALES MURPHY COOK ROGERS GUTIERREZ ORTIZ MORGAN COOPER PETERSON BAILEY REED KELLY HOWARD RAMOS KIM COX WARD
RICHARDSON WATSON BROOKS CHAVEZ WOOD JAMES BENNETT GRAY MENDOZA RUIZ HUGHES PRICE ALVAREZ CASTILLO SANDERS PATEL
MYERS LONG ROSS FOSTER JIMENEZ POWELL JENKINS PERRY RUSSELL SULLIVAN BELL COLEMAN BUTLER HENDERSON BARNES GONZALES
FISHER VASQUEZ SIMMONS ROMERO JORDAN PATTERSON ALEXANDER HAMILTON GRAHAM REYNOLDS GRIFFIN WALLACE MORENO WEST COLE
HAYES BRYANT HERRERA GIBSON ELLIS TRAN MEDINA AGUILAR STEVENS MURRAY FORD CASTRO MARSHALL OWENS HARRISON FERNANDEZ
MCDONALD WOODS WASHINGTON KENNEDY WELLS VARGAS HENRY CHEN FREEMAN WEBB TUCKER GUZMAN BURNS CRAWFORD OLSON SIMPSON
PORTER HUNTER GORDON MENDEZ SILVA SHAW SNYDER MASON DIXON MUNOZ HUNT HICKS HOLMES PALMER WAGNER BLACK ROBERTSON
BOYD ROSE STONE SALAZAR FOX WARREN MILLS MEYER RICE SCHMIDT GARZA DANIELS FERGUSON NICHOLS STEPHENS SOTO WEAVER
RYAN GARDNER PAYNE GRANT DUNN KELLEY SPENCER HAWKINS ARNOLD PIERCE VAZQUEZ HANSEN PETERS SANTOS HART BRADLEY
KNIGHT ELLIOTT CUNNINGHAM DUNCAN ARMSTRONG HUDSON CARROLL LANE RILEY ANDREWS ALVARADO RAY DELGADO BERRY PERKINS
HOFFMAN JOHNSTON MATTHEWS PENA RICHARDS CONTRERAS WILLIS CARPENTER LAWRENCE SANDOVAL KOWALCZYK NOWAKOWSKI
LINDQVIST OKAFOR NAKAMURA ABERNATHY VANDERMEER OYELARAN SZYMANSKI MACALLISTER""".split()
FEMALE = """MARY PATRICIA JENNIFER LINDA ELIZABETH BARBARA SUSAN JESSICA SARAH KAREN NANCY LISA BETTY MARGARET SANDRA
ASHLEY KIMBERLY EMILY DONNA MICHELLE DOROTHY CAROL AMANDA MELISSA DEBORAH STEPHANIE REBECCA SHARON LAURA CYNTHIA
KATHLEEN AMY SHIRLEY ANGELA HELEN ANNA BRENDA PAMELA NICOLE EMMA SAMANTHA KATHERINE CHRISTINE DEBRA RACHEL
CATHERINE CAROLYN JANET RUTH MARIA HEATHER DIANE VIRGINIA JULIE JOYCE VICTORIA OLIVIA KELLY CHRISTINA LAUREN JOAN
EVELYN JUDITH MEGAN CHERYL ANDREA HANNAH MARTHA JACQUELINE FRANCES GLORIA ANN TERESA KATHRYN SARA JANICE JEAN ALICE
MADISON DORIS ABIGAIL JULIA JUDY GRACE DENISE AMBER MARILYN BEVERLY DANIELLE THERESA SOPHIA MARIE DIANA BRITTANY
NATALIE ISABELLA CHARLOTTE ROSE ALEXIS KAYLA""".split()
MALE = """JAMES ROBERT JOHN MICHAEL DAVID WILLIAM RICHARD JOSEPH THOMAS CHARLES CHRISTOPHER DANIEL MATTHEW ANTHONY MARK
DONALD STEVEN PAUL ANDREW JOSHUA KENNETH KEVIN BRIAN GEORGE TIMOTHY RONALD EDWARD JASON JEFFREY RYAN JACOB GARY
NICHOLAS ERIC JONATHAN STEPHEN LARRY JUSTIN SCOTT BRANDON BENJAMIN SAMUEL GREGORY ALEXANDER FRANK PATRICK RAYMOND
JACK DENNIS JERRY TYLER AARON JOSE ADAM NATHAN HENRY DOUGLAS ZACHARY PETER KYLE ETHAN WALTER NOAH JEREMY
CHRISTIAN KEITH ROGER TERRY GERALD HAROLD SEAN AUSTIN CARL ARTHUR LAWRENCE DYLAN JESSE JORDAN BRYAN BILLY JOE BRUCE
GABRIEL LOGAN ALBERT WILLIE ALAN JUAN WAYNE ELIJAH RANDY ROY VINCENT RALPH EUGENE RUSSELL BOBBY MASON PHILIP LOUIS""".split()
NICKNAMES = {  # what clerks write for these given names (each pair is in exchange/matching/nicknames.csv)
    "ELIZABETH": ("LIZ", "BETH", "BETTY", "LIZZIE", "ELIZA"), "MARGARET": ("PEGGY", "MAGGIE", "MEG", "MARGIE"),
    "PATRICIA": ("PAT", "PATTY", "TRISH"), "JENNIFER": ("JENNY", "JEN"), "SUSAN": ("SUE", "SUSIE"),
    "KATHERINE": ("KATE", "KATHY", "KATIE"), "CATHERINE": ("CATHY", "KATE"), "KATHLEEN": ("KATHY", "KATE"),
    "DEBORAH": ("DEBBIE", "DEB"), "DEBRA": ("DEBBIE", "DEB"), "REBECCA": ("BECKY", "BECCA"),
    "CHRISTINE": ("CHRIS", "CHRISTY"), "SAMANTHA": ("SAM", "SAMMY"), "ABIGAIL": ("ABBY",), "VICTORIA": ("VICKY", "TORI"),
    "DOROTHY": ("DOT", "DOTTIE"), "BARBARA": ("BARB", "BARBIE"), "PAMELA": ("PAM",), "JUDITH": ("JUDY",),
    "FRANCES": ("FRAN", "FRANNIE"), "THERESA": ("TERRI", "TESS"), "SANDRA": ("SANDY",), "CYNTHIA": ("CINDY",),
    "ROBERT": ("BOB", "BOBBY", "ROB", "BERT"), "WILLIAM": ("BILL", "WILL", "BILLY", "LIAM"),
    "RICHARD": ("DICK", "RICK", "RICH"), "JAMES": ("JIM", "JIMMY", "JAMIE"), "JOSEPH": ("JOE", "JOEY"),
    "THOMAS": ("TOM", "TOMMY"), "CHARLES": ("CHUCK", "CHARLIE"), "MICHAEL": ("MIKE", "MICKEY"),
    "DAVID": ("DAVE", "DAVEY"), "CHRISTOPHER": ("CHRIS",), "DANIEL": ("DAN", "DANNY"), "MATTHEW": ("MATT",),
    "ANTHONY": ("TONY",), "DONALD": ("DON", "DONNIE"), "STEVEN": ("STEVE",), "ANDREW": ("ANDY", "DREW"),
    "KENNETH": ("KEN", "KENNY"), "EDWARD": ("ED", "EDDIE", "TED"), "RONALD": ("RON", "RONNIE"),
    "TIMOTHY": ("TIM", "TIMMY"), "GREGORY": ("GREG",), "NICHOLAS": ("NICK",), "JONATHAN": ("JON",),
    "BENJAMIN": ("BEN", "BENNY"), "SAMUEL": ("SAM", "SAMMY"), "ALEXANDER": ("ALEX", "AL"), "LAWRENCE": ("LARRY",),
    "GERALD": ("JERRY",), "HAROLD": ("HAL", "HARRY"), "HENRY": ("HANK", "HARRY"), "PETER": ("PETE",),
    "RAYMOND": ("RAY",), "ALBERT": ("AL", "BERT"), "WALTER": ("WALT",), "EUGENE": ("GENE",), "PHILIP": ("PHIL",),
    "FRANK": ("FRANKIE",), "DOUGLAS": ("DOUG",), "JEFFREY": ("JEFF",), "PATRICK": ("PAT",), "ZACHARY": ("ZACH",),
    "JOSHUA": ("JOSH",), "NATHAN": ("NATE",), "VINCENT": ("VINCE",),
}
STREET_NAMES = """OAK MAPLE CEDAR PINE ELM WALNUT CHESTNUT WILLOW BIRCH SPRUCE HICKORY ASH POPLAR MAGNOLIA LAUREL
SYCAMORE CHERRY DOGWOOD JUNIPER HAWTHORNE MAIN CHURCH WASHINGTON LINCOLN JEFFERSON FRANKLIN MADISON ADAMS JACKSON
MONROE LAKE HILL PARK RIVER SPRING MEADOW FOREST GROVE RIDGE VALLEY SUNSET HIGHLAND PROSPECT UNION MILL SCHOOL
COLLEGE BROAD MARKET WATER CENTER""".split()
STREET_TYPES = ("ST", "AVE", "RD", "DR", "LN", "CT", "BLVD", "WAY", "PL", "TER")
CITIES = (("SPRINGFIELD", "IL", "627", "217"), ("DECATUR", "IL", "625", "217"), ("CHAMPAIGN", "IL", "618", "217"),
          ("PEORIA", "IL", "616", "309"), ("BLOOMINGTON", "IL", "617", "309"), ("JACKSONVILLE", "IL", "626", "217"),
          ("LINCOLN", "IL", "626", "217"), ("TAYLORVILLE", "IL", "625", "217"), ("CHICAGO", "IL", "606", "312"),
          ("ST LOUIS", "MO", "631", "314"))


# Rare surnames, made of syllables: most people's surname is not among the common ones
# (the 260 above cover about a quarter of a US population; SMITH alone about 1 %).
SURNAME_HEADS = """AB AL AND BAR BEL BRAN BRO CAL CAR COR DAL DOR EL FAR FEL GAL GOR HAL HAR HOL KAR KEL
LAN LOR MAL MAR MOR NOR OR PAL PEN QUIN RAD ROS SAL SAR STAN TAL TOR VAL VAN WEL WIN ZEL""".split()
SURNAME_MIDDLES = ("", "", "", "A", "E", "I", "O", "EN", "ER", "IN", "ON", "AN")
SURNAME_TAILS = """BERG BY CZYK DALE DEN DORF FIELD FORD GREN HAM HOLM KOWSKI LAND LEY LING MAN MONT NESS
OFF OV SEN SKI SON STEIN STROM TON VICH WELL WICK WOOD""".split()
COMMON_SURNAME_SHARE = 0.25


def _zipf(items, s: float) -> tuple[list, list[float]]:
    return list(items), [1 / (rank + 1) ** s for rank in range(len(items))]


# --- identities and registrations ---------------------------------------------------------------------------


@dataclass
class Identity:
    """One real (synthetic) person: the truth every registration is a variation of."""

    number: int
    family: str
    given: str
    middle: str
    sex: str
    birth: date
    ssn: str
    street: str
    city: str
    state: str
    zip: str
    phone: str
    suffix: str = ""
    maiden: str = ""  # a married woman's birth surname
    kind: str = "person"  # person, twin, junior, senior, spouse (how the generator made it)


@dataclass
class Registration:
    """One facility's record of an identity, as its clerk typed it."""

    person: int
    facility: str
    mrn: str
    family: str
    given: str
    middle: str
    suffix: str
    sex: str
    birth: str  # YYYYMMDD, "" if not given
    ssn: str
    street: str
    city: str
    state: str
    zip: str
    phone: str
    aliases: tuple[str, ...] = ()  # other surnames (maiden name as a second PID-5 repetition)
    tags: tuple[str, ...] = ()  # the variations applied (reporting only)


@dataclass
class Population:
    registrations: list[Registration]
    truth: set  # frozenset pairs of (facility, mrn) of one identity, at different facilities
    same_facility_truth: set  # pairs of one identity at one facility (duplicate registrations; none generated)
    households: dict = field(default_factory=dict)  # frozenset pair of (facility, mrn) -> twins / father-son / spouses
    identities: list[Identity] = field(default_factory=list)


class Generator:
    """Reproducible persons and their registrations (``random.Random(seed)``)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.surnames = _zipf(SURNAMES, 0.75)  # SMITH: about 1.7 % of persons
        self.female = _zipf(FEMALE, 0.5)  # MARY: about 5 % of women
        self.male = _zipf(MALE, 0.5)
        self.ssns: set[str] = set()
        self.mrns: Counter = Counter()

    # -- identities --

    def pick(self, table) -> str:
        items, weights = table
        return self.rng.choices(items, weights)[0]

    def surname(self) -> str:
        if self.rng.random() < COMMON_SURNAME_SHARE:
            return self.pick(self.surnames)
        r = self.rng
        return r.choice(SURNAME_HEADS) + r.choice(SURNAME_MIDDLES) + r.choice(SURNAME_TAILS)

    def ssn(self) -> str:
        while True:
            value = f"{self.rng.randint(100, 899):03d}{self.rng.randint(10, 99):02d}{self.rng.randint(1000, 9999):04d}"
            if value not in self.ssns and value[-1] != "9":  # room for a twin's next number
                self.ssns.add(value)
                return value

    def place(self) -> tuple[str, str, str, str, str]:
        city, state, zip3, area = self.rng.choice(CITIES)
        name = self.rng.choice(STREET_NAMES) if self.rng.random() < 0.5 else self.rng.choice(SURNAMES)
        street = f"{self.rng.randint(1, 9999)} {name} {self.rng.choice(STREET_TYPES)}"
        if self.rng.random() < 0.1:
            street += f" APT {self.rng.randint(1, 40)}"
        return street, city, state, f"{zip3}{self.rng.randint(0, 99):02d}", f"{area}{self.rng.randint(2000000, 9999999)}"

    def identity(self, number: int, *, sex: str | None = None, born: tuple[int, int] = (1920, 2012)) -> Identity:
        sex = sex or self.rng.choice("FM")
        given = self.pick(self.female if sex == "F" else self.male)
        middle = self.pick(self.female if sex == "F" else self.male) if self.rng.random() < 0.6 else ""
        while middle == given:
            middle = self.pick(self.female if sex == "F" else self.male)
        birth = date(self.rng.randint(*born), 1, 1) + timedelta(days=self.rng.randrange(365))
        street, city, state, zip_, phone = self.place()
        family = self.surname()
        maiden = ""
        if sex == "F" and birth.year < 2000 and self.rng.random() < 0.25:  # married since her first registration
            maiden, family = family, self.surname()
            while family == maiden:
                family = self.surname()
        return Identity(number, family, given, middle, sex, birth, self.ssn(), street, city, state, zip_, phone,
                        maiden=maiden)

    def twin(self, number: int, of: Identity) -> Identity:
        sex = self.rng.choice("FM")
        given = self.pick(self.female if sex == "F" else self.male)
        while _name_and_nicknames(given) & _name_and_nicknames(of.given):  # not Catherine and Katherine (both Kate)
            given = self.pick(self.female if sex == "F" else self.male)
        ssn = of.ssn[:-1] + str(int(of.ssn[-1]) + 1)  # issued in sequence
        self.ssns.add(ssn)
        return replace(of, number=number, given=given, sex=sex, ssn=ssn, middle="", maiden="", kind="twin")

    def son(self, number: int, father: Identity) -> Identity:
        birth = father.birth + timedelta(days=self.rng.randint(22 * 365, 38 * 365))
        return replace(father, number=number, birth=birth, ssn=self.ssn(), suffix="JR", kind="junior",
                       middle=father.middle if self.rng.random() < 0.5 else "")

    def spouse(self, number: int, of: Identity) -> Identity:
        sex = "F" if of.sex == "M" else "M"
        spouse = self.identity(number, sex=sex, born=(of.birth.year - 6, min(of.birth.year + 6, 2005)))
        maiden = spouse.family if sex == "F" else ""
        return replace(spouse, family=of.family, maiden=maiden if maiden != of.family else "", street=of.street,
                       city=of.city, state=of.state, zip=of.zip, phone=of.phone, kind="spouse")

    def other_given(self, sex: str, *names: str) -> str:
        """A given name of ``sex`` that is none of ``names`` nor a nickname of one."""
        taken = set().union(*(_name_and_nicknames(n) for n in names if n))
        while True:
            given = self.pick(self.female if sex == "F" else self.male)
            if not _name_and_nicknames(given) & taken:
                return given

    def child_on_parents_ssn(self, number: int, parent: Identity) -> Identity:
        """A grown child living with a parent, registered under the parent's SSN (the guarantor's, an
        overlay); named after the parent half the time (no suffix: the clerk typed none)."""
        sex = parent.sex if self.rng.random() < 0.5 else self.rng.choice("FM")
        given = parent.given if sex == parent.sex else self.other_given(sex, parent.given)
        birth = parent.birth + timedelta(days=self.rng.randint(18 * 365, 40 * 365))
        middle = self.other_given(sex, given, parent.middle) if self.rng.random() < 0.6 else ""
        return replace(parent, number=number, given=given, middle=middle, sex=sex, birth=birth, maiden="",
                       suffix="", kind="parent's SSN")

    def sibling_on_one_ssn(self, number: int, of: Identity) -> Identity:
        """A brother or sister one to eight years younger, both registered under one parent's SSN."""
        sex = self.rng.choice("FM")
        given = self.other_given(sex, of.given)
        birth = of.birth + timedelta(days=self.rng.randint(300, 8 * 365))
        middle = self.other_given(sex, given) if self.rng.random() < 0.6 else ""
        return replace(of, number=number, given=given, middle=middle, sex=sex, birth=birth, kind="one SSN")

    def twin_by_middle_name(self, number: int, of: Identity) -> Identity:
        """A twin of the same given name, told apart by the middle name (John Paul / John Michael); SSNs
        issued in sequence."""
        middle = self.other_given(of.sex, of.given, of.middle)
        ssn = of.ssn[:-1] + str(int(of.ssn[-1]) + 1)
        self.ssns.add(ssn)
        return replace(of, number=number, middle=middle, ssn=ssn, kind="middle-name twin")

    def co_resident(self, number: int, of: Identity) -> Identity:
        """Another resident of one care home (or a step-sibling, an in-law): another surname, the
        same given name and sex, born the same year on another day, at the same address and phone;
        an SSN of her own, or none."""
        while True:
            other = self.identity(number, sex=of.sex, born=(of.birth.year, of.birth.year))
            if other.family != of.family and other.birth != of.birth:
                break
        return replace(other, given=of.given, middle=self.other_given(of.sex, of.given) if of.middle else "",
                       street=of.street, city=of.city, state=of.state, zip=of.zip, phone=of.phone, maiden="",
                       kind="co-resident")

    # -- registrations --

    def registration(self, who: Identity, facility: str) -> Registration:
        r, tags = self.rng, []
        self.mrns[facility] += 1
        mrn = f"{facility[0]}{self.rng.randint(10, 99)}{self.mrns[facility]:06d}"
        given = who.given
        if who.given in NICKNAMES and r.random() < 0.12:
            given = r.choice(NICKNAMES[who.given])
            tags.append("nickname")
        elif r.random() < 0.02:
            given = _typo(r, given)
            tags.append("given typo")
        family, aliases = who.family, ()
        if who.maiden:
            style = r.choices(("maiden", "married", "hyphenated", "alias"), (0.3, 0.35, 0.2, 0.15))[0]
            if style == "maiden":
                family = who.maiden
            elif style == "hyphenated":
                family = f"{who.maiden}-{who.family}"
            elif style == "alias":
                aliases = (who.maiden,)
            tags.append(f"{style} name")
        if r.random() < 0.03:
            family = _typo(r, family)
            tags.append("surname typo")
        middle = who.middle
        if middle:
            roll = r.random()
            middle = middle if roll < 0.5 else middle[0] if roll < 0.8 else ""
        suffix = who.suffix
        if suffix and r.random() < 0.25:
            suffix = ""
            tags.append("suffix left out")
        b = who.birth
        birth = f"{b.year:04d}{b.month:02d}{b.day:02d}"
        roll = r.random()
        if roll < 0.02 and b.day <= 12 and b.day != b.month:
            birth = f"{b.year:04d}{b.day:02d}{b.month:02d}"
            tags.append("day/month swapped")
        elif roll < 0.05:
            birth = _digit_typo(r, birth)
            tags.append("birth date digit")
        elif roll < 0.055:
            birth = ""
            tags.append("no birth date")
        ssn = who.ssn if r.random() < SSN_KEPT[facility] else ""
        if not ssn:
            tags.append("no SSN")
        elif r.random() < 0.015:
            ssn = _ssn_digit(r, ssn)
            tags.append("SSN digit")
        elif r.random() < 0.01:
            i = r.randrange(8)
            ssn = ssn[:i] + ssn[i + 1] + ssn[i] + ssn[i + 2:]
            tags.append("SSN transposed")
        street, city, state, zip_, phone = who.street, who.city, who.state, who.zip, who.phone
        if r.random() < 0.12:
            new = self.place()
            street = new[0]
            if r.random() < 0.5:
                city, state, zip_ = new[1], new[2], new[3]
            if r.random() < 0.7:
                phone = new[4]
            tags.append("moved")
        if r.random() < 0.1:
            phone = ""
        sex = who.sex if r.random() > 0.01 else ""
        return Registration(who.number, facility, mrn, family, given, middle, suffix, sex, birth, ssn, street, city,
                            state, zip_, phone, aliases, tuple(tags))

    def facilities(self) -> list[str]:
        count = self.rng.choices((1, 2, 3), (0.25, 0.5, 0.25))[0]
        return self.rng.sample([f[0] for f in FACILITIES], count)


OVERLAY_SHARE = 0.01
"""Households of each overlay kind (parent's SSN, one SSN, middle-name twins) per generated person."""


def generate(persons: int, seed: int = 7, overlays: bool = True) -> Population:
    """``persons`` identities (about 6 % of them in a household with a hard negative), their
    registrations in a random arrival order, and the truth.

    With ``overlays``, 1 % of ``persons`` more households of each of three kinds a black-box audit
    found linked (two people each, added to the ``persons``): a grown child under a parent's SSN,
    a brother or sister under the same SSN, twins of one given name told apart by the middle
    name. They come from a generator of their own and are slotted into the arrival order at
    random, so the rest of the population is the one generated without them."""
    g = Generator(seed)
    identities: list[Identity] = []
    households: list[tuple[str, Identity, Identity]] = []
    while len(identities) < persons:
        n = len(identities)
        who = g.identity(n)
        identities.append(who)
        roll = g.rng.random()
        if roll < 0.02:
            other = g.twin(n + 1, who)
            households.append(("twins", who, other))
        elif roll < 0.04 and who.sex == "M" and who.birth.year < 1975:
            who.suffix, who.kind = "SR", "senior"
            other = g.son(n + 1, who)
            households.append(("father and son", who, other))
        elif roll < 0.10 and who.birth.year < 1995:
            other = g.spouse(n + 1, who)
            households.append(("spouses", who, other))
        else:
            continue
        identities.append(other)

    registrations: list[Registration] = []
    by_person: dict[int, list[Registration]] = defaultdict(list)
    for who in identities:
        for facility in g.facilities():
            reg = g.registration(who, facility)
            registrations.append(reg)
            by_person[who.number].append(reg)
    g.rng.shuffle(registrations)
    if overlays:
        _add_overlays(g, Generator(seed + 7919), round(persons * OVERLAY_SHARE), identities, households,
                      registrations, by_person)
        _add_overlays(g, Generator(seed + 104729), round(persons * OVERLAY_SHARE), identities, households,
                      registrations, by_person, kinds=("co-residents",), mrns_from=1_000_000)

    truth = set()
    for regs in by_person.values():
        for i, x in enumerate(regs):
            for y in regs[i + 1:]:
                truth.add(frozenset({(x.facility, x.mrn), (y.facility, y.mrn)}))
    pairs = {}
    for kind, a, b in households:
        for x in by_person[a.number]:
            for y in by_person[b.number]:
                pairs[frozenset({(x.facility, x.mrn), (y.facility, y.mrn)})] = kind
    return Population(registrations, truth, set(), pairs, identities)


def _add_overlays(g: Generator, x: Generator, count: int, identities, households, registrations, by_person,
                  kinds=("parent's SSN", "one SSN", "middle-name twins"), mrns_from: int = 900_000) -> None:
    """``count`` households of each overlay kind from ``x``, their registrations slotted into the
    arrival order at random (``x``'s draws only: ``g``'s population and order stay as they were)."""
    x.ssns = g.ssns  # no SSN of another person by chance
    x.mrns = Counter({code: mrns_from for code, _, _ in FACILITIES})  # MRNs of their own
    for _ in range(count):
        for kind in kinds:
            n = len(identities)
            if kind == "co-residents":  # the third matching audit's: two Marys of one care home
                first = replace(x.identity(n, born=(1925, 2010)), maiden="")
                other = x.co_resident(n + 1, first)
            elif kind == "parent's SSN":
                first = x.identity(n, born=(1925, 1985))
                other = x.child_on_parents_ssn(n + 1, first)
            elif kind == "one SSN":
                first = replace(x.identity(n, born=(1950, 2008)), maiden="")
                other = x.sibling_on_one_ssn(n + 1, first)
            else:
                first = replace(x.identity(n), maiden="")
                if not first.middle:
                    first.middle = x.other_given(first.sex, first.given)
                other = x.twin_by_middle_name(n + 1, first)
            identities += [first, other]
            households.append((kind, first, other))
            for who in (first, other):
                for facility in x.facilities():
                    reg = x.registration(who, facility)
                    registrations.insert(x.rng.randint(0, len(registrations)), reg)
                    by_person[who.number].append(reg)


def _name_and_nicknames(given: str) -> set[str]:
    """Every formal name a given name or one of its nicknames may stand for."""
    names = {given.lower(), *(n.lower() for n in NICKNAMES.get(given, ()))}
    return {formal for name in names for formal in canonical_given_names(name)}


def _typo(r: random.Random, text: str) -> str:
    letters = [i for i, c in enumerate(text) if c.isalpha()]
    if len(letters) < 3:
        return text
    i = r.choice(letters[1:])
    kind = r.random()
    if kind < 0.4:  # substitution
        return text[:i] + r.choice("AEIOULNRST") + text[i + 1:]
    if kind < 0.7:  # deletion
        return text[:i] + text[i + 1:]
    return text[:i] + text[i] + text[i:]  # a doubled letter


def _digit_typo(r: random.Random, birth: str) -> str:
    """One digit of YYYYMMDD wrong, still a valid date."""
    for _ in range(100):
        i = r.choice((2, 3, 5, 6, 7))
        candidate = birth[:i] + str(r.randrange(10)) + birth[i + 1:]
        if candidate == birth:
            continue
        try:
            date(int(candidate[:4]), int(candidate[4:6]), int(candidate[6:]))
        except ValueError:
            continue
        return candidate
    return birth


def _ssn_digit(r: random.Random, ssn: str) -> str:
    i = r.randrange(9)
    return ssn[:i] + str((int(ssn[i]) + r.randint(1, 9)) % 10) + ssn[i + 1:]


# --- as HL7, and as the exchange reads it --------------------------------------------------------------------


def a28(reg: Registration, number: int) -> tuple[bytes, bytes]:
    """(MLLP frame, MSH-10) of an ADT^A28 for one registration."""
    control_id = f"{reg.facility}-{number:07d}"
    name = f"{reg.family}^{reg.given}^{reg.middle}^{reg.suffix}^^^L"
    names = [name] + [f"{alias}^{reg.given}^^^^^M" for alias in reg.aliases]  # PID-5 repetitions: legal, maiden
    pid = [""] * 20
    pid[0], pid[1] = "PID", "1"
    pid[3] = f"{reg.mrn}^^^{reg.facility}^MR"
    pid[5] = "~".join(names)
    pid[7] = reg.birth
    pid[8] = reg.sex
    pid[11] = f"{reg.street}^^{reg.city}^{reg.state}^{reg.zip}"
    pid[13] = reg.phone
    pid[19] = reg.ssn
    message = (
        f"MSH|^~\\&|REG|{reg.facility}|EXCHANGE|EXCHANGE|20261127120000||ADT^A28^ADT_A05|{control_id}|P|2.5.1\r"
        f"EVN|A28|20261127120000\r" + "|".join(pid) + "\rPV1|1|N\r"
    )
    return live.START + message.encode() + live.END, control_id.encode()


def features_stream(frames: list[tuple[bytes, bytes]]) -> list:
    """(facility, mrn, Features) of each message, read by the exchange's own mapping (so the
    offline simulation sees exactly what the live path stores)."""
    state = MemoryState()
    contexts = {code: FacilityContext(code, code) for code, _, _ in FACILITIES}
    out = []
    for n, (frame, _) in enumerate(frames):
        raw = frame[1:-2]
        header = read_header(raw)
        mapped = map_message(Message(raw.decode(), header.delimiters), header, contexts[header.facility], state)
        if isinstance(mapped, MappingError):
            raise RuntimeError(f"message {n} does not map: {mapped.problem}")
        state.apply(mapped, n)
        mrn = next(op.mrn for op in mapped.operations if getattr(op, "mrn", None))
        out.append((header.facility, mrn, features_of(state.records[(header.facility, mrn)])))
    return out


# --- measuring -----------------------------------------------------------------------------------------------


@dataclass
class Result:
    label: str
    linked: set  # pairs put in one person automatically
    reviewed: set  # pairs shown together in an open review
    reviews: int | None  # open reviews (None: the method has none)


def figures(result: Result, pop: Population, records: int) -> dict:
    """The figures of one method. A missed pair counts as "in a review" when an open review
    shows a record of one side's person with a record of the other side's person: deciding
    that review joins them (a record reviewed against the person's other record is enough)."""
    cross = {p for p in result.linked if len({k[0] for k in p}) == 2}
    false = result.linked - pop.truth
    found = cross & pop.truth
    missed = pop.truth - cross
    person = _persons(result.linked)
    reviewed = {frozenset({person(a), person(b)}) for a, b in map(tuple, result.reviewed)}
    in_review = {p for p in missed if frozenset(person(k) for k in p) in reviewed}
    return {
        "false": len(false),
        "false_kinds": Counter(pop.households.get(p, "unrelated") for p in false),
        "recall": len(found) / len(pop.truth) if pop.truth else 1.0,
        "missed": len(missed),
        "missed_in_review": len(in_review),
        "reviews": result.reviews,
        "review_share": (result.reviews or 0) / records if records else 0.0,
        "missed_pairs": missed,
        "false_pairs": false,
    }


def _persons(linked: set):
    """record -> a representative of the person it ended in (union-find over the linked pairs)."""
    parent: dict = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for pair in linked:
        a, b = tuple(pair)
        parent[find(a)] = find(b)
    return find


def verdict(f: dict) -> str:
    """Which targets a method misses: no false link, >= 95 % linked, the rest in reviews, reviews < 5 %."""
    misses = []
    if f["false"]:
        misses.append("false links")
    if f["recall"] < 0.95:
        misses.append("< 95 % linked")
    if f["missed_in_review"] < f["missed"]:
        misses.append(f"{f['missed'] - f['missed_in_review']} missed pairs in no review")
    if f["review_share"] >= 0.05:
        misses.append("reviews >= 5 %")
    return "meets the targets" if not misses else "MISSES: " + ", ".join(misses)


def show(label: str, f: dict) -> None:
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(f["false_kinds"].items())) or "-"
    reviews = "-" if f["reviews"] is None else f"{f['reviews']:,} ({f['review_share']:.1%} of records)"
    print(f"  {label:<34} false links {f['false']:>4} ({kinds})  true pairs linked {f['recall']:.4f}  "
          f"missed {f['missed']:>4}, in a review {f['missed_in_review']:>4}  reviews {reviews}  "
          f"{verdict(f) if f['reviews'] is not None else ''}", flush=True)


def explain_misses(f: dict, pop: Population) -> None:
    """Which variations the missed pairs (and the false links) carry."""
    tags = {(r.facility, r.mrn): r.tags for r in pop.registrations}
    missed = Counter()
    for pair in f["missed_pairs"]:
        a, b = tuple(pair)
        for tag in set(tags[a]) | set(tags[b]):
            missed[tag] += 1
    print("    missed pairs carry: " + (", ".join(f"{t} {n}" for t, n in missed.most_common()) or "-"))
    if f["false_pairs"]:
        print("    falsely linked: " + ", ".join(f"{pop.households.get(p, 'unrelated')}" for p in
                                                     sorted(f["false_pairs"], key=sorted)[:10]))


def simulate_trained(stream, at: int) -> Result:
    """The offline simulation of what the live run does with ``--train-after``: the default
    model for the first ``at`` records, then the model EM estimates from those records."""
    import bench.matching_offline as offline_module

    trained, _ = monotone(em_model(stream[:at], default_model()))
    calls = itertools.count()
    real = offline_module.decide

    def switching(record, candidates, model, **kw):  # simulate() decides with one model: switch it at ``at``
        return real(record, candidates, model if next(calls) < at else trained, **kw)

    offline_module.decide = switching
    try:
        run = simulate(stream, default_model())
    finally:
        offline_module.decide = real
    return Result("offline, default then EM", run.linked, run.reviewed, run.actions[Action.REVIEW])


async def through_exchange(backend: str, frames, connections: int, at: int) -> tuple[Result, float, list[str]]:
    """The real intake path: exchange serve, MLLP, exchange export links and the review queue.

    With ``at`` < len(frames): after the first ``at`` messages the exchange is stopped,
    ``exchange reconcile match-model`` estimates and stores the model (what the nightly job
    does), and the exchange starts again on the same database for the rest.
    Returns (result, seconds sending, the job's report)."""
    live.FACILITIES = FACILITIES  # bench.matching writes these into the exchange's configuration
    workdir = Path(tempfile.mkdtemp(prefix="bench-health-"))
    server = await live.start(workdir, backend)
    seconds, job = 0.0, []
    try:
        for part in (frames[:at], frames[at:]):
            if not part:
                continue
            if seconds:  # the second part: train, then serve again on the same database
                await stop(server.proc)
                job = reconcile_match_model(server.database)
                server = await restart(server)
            took, refused = await live.send(server.mllp_port, part, connections)
            seconds += took
            if refused:
                raise RuntimeError(f"{len(refused)} messages not accepted (first: {refused[0]})")
    finally:
        await stop(server.proc)
    try:
        rows = live.export_links(server.database)
        reviewed, reviews = live.reviewed_pairs(server.database)
    finally:
        for fn in server.cleanup:
            fn()
        shutil.rmtree(workdir, ignore_errors=True)
    return Result(f"exchange on {backend}", live.linked_pairs(rows), reviewed, reviews), seconds, job


def reconcile_match_model(database: str) -> list[str]:
    """``exchange reconcile match-model`` as an operator runs it; its report."""
    done = subprocess.run([sys.executable, "-m", "exchange.cli", "reconcile", "match-model", "--database", database,
                           "--config", str(REPO / "config" / "exchange.toml")],
                          capture_output=True, text=True, env=child_env(), cwd=REPO, timeout=3600)
    if done.returncode not in (0, 1):
        raise RuntimeError(f"exchange reconcile match-model failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout.splitlines()


async def restart(server: live.Exchange) -> live.Exchange:
    """``exchange serve`` again on the same database (fresh ports)."""
    mllp_port, http_port = free_port(), free_port()
    config = live.write_config(server.workdir, mllp_port, http_port)
    log = server.workdir / "serve.log"
    proc = spawn([sys.executable, "-m", "exchange.cli", "serve", "--config", str(config), "--database",
                  server.database], log)
    try:
        await wait_ready(proc, healthz_probe(http_port), "200 from /healthz", log)
    except BaseException:
        await stop(proc)
        raise
    return live.Exchange(proc, mllp_port, server.database, server.workdir, server.cleanup)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--persons", type=int, default=3000, help="identities to generate (default 3000)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--postgresql", action="store_true", help="also through the exchange on PostgreSQL")
    parser.add_argument("--offline-only", action="store_true", help="no exchange: the rule and the simulation")
    parser.add_argument("--connections", type=int, default=4, help="MLLP connections, one message in flight each")
    parser.add_argument("--explain", action="store_true", help="the variations of the missed pairs, per method")
    parser.add_argument("--train-after", type=float, default=0.5, metavar="SHARE",
                        help="run `exchange reconcile match-model` after this share of the messages (default 0.5; "
                             "0: the default model throughout)")
    parser.add_argument("--no-overlays", action="store_true",
                        help="without the households of relatives under one SSN and of middle-name twins "
                             "(the population of the figures before them)")
    args = parser.parse_args(argv)

    pop = generate(args.persons, args.seed, overlays=not args.no_overlays)
    frames = [a28(reg, n) for n, reg in enumerate(pop.registrations)]
    stream = features_stream(frames)
    records = len(frames)
    kinds = Counter(pop.households.values())
    tagged = Counter(t for r in pop.registrations for t in r.tags)
    print(f"Healthcare-shaped population (seed {args.seed}): {len(pop.identities):,} persons, {records:,} records at "
          f"{len(FACILITIES)} facilities, {len(pop.truth):,} true cross-facility pairs; hard-negative pairs: "
          + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())), flush=True)
    print("  variations: " + ", ".join(f"{t} {n}" for t, n in tagged.most_common()), flush=True)

    rule = Result("deterministic rule", deterministic(stream), set(), None)
    results = [rule]
    tf, floor = term_frequencies(f for _, _, f in stream)
    for label, model in (("offline, default model", default_model()),
                         ("offline, default + tf", default_model().replace(tf=tf, tf_floor=floor)),
                         ("offline, EM model", monotone(em_model(stream, default_model()))[0])):
        run = simulate(stream, model)
        results.append(Result(label, run.linked, run.reviewed, run.actions[Action.REVIEW]))
    at = int(records * args.train_after) if 0 < args.train_after < 1 else records
    if at < records:
        results.append(simulate_trained(stream, at))
    for result in results:
        f = figures(result, pop, records)
        show(result.label, f)
        if args.explain:
            explain_misses(f, pop)
    if args.offline_only:
        return 0
    backends = ["sqlite"] + (["postgresql"] if args.postgresql else [])
    how = f"default model, EM after {at:,} messages" if at < records else "default model"
    for backend in backends:
        try:
            result, seconds, job = asyncio.run(through_exchange(backend, frames, args.connections, at))
        except TargetSkipped as exc:
            print(f"  exchange on {backend}: skipped: {exc}")
            continue
        finally:
            kill_children()
        f = figures(result, pop, records)
        show(result.label, f)
        if args.explain:
            explain_misses(f, pop)
        print(f"  {'':<34} ({how}) intake with matching: {records:,} messages in {seconds:.1f} s = "
              f"{records / seconds:,.0f} msg/s", flush=True)
        for line in job:
            print(f"  {'':<34} | {line}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
