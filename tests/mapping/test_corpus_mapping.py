"""Every ADT and MDM message in the shared corpus maps without an exception."""
import pytest

from exchange.hl7.charset import CharsetError
from exchange.mapping.events import Changes, FacilityContext, MappingError, map_message, needs
from exchange.mapping.state import MemoryState

from .helpers import CORPUS, read

FILES = sorted(p for p in CORPUS.rglob("*.hl7"))


def _adt_and_mdm():
    """The corpus files the record model maps (ADT/MDM that decode); the others
    are answered before mapping and are covered by tests/test_corpus.py."""
    for path in FILES:
        try:
            msg, header = read(path.read_bytes())
        except CharsetError:
            continue
        if header.message_type in ("ADT", "MDM"):
            yield path


ADT_AND_MDM = list(_adt_and_mdm())


@pytest.mark.parametrize("path", ADT_AND_MDM, ids=lambda p: str(p.relative_to(CORPUS)))
def test_every_adt_and_mdm_maps(path):
    msg, header = read(path.read_bytes())
    for authority in ("", "HOSP"):
        ctx = FacilityContext(header.facility, authority)
        needs(msg, ctx)
        state = MemoryState()
        result = map_message(msg, header, ctx, state)
        assert isinstance(result, (Changes, MappingError))
        if isinstance(result, MappingError):
            assert result.problem.code in (100, 101, 102, 104, 200, 201, 204, 205)  # 100: a whole batch file
            assert result.problem.location and result.problem.text
        else:
            state.apply(result, "m1")
            state.snapshot(history=True)


def test_corpus_is_there():
    assert len(FILES) >= 90
    assert len(ADT_AND_MDM) >= 60
