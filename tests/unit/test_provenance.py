"""Checkpoint lineage (who produced the steps since the last checkpoint) and the manifest's new fields."""

from __future__ import annotations

import json

import pytest

from elastictrain.accumulate.plan import split_batch
from elastictrain.checkpoint import crypto
from elastictrain.checkpoint.manifest import Body, Table, decode_manifest, encode_manifest
from elastictrain.checkpoint.provenance import (
    MAX_MEMBERS,
    MAX_TERMS,
    attestation_digest,
    check_lineage,
    expand_positions,
)
from elastictrain.election.term import Member, WorldPlan
from elastictrain.errors import CheckpointCorrupt
from elastictrain.fleet.attestation import attestation_record, key_id_of
from elastictrain.runtime.lineage import LineageBook, member_facts, world_facts

G, MICRO = 10, 4


def facts(name: str, provider: str = "aws", region: str = "us-east-1") -> dict:
    return member_facts(name, {"node_id": f"node-{name}", "host": "127.0.0.1"},
                        {"provider": provider, "region": region, "zone": "z1", "instance_type": "t1",
                         "accelerator": "none"})


def run_term(book: LineageBook, term: int, members: list[dict], steps: range) -> None:
    book.joined(term, members, G, MICRO)
    for s in steps:
        book.committed(term, s)


def positions_by_step(lineage: dict) -> dict[int, list[tuple[int, int]]]:
    """Every consumed position of the lineage, per step it belongs to (step = position // G)."""
    out: dict[int, list] = {}
    for t in lineage["terms"]:
        for m in t["members"]:
            for lo, hi in expand_positions(m["positions"]):
                for p in range(lo, hi):
                    out.setdefault(p // G, []).append(p)
    return out


def assert_covers_exactly(lineage: dict, start: int, stop: int) -> None:
    got = positions_by_step(lineage)
    assert sorted(got) == list(range(start, stop))
    for step, positions in got.items():
        assert sorted(positions) == list(range(step * G, (step + 1) * G)), step


def test_one_term_lists_each_member_with_its_facts_and_the_positions_the_batch_plan_gave_it():
    book = LineageBook()
    run_term(book, 1, [facts("a"), facts("b", "gcp", "europe-west4"), facts("c")], range(0, 7))
    lineage = check_lineage(book.lineage(7))
    assert lineage["complete"] and lineage["gaps"] == [] and (lineage["from_step"], lineage["to_step"]) == (0, 7)
    (term,) = lineage["terms"]
    assert term["steps"] == [0, 7] and term["world_size"] == 3 and term["global_batch"] == G
    plans = split_batch(G, MICRO, 3)
    for rank, m in enumerate(term["members"]):
        assert m["rank"] == rank and m["node"] == f"node-{'abc'[rank]}"
        assert m["positions"] == {"start": plans[rank].start, "stop": plans[rank].stop, "stride": G, "count": 7}
    assert term["members"][1]["provider"] == "gcp" and term["members"][1]["region"] == "europe-west4"
    assert_covers_exactly(lineage, 0, 7)


def test_a_leader_change_keeps_the_earlier_term_for_the_member_that_saw_it():
    b = LineageBook()  # member b: in term 1 (a leads) and term 2 (b leads after a is lost)
    b.saved(5)
    run_term(b, 1, [facts("a"), facts("b"), facts("c")], range(5, 11))
    run_term(b, 2, [facts("b"), facts("c")], range(11, 15))
    lineage = check_lineage(b.lineage(15))
    assert lineage["complete"] and [t["term"] for t in lineage["terms"]] == [1, 2]
    assert [t["steps"] for t in lineage["terms"]] == [[5, 11], [11, 15]]
    assert [m["member"] for m in lineage["terms"][0]["members"]] == ["a", "b", "c"]
    assert_covers_exactly(lineage, 5, 15)


def test_a_member_that_never_saw_the_earlier_term_flags_the_gap_instead_of_inventing_it():
    d = LineageBook()  # joined in term 2, received the state at step 11
    run_term(d, 2, [facts("b"), facts("d")], range(11, 15))
    lineage = check_lineage(d.lineage(15, from_step=5))
    assert not lineage["complete"] and lineage["gaps"] == [[5, 11]]
    assert [t["term"] for t in lineage["terms"]] == [2]
    assert_covers_exactly(lineage, 11, 15)


def test_history_a_restore_rewrote_is_not_credited():
    book = LineageBook()
    run_term(book, 1, [facts("a"), facts("b")], range(0, 10))  # steps 5..9 were lost with every replica
    run_term(book, 2, [facts("a")], range(5, 8))  # restored from the checkpoint at 5 and redone
    lineage = check_lineage(book.lineage(8, from_step=0))
    assert [(t["term"], t["steps"]) for t in lineage["terms"]] == [(1, [0, 5]), (2, [5, 8])]
    assert_covers_exactly(lineage, 0, 8)


def test_a_save_forgets_the_terms_before_it():
    book = LineageBook()
    run_term(book, 1, [facts("a")], range(0, 4))
    run_term(book, 2, [facts("a"), facts("b")], range(4, 9))
    book.saved(6)
    lineage = book.lineage(9)
    assert (lineage["from_step"], [t["term"] for t in lineage["terms"]]) == (6, [2])
    assert lineage["terms"][0]["steps"] == [6, 9]
    assert_covers_exactly(lineage, 6, 9)


def test_caps_drop_the_oldest_terms_and_extra_members_and_say_so():
    book = LineageBook(max_terms=3)
    for term in range(1, 6):
        run_term(book, term, [facts("a")], range(term * 2, term * 2 + 2))
    lineage = check_lineage(book.lineage(12, from_step=2))
    assert [t["term"] for t in lineage["terms"]] == [3, 4, 5]
    assert lineage["gaps"] == [[2, 6]] and lineage["dropped_terms"] == 2 and not lineage["complete"]

    wide = LineageBook()
    run_term(wide, 1, [facts(f"m{i}") for i in range(MAX_MEMBERS + 2)], range(0, 1))
    with pytest.raises(ValueError):  # G=10 < world size: the plan itself refuses
        wide.lineage(1)
    wide = LineageBook()
    wide.joined(1, [facts(f"m{i}") for i in range(MAX_MEMBERS + 2)], 1000, 8)
    wide.committed(1, 0)
    lineage = check_lineage(wide.lineage(1))
    term = lineage["terms"][0]
    assert len(term["members"]) == MAX_MEMBERS and term["dropped_members"] == 2 and not lineage["complete"]


def test_world_facts_take_node_facts_from_member_records_and_drop_what_is_not_a_digest():
    plan = WorldPlan(term=3, leader="a", members=("a", "b"), steps=(4, 4), host="h", port=0,
                     labels=({"provider": "aws", "region": "us-east-1"}, {"provider": "gcp", "region": "eu\x00"}))
    digest = "sha256:" + "ab" * 32
    records = [Member("a", 0.0, node_id="n-a", host="10.0.0.1", attestation=digest),
               Member("b", 0.0, node_id="n-b", host="10.0.0.2", attestation="not-a-digest")]
    a, b = world_facts(plan, records)
    assert (a["node"], a["host"], a["attestation"], a["provider"]) == ("n-a", "10.0.0.1", digest, "aws")
    assert (b["node"], b["attestation"], b["region"]) == ("n-b", "", "eu?")
    assert Member.from_json(records[0].to_json()).attestation == digest


# --- the manifest's fields ------------------------------------------------------------------------

RUN = "0" * 32
IDENTITY = {"provider": "aws", "document": json.dumps({"instanceId": "i-1", "region": "us-east-1"}),
            "signature": "c2ln", "pkcs7": "cGtjcw=="}


def body(**kw) -> Body:
    return Body(run=RUN, step=9, term=2, time_ns=1, content_bytes=0, chunks=(), table=Table(b"{}", ()),
                provenance={"provider": "aws"}, **kw)


def lineage_doc() -> dict:
    book = LineageBook()
    run_term(book, 1, [facts("a"), facts("b", "gcp")], range(0, 9))
    return book.lineage(9)


def test_manifest_round_trip_with_lineage_and_attestation_signed_and_unsigned():
    record = attestation_record(IDENTITY)
    assert record["key_id"] == "aws-instance-identity:us-east-1" and record["digest"] == attestation_digest(IDENTITY)
    signer = crypto.Signer(b"k" * 32)
    for sig in (None, signer):
        raw = encode_manifest(body(lineage=lineage_doc(), attestation=record), sig)
        decoded = decode_manifest(raw).body
        assert decoded.lineage == lineage_doc() and decoded.attestation == record


def test_a_manifest_written_before_the_new_fields_reads_them_as_empty():
    raw = encode_manifest(body(), None)
    assert b"lineage" not in raw and b"attestation" not in raw  # the bytes of an older release
    decoded = decode_manifest(raw).body
    assert decoded.lineage == {} and decoded.attestation == {} and decoded.provenance == {"provider": "aws"}


def _forged(**changes) -> bytes:
    """A well-formed, correctly digested manifest whose new fields were forged."""
    return encode_manifest(body(**changes), None)


@pytest.mark.parametrize("forge, message", [
    (lambda d: d["terms"].extend([d["terms"][0]] * MAX_TERMS), "terms"),
    (lambda d: d["terms"][0]["members"][0].update(host="x" * 5000), "short printable text"),
    (lambda d: d["terms"][0]["members"][0].update(rank=7), "outside its world"),
    (lambda d: d.update(gaps=[[0, 3]]), "complete but lists gaps"),
    (lambda d: d["terms"][0]["members"][0]["positions"].update(count=-1), "positions"),
    (lambda d: d.update(extra="x"), "fields"),
    (lambda d: d["terms"][0]["members"][0].update(attestation="sha1:00"), "short printable text"),
])
def test_a_forged_lineage_is_refused_with_a_clear_error(forge, message):
    doc = lineage_doc()
    forge(doc)
    with pytest.raises(CheckpointCorrupt, match=message):
        decode_manifest(_forged(lineage=doc))


@pytest.mark.parametrize("change, message", [
    ({"document": "x" * 20000}, "at most"),
    ({"digest": "sha256:" + "0" * 64}, "digest does not match"),
    ({"Key": "v"}, "lowercase name"),
    ({"key_id": None}, "printable text"),
])
def test_a_forged_or_oversized_attestation_is_refused(change, message):
    record = {**attestation_record(IDENTITY), **change}
    with pytest.raises(CheckpointCorrupt, match=message):
        decode_manifest(_forged(attestation=record))


def test_an_oversized_lineage_is_refused():
    doc = lineage_doc()
    doc["terms"] = [json.loads(json.dumps(doc["terms"][0])) for _ in range(MAX_TERMS)]
    for t in doc["terms"]:
        t["members"] = [dict(t["members"][0], host="h" * 250, node="n" * 250, member="m" * 250)] * MAX_MEMBERS
        t["world_size"] = MAX_MEMBERS
    with pytest.raises(CheckpointCorrupt, match="bytes"):
        decode_manifest(_forged(lineage=doc))


def test_key_ids_name_the_signer_never_a_key():
    header = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImFiYzEyMyJ9"  # {"alg":"RS256","kid":"abc123"}
    assert key_id_of({"provider": "gcp", "token": f"{header}.e30.c2ln"}) == "abc123"
    assert key_id_of({"provider": "aws", "document": "not json"}) == ""
    assert key_id_of({"provider": "azure", "encoding": "pkcs7"}) == "azure-attested:pkcs7"
