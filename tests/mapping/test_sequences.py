"""Any sequence of ADT/MDM events maps and applies without an exception, deterministically."""
from hypothesis import given, settings, strategies as st

from exchange.mapping.events import Changes, FacilityContext, MappingError, map_message
from exchange.mapping.state import MemoryState

from .helpers import msh, synthetic

CTX = FacilityContext("HOSP", "HOSP")
ADT = ["A01", "A02", "A03", "A04", "A05", "A06", "A07", "A08", "A11", "A12", "A13", "A28", "A31", "A38",
       "A40", "A47", "A34", "A24", "A37"]
MDM = [f"T{n:02d}" for n in range(1, 12)]

event = st.tuples(
    st.sampled_from(ADT + MDM),
    st.sampled_from(["1", "2", "3"]),  # MRN
    st.sampled_from(["1", "2", "3"]),  # other MRN / visit / document
    st.sampled_from(["", "W1^1^A", "W2^2^B", '""']),
)


def build(ev, mrn, other, loc):
    if ev.startswith("T"):
        return synthetic(msh("MDM", ev), f"EVN|{ev}", f"PID|1||{mrn}^^^HOSP^MR",
                         f"TXA|1|NOTE|TX|||||||||D{other}|D{mrn}||||AU", "OBX|1|TX|||text")
    segs = [msh("ADT", ev), f"EVN|{ev}|20240101", f"PID|1||{mrn}^^^HOSP^MR||Doe^J"]
    if ev in ("A40", "A47", "A34"):
        segs.append(f"MRG|{other}^^^HOSP^MR")
    elif ev in ("A24", "A37"):
        segs.append(f"PID|1||{other}^^^HOSP^MR")
    else:
        segs.append("|".join(["PV1", "1", "I", loc] + [""] * 15 + [f"V{other}"]))
    return synthetic(*segs)


@settings(max_examples=150, deadline=None)
@given(st.lists(event, max_size=12))
def test_any_sequence_maps_and_applies(events):
    messages = [build(*e) for e in events]

    def replay():
        state = MemoryState()
        for i, (msg, header) in enumerate(messages):
            result = map_message(msg, header, CTX, state)
            assert isinstance(result, (Changes, MappingError))
            if isinstance(result, Changes):
                state.apply(result, i)
        return state.snapshot(history=True)

    assert replay() == replay()
