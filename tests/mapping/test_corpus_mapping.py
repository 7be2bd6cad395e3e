"""Every ADT and MDM message in the shared corpus maps without an exception."""
import pytest

from exchange.hl7.charset import CharsetError
from exchange.mapping.events import Changes, FacilityContext, MappingError, map_message, needs
from exchange.mapping.state import MemoryState

from .helpers import CORPUS, read

FILES = sorted(p for p in CORPUS.rglob("*.hl7"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(CORPUS)))
def test_every_adt_and_mdm_maps(path):
    raw = path.read_bytes()
    try:
        msg, header = read(raw)
    except CharsetError:
        pytest.skip("not decodable: rejected before mapping")
    if header.message_type not in ("ADT", "MDM"):
        pytest.skip("not ADT/MDM")
    for authority in ("", "HOSP"):
        ctx = FacilityContext(header.facility, authority)
        needs(msg, ctx)
        state = MemoryState()
        result = map_message(msg, header, ctx, state)
        assert isinstance(result, (Changes, MappingError))
        if isinstance(result, MappingError):
            assert result.problem.code in (101, 102, 104, 200, 201, 204, 205)
            assert result.problem.location and result.problem.text
        else:
            state.apply(result, "m1")
            state.snapshot(history=True)


def test_corpus_is_there():
    assert len(FILES) >= 90
