"""harness/dicom/pdu.py against pynetdicom's own PDU classes, and its decoder under fuzzing.

Every PDU type goes both ways: encoded by us and decoded by pynetdicom.pdu, encoded by
pynetdicom and decoded by us, fields compared. The fuzz tests feed the decoder arbitrary
bytes and mutated valid PDUs: it must give a PDU or PduError, never anything else.
"""

from __future__ import annotations

import string
import struct

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import pdu as theirs
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    P_DATA,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification

from harness.dicom.pdu import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    PDV,
    AAbort,
    AAssociateAC,
    AAssociateRJ,
    AAssociateRQ,
    AReleaseRP,
    AReleaseRQ,
    ContextResult,
    PDataTF,
    PduError,
    ProposedContext,
    RoleSelection,
    UserInformation,
    associate_rq,
    decode_pdu,
)
from harness.resilience.ha import associate_rq as health_check_rq

ROUND_TRIP = settings(max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=400, deadline=2000, suppress_health_check=[HealthCheck.too_slow])

# -- strategies -----------------------------------------------------------------------------

uids = (
    st.lists(st.integers(0, 10**9).map(str), min_size=2, max_size=10)
    .map(".".join)
    .filter(lambda uid: len(uid) <= 64)
)
titles = st.text(string.ascii_uppercase + string.digits + "_", min_size=1, max_size=16)
context_ids = st.lists(st.integers(0, 127), min_size=1, max_size=6, unique=True).map(
    lambda indexes: [2 * index + 1 for index in indexes]
)


@st.composite
def user_informations(draw) -> UserInformation:
    role_uids = draw(st.lists(uids, max_size=4, unique=True))
    return UserInformation(
        max_length=draw(st.integers(0, 2**32 - 1)),
        implementation_class_uid=draw(uids),
        implementation_version_name=draw(titles),
        role_selections=tuple(
            RoleSelection(uid, draw(st.booleans()), draw(st.booleans())) for uid in role_uids
        ),
        async_ops_window=draw(st.none() | st.tuples(st.integers(0, 65535), st.integers(0, 65535))),
    )


@st.composite
def associate_rqs(draw) -> AAssociateRQ:
    contexts = tuple(
        ProposedContext(
            context_id, draw(uids), tuple(draw(st.lists(uids, min_size=1, max_size=4, unique=True)))
        )
        for context_id in draw(context_ids)
    )
    return AAssociateRQ(draw(titles), draw(titles), contexts, draw(user_informations()))


@st.composite
def associate_acs(draw) -> AAssociateAC:
    contexts = tuple(
        ContextResult(context_id, draw(st.integers(0, 4)), draw(uids))
        for context_id in draw(context_ids)
    )
    return AAssociateAC(draw(titles), draw(titles), contexts, draw(user_informations()))


associate_rjs = st.builds(
    AAssociateRJ, st.integers(0, 255), st.integers(0, 255), st.integers(0, 255)
)
pdvs = st.builds(PDV, st.integers(1, 255), st.integers(0, 3), st.binary(max_size=64))
pdata_tfs = st.lists(pdvs, min_size=1, max_size=5).map(lambda items: PDataTF(tuple(items)))
aborts = st.builds(AAbort, st.integers(0, 255), st.integers(0, 255))
any_pdu = st.one_of(
    associate_rqs(),
    associate_acs(),
    associate_rjs,
    pdata_tfs,
    st.just(AReleaseRQ()),
    st.just(AReleaseRP()),
    aborts,
)


# -- ours -> pynetdicom ------------------------------------------------------------------------


def _their_user_information(item) -> UserInformation:
    window = item.async_ops_window
    return UserInformation(
        max_length=item.maximum_length,
        implementation_class_uid=str(item.implementation_class_uid),
        implementation_version_name=item.implementation_version_name or "",
        role_selections=tuple(
            RoleSelection(str(role.sop_class_uid), bool(role.scu_role), bool(role.scp_role))
            for role in item.role_selection.values()
        ),
        async_ops_window=None
        if window is None
        else (window.max_operations_invoked, window.max_operations_performed),
    )


@ROUND_TRIP
@given(associate_rqs())
def test_our_associate_rq_reads_the_same_in_pynetdicom(ours: AAssociateRQ) -> None:
    pdu = theirs.A_ASSOCIATE_RQ()
    pdu.decode(ours.encode())
    assert (pdu.called_ae_title, pdu.calling_ae_title) == (ours.called_ae, ours.calling_ae)
    assert pdu.application_context_name == ours.application_context
    assert [
        (c.context_id, str(c.abstract_syntax), tuple(str(ts) for ts in c.transfer_syntax))
        for c in pdu.presentation_context
    ] == [(c.context_id, c.abstract_syntax, c.transfer_syntaxes) for c in ours.contexts]
    assert _their_user_information(pdu.user_information) == ours.user_information


@ROUND_TRIP
@given(associate_acs())
def test_our_associate_ac_reads_the_same_in_pynetdicom(ours: AAssociateAC) -> None:
    pdu = theirs.A_ASSOCIATE_AC()
    pdu.decode(ours.encode())
    assert (pdu.reserved_aet, pdu.reserved_aec) == (ours.called_ae, ours.calling_ae)
    assert pdu.application_context_name == ours.application_context
    assert [(c.context_id, c.result, str(c.transfer_syntax)) for c in pdu.presentation_context] == [
        (c.context_id, c.result, c.transfer_syntax) for c in ours.contexts
    ]
    assert _their_user_information(pdu.user_information) == ours.user_information


@ROUND_TRIP
@given(associate_rjs)
def test_our_associate_rj_reads_the_same_in_pynetdicom(ours: AAssociateRJ) -> None:
    pdu = theirs.A_ASSOCIATE_RJ()
    pdu.decode(ours.encode())
    assert (pdu.result, pdu.source, pdu.reason_diagnostic) == (
        ours.result,
        ours.source,
        ours.reason,
    )


@ROUND_TRIP
@given(pdata_tfs)
def test_our_p_data_tf_reads_the_same_in_pynetdicom(ours: PDataTF) -> None:
    pdu = theirs.P_DATA_TF()
    pdu.decode(ours.encode())
    assert [
        (item.presentation_context_id, item.presentation_data_value)
        for item in pdu.presentation_data_value_items
    ] == [(pdv.context_id, bytes([pdv.control]) + pdv.fragment) for pdv in ours.pdvs]


@ROUND_TRIP
@given(aborts)
def test_our_abort_reads_the_same_in_pynetdicom(ours: AAbort) -> None:
    pdu = theirs.A_ABORT_RQ()
    pdu.decode(ours.encode())
    assert (pdu.source, pdu.reason_diagnostic) == (ours.source, ours.reason)


def test_our_release_pdus_read_the_same_in_pynetdicom() -> None:
    for ours, cls in ((AReleaseRQ(), theirs.A_RELEASE_RQ), (AReleaseRP(), theirs.A_RELEASE_RP)):
        pdu = cls()
        pdu.decode(ours.encode())
        assert pdu.encode() == ours.encode()
        assert decode_pdu(pdu.encode()) == ours


# -- pynetdicom -> ours ------------------------------------------------------------------------


def _their_user_primitives(user: UserInformation) -> list:
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = user.max_length
    class_uid = ImplementationClassUIDNotification()
    class_uid.implementation_class_uid = user.implementation_class_uid
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = user.implementation_version_name
    primitives = [maximum, class_uid, version]
    if user.async_ops_window is not None:
        window = AsynchronousOperationsWindowNegotiation()
        (
            window.maximum_number_operations_invoked,
            window.maximum_number_operations_performed,
        ) = user.async_ops_window
        primitives.append(window)
    for role in user.role_selections:
        assume(role.scu_role or role.scp_role)  # pynetdicom refuses to send neither
        selection = SCP_SCU_RoleSelectionNegotiation()
        selection.sop_class_uid = role.sop_class_uid
        selection.scu_role, selection.scp_role = role.scu_role, role.scp_role
        primitives.append(selection)
    return primitives


def _their_association(ours: AAssociateRQ | AAssociateAC) -> A_ASSOCIATE:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = ours.application_context
    primitive.called_ae_title = ours.called_ae
    primitive.calling_ae_title = ours.calling_ae
    primitive.user_information = _their_user_primitives(ours.user_information)
    return primitive


def _context(context_id: int, syntaxes) -> PresentationContext:
    context = PresentationContext()
    context.context_id = context_id
    for syntax in syntaxes:
        context.add_transfer_syntax(syntax)
    return context


@ROUND_TRIP
@given(associate_rqs())
def test_pynetdicom_associate_rq_reads_the_same_in_ours(expected: AAssociateRQ) -> None:
    primitive = _their_association(expected)
    contexts = []
    for proposed in expected.contexts:
        context = _context(proposed.context_id, proposed.transfer_syntaxes)
        context.abstract_syntax = proposed.abstract_syntax
        contexts.append(context)
    primitive.presentation_context_definition_list = contexts
    assert decode_pdu(theirs.A_ASSOCIATE_RQ(primitive).encode()) == expected


@ROUND_TRIP
@given(associate_acs())
def test_pynetdicom_associate_ac_reads_the_same_in_ours(expected: AAssociateAC) -> None:
    primitive = _their_association(expected)
    contexts = []
    for result in expected.contexts:
        context = _context(result.context_id, [result.transfer_syntax])
        context.result = result.result
        contexts.append(context)
    primitive.presentation_context_definition_results_list = contexts
    primitive.result = 0
    assert decode_pdu(theirs.A_ASSOCIATE_AC(primitive).encode()) == expected


@ROUND_TRIP
@given(associate_rjs)
def test_pynetdicom_associate_rj_reads_the_same_in_ours(expected: AAssociateRJ) -> None:
    pdu = theirs.A_ASSOCIATE_RJ()
    pdu.result, pdu.source, pdu.reason_diagnostic = (
        expected.result,
        expected.source,
        expected.reason,
    )
    assert decode_pdu(pdu.encode()) == expected


@ROUND_TRIP
@given(pdata_tfs)
def test_pynetdicom_p_data_tf_reads_the_same_in_ours(expected: PDataTF) -> None:
    primitive = P_DATA()
    primitive.presentation_data_value_list = [
        [pdv.context_id, bytes([pdv.control]) + pdv.fragment] for pdv in expected.pdvs
    ]
    assert decode_pdu(theirs.P_DATA_TF(primitive).encode()) == expected


@ROUND_TRIP
@given(aborts)
def test_pynetdicom_abort_reads_the_same_in_ours(expected: AAbort) -> None:
    pdu = theirs.A_ABORT_RQ()
    pdu.source, pdu.reason_diagnostic = expected.source, expected.reason
    assert decode_pdu(pdu.encode()) == expected


@ROUND_TRIP
@given(any_pdu)
def test_every_pdu_decodes_to_itself(ours) -> None:
    assert decode_pdu(ours.encode()) == ours


# -- the harness's A-ASSOCIATE-RQ --------------------------------------------------------------


def test_the_health_check_request_carries_our_implementation_class_uid() -> None:
    """PS3.7 D.3.3.2: the Implementation Class UID is mandatory; HAProxy's check had none."""
    pdu = theirs.A_ASSOCIATE_RQ()
    pdu.decode(health_check_rq("HAPACS"))
    assert pdu.called_ae_title == "HAPACS"
    assert [(c.abstract_syntax, c.transfer_syntax) for c in pdu.presentation_context] == [
        (Verification, [ImplicitVRLittleEndian])
    ]
    assert pdu.user_information.implementation_class_uid == IMPLEMENTATION_CLASS_UID
    assert pdu.user_information.implementation_version_name == IMPLEMENTATION_VERSION_NAME
    assert pdu.user_information.maximum_length == 16384


def test_the_wire_request_proposes_one_context_per_pair_and_scp_roles() -> None:
    pairs = [("1.2.840.10008.5.1.4.1.2.2.3", "1.2.840.10008.1.2.1"), ("1.2.3", "1.2.840.10008.1.2")]
    pdu = theirs.A_ASSOCIATE_RQ()
    pdu.decode(associate_rq("PACS", "ME", pairs, 1 << 20, scp_roles=["1.2.3"]))
    assert [
        (c.context_id, c.abstract_syntax, c.transfer_syntax) for c in pdu.presentation_context
    ] == [(1, pairs[0][0], [pairs[0][1]]), (3, pairs[1][0], [pairs[1][1]])]
    ((uid, role),) = pdu.user_information.role_selection.items()
    assert (uid, role.scu_role, role.scp_role) == ("1.2.3", 0, 1)
    assert pdu.user_information.implementation_class_uid == IMPLEMENTATION_CLASS_UID


# -- malformed input: one error, with a message ------------------------------------------------


@pytest.mark.parametrize("length", [0, 1, 3, 5])
def test_an_associate_rj_of_the_wrong_size_is_a_pdu_error(length: int) -> None:
    with pytest.raises(PduError, match=f"A-ASSOCIATE-RJ of {length} bytes, 4 expected"):
        decode_pdu(struct.pack(">BBI", 3, 0, length) + bytes(length))


def test_a_transfer_syntax_that_is_not_ascii_is_kept_replaced() -> None:
    ac = AAssociateAC("A", "B", (ContextResult(1, 0, "1.2"),), UserInformation())
    data = ac.encode().replace(b"\x40\x00\x00\x031.2", b"\x40\x00\x00\x031\xff\xfe")
    (context,) = decode_pdu(data).contexts
    assert context.transfer_syntax == "1\ufffd\ufffd"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"\x08\x00\x00\x00\x00\x00", "unknown PDU type 0x08"),
        (b"\x04\x00\x00\x00\x00\x00", "P-DATA-TF without a PDV"),
        (b"\x04\x00\x00\x00\x00\x06\x00\x00\x00\x10\x01\x03", "PDV at offset 6 announces 16"),
        (b"\x04\x00\x00\x00\x00\x05\x00\x00\x00\x01\x01", "5 stray bytes at offset 6"),
        (b"\x02\x00\x00\x00\x00\x10" + bytes(16), "A-ASSOCIATE-AC of 16 bytes"),
        (b"\x07\x00\x00\x00\x00\x04\x00\x00\x02", "announces 4 bytes, 3 follow"),
    ],
)
def test_malformed_pdus_are_named(data: bytes, expected: str) -> None:
    with pytest.raises(PduError, match=expected):
        decode_pdu(data)


def test_malformed_items_are_named_with_their_place() -> None:
    good = AAssociateAC(
        "A", "B", (ContextResult(1, 0, "1.2"),), UserInformation(role_selections=())
    ).encode()
    user_at = good.index(b"\x50\x00")
    too_long = good[: user_at + 2] + b"\xff\xff" + good[user_at + 4 :]
    with pytest.raises(PduError, match=r"A-ASSOCIATE-AC: item 0x50 at offset \d+ announces 65535"):
        decode_pdu(too_long)
    role = AAssociateAC(
        "A", "B", (), UserInformation(role_selections=(RoleSelection("1.2", False, True),))
    ).encode()
    bad_uid_length = role.replace(b"\x00\x031.2", b"\x00\x091.2")
    with pytest.raises(PduError, match="role selection sub-item of 7 bytes with a UID of 9"):
        decode_pdu(bad_uid_length)


def test_abort_and_reject_descriptions_say_source_and_reason() -> None:
    assert AAbort(2, 6).describe() == (
        "source 2 (service-provider), reason 6 (invalid PDU parameter value)"
    )
    assert AAbort(0, 0).describe().startswith("source 0 (service-user), reason 0")
    assert AAssociateRJ(1, 1, 7).describe() == (
        "rejected permanently: called AE title not recognized"
    )
    assert AAssociateRJ(2, 3, 9).describe() == (
        "rejected (transient): source 3 (service-provider (presentation)), reason 9"
    )


# -- fuzzing --------------------------------------------------------------------------------


def _decodes_or_pdu_error(data: bytes) -> None:
    try:
        decode_pdu(data)
    except PduError as exc:
        assert str(exc)


@FUZZ
@given(st.binary(max_size=512))
def test_arbitrary_bytes_decode_or_raise_pdu_error(data: bytes) -> None:
    _decodes_or_pdu_error(data)


@FUZZ
@given(st.integers(0, 9), st.binary(max_size=512))
def test_arbitrary_bodies_with_a_right_header_decode_or_raise_pdu_error(
    pdu_type: int, body: bytes
) -> None:
    _decodes_or_pdu_error(struct.pack(">BBI", pdu_type, 0, len(body)) + body)


@st.composite
def mutated_pdus(draw) -> bytes:
    data = bytearray(draw(any_pdu).encode())
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["set", "cut", "insert", "delete"]))
        at = draw(st.integers(0, len(data)))
        if kind == "set" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 8))]
    if len(data) >= 6 and draw(st.booleans()):  # often keep the PDU length right
        data[2:6] = struct.pack(">I", len(data) - 6)
    return bytes(data)


@FUZZ
@given(mutated_pdus())
def test_mutated_pdus_decode_or_raise_pdu_error(data: bytes) -> None:
    _decodes_or_pdu_error(data)
