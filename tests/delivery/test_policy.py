"""exchange.delivery.policy: judging a destination's ACK, and the retry schedule (pure)."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exchange.delivery.policy import Kind, Settings, backoff, judge

MSH = "MSH|^~\\&|OAKNH-ADT|OAKNH|EXCHANGE|EXCHANGE|20261127120000||ACK^A01^ACK|R1|P|2.5"


def ack(*segments: str, msh: str = MSH) -> bytes:
    return ("\r".join((msh,) + segments) + "\r").encode()


def test_aa_and_ca_deliver() -> None:
    v = judge(ack("MSA|AA|D1"), "D1")
    assert (v.kind, v.code, v.reason) == (Kind.DELIVERED, "AA", None)
    v = judge(ack("MSA|CA|D1"), "D1")
    assert (v.kind, v.code, v.reason) == (Kind.DELIVERED, "CA", None)
    # lower case, spaces, LF segment ends and a BOM are tolerated
    v = judge(b"\xef\xbb\xbf" + ack("MSA| aa |D1").replace(b"\r", b"\n"), "D1")
    assert (v.kind, v.code) == (Kind.DELIVERED, "AA")


@pytest.mark.parametrize("code", ["AE", "AR", "CE", "CR"])
def test_refusals_fail_with_the_reason(code: str) -> None:
    v = judge(ack(f"MSA|{code}|D1|Unknown patient \\T\\ visit"), "D1")
    assert (v.kind, v.code, v.reason) == (Kind.FAILED, code, f"{code}: Unknown patient & visit")


def test_err_segments_add_to_the_reason() -> None:
    # v2.5: ERR-3 code^text, ERR-8 user message; MSA-3 empty
    v = judge(ack("MSA|AE|D1", "ERR||PID^1^3|204^Unknown key identifier^HL70357|E||||MRN not on file"), "D1")
    assert v.reason == "AE: MRN not on file"
    v = judge(ack("MSA|AE|D1", "ERR||PID^1^3|204^Unknown key identifier^HL70357|E"), "D1")
    assert v.reason == "AE: 204 Unknown key identifier"
    # v2.3/2.4: ERR-1 segment^sequence^field^code&text
    v = judge(ack("MSA|AR|D1|Rejected", "ERR|PID^1^3^204&Unknown key"), "D1")
    assert v.reason == "AR: Rejected; 204 Unknown key"
    # the same text twice is said once; nothing at all: the code
    v = judge(ack("MSA|AE|D1|MRN not on file", "ERR||||E||||MRN not on file"), "D1")
    assert v.reason == "AE: MRN not on file"
    assert judge(ack("MSA|AR|D1"), "D1").reason == "AR"


def test_another_field_separator() -> None:
    msh = "MSH_^~\\&_OAKNH_OAKNH_EX_EX_20261127__ACK_R1_P_2.5"
    assert judge(ack("MSA_AA_D1", msh=msh), "D1").kind is Kind.DELIVERED


@pytest.mark.parametrize(
    "reply, reason",
    [
        (ack("MSA|AA|D0"), "MSA-2 'D0' is not the copy's MSH-10 'D1' (MSA-1 'AA')"),
        (ack("MSA|AA|"), "MSA-2 '' is not the copy's MSH-10 'D1' (MSA-1 'AA')"),
        (ack("MSA|AE|D0|bad"), "MSA-2 'D0' is not the copy's MSH-10 'D1' (MSA-1 'AE')"),
        (ack(), "the reply has no MSA segment"),
        (b"", "the reply has no MSA segment"),
        (ack("MSA|XX|D1"), "MSA-1 'XX' is not an acknowledgement code"),
        (ack("MSA||D1"), "MSA-1 '' is not an acknowledgement code"),
    ],
)
def test_protocol_errors(reply: bytes, reason: str) -> None:
    """A reply to another message carries no code of the copy's: a queued copy never shows
    ack_code AA (found by a black-box audit)."""
    v = judge(reply, "D1")
    assert (v.kind, v.reason) == (Kind.PROTOCOL, reason)
    assert v.code is None or reason.startswith("MSA-1")


def test_a_long_reason_is_cut() -> None:
    v = judge(ack("MSA|AE|D1|" + "x" * 2000), "D1")
    assert len(v.reason) == 500 and v.reason.endswith("...")


@given(st.binary(max_size=300), st.text(max_size=20))
def test_judge_never_raises(reply: bytes, control_id: str) -> None:
    v = judge(reply, control_id)
    assert v.kind in Kind


def test_backoff_doubles_up_to_the_cap_with_jitter() -> None:
    assert [backoff(n, 1.0, 60.0, 0.999999) for n in range(1, 9)] == pytest.approx([1, 2, 4, 8, 16, 32, 60, 60], rel=1e-5)
    assert [backoff(n, 1.0, 60.0, 0.0) for n in range(1, 4)] == [0.5, 1.0, 2.0]
    assert backoff(10_000, 1.0, 300.0, 0.5) == 225.0  # no overflow
    assert backoff(0, 2.0, 10.0, 0.0) == 1.0  # attempts below 1 count as 1


@given(st.integers(min_value=1, max_value=200), st.floats(0.01, 100), st.floats(0.0, 1.0), st.floats(0, 0.999))
def test_backoff_bounds(attempts: int, initial: float, extra: float, rand: float) -> None:
    maximum = initial * (1 + extra * 1000)
    wait = backoff(attempts, initial, maximum, rand)
    ceiling = min(maximum, initial * 2 ** (attempts - 1))
    assert ceiling / 2 <= wait <= ceiling <= maximum


def test_settings_are_checked() -> None:
    Settings(timeout=5, retry_initial=1, retry_max=1, poll=0.1)
    for bad in (dict(timeout=0), dict(retry_initial=0), dict(retry_initial=5, retry_max=4), dict(poll=0), dict(batch=0)):
        with pytest.raises(ValueError):
            Settings(**bad)
