"""Pure parts of the checkpoint format: codec, crypto, manifest, retention (no storage)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elastictrain.checkpoint import codec, crypto
from elastictrain.checkpoint.manifest import (
    Body, Table, check_signature, chunk_path, decode_manifest, decode_run, encode_manifest, encode_run,
    manifest_name, open_table, parse_manifest_name, seal_table,
)
from elastictrain.checkpoint.retention import plan_retention
from elastictrain.checkpoint.snapshot import Snapshotter, piece_ranges
from elastictrain.errors import CheckpointCorrupt, CheckpointError, UnsupportedFormat, WrongKey

RUN = "ab" * 16


def _tensors():
    return {
        "model/w": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "model/bf": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        "opt/step": torch.tensor(7),
        "empty": torch.zeros(0, 3),
        "mask": torch.tensor([True, False]),
    }


def test_codec_prefix_plus_bytes_is_a_safetensors_file_with_metadata():
    tensors = _tensors()
    entries = codec.plan_entries(tensors)
    prefix = codec.encode_header(entries, {"k": "v"})
    blob = prefix + b"".join(bytes(codec.byte_view(t)) for t in tensors.values())
    loaded = safetensors.torch.load(blob)
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t)
    parsed, meta, data_len = codec.decode_header(prefix)
    assert meta == {"k": "v"} and data_len == len(blob) - len(prefix)
    assert [e.name for e in parsed if e.nbytes] == [e.name for e in entries if e.nbytes]


@pytest.mark.parametrize("name", ["", "__metadata__", "a\x00b", "a\udc80b"])
def test_codec_rejects_bad_names(name):
    with pytest.raises(ValueError):
        codec.plan_entries({name: torch.zeros(1)})


def test_decode_header_rejects_holes_and_bad_shapes():
    good = codec.encode_header(codec.plan_entries({"a": torch.zeros(2), "b": torch.zeros(2)}), {})
    doc = json.loads(good[8:])
    doc["b"]["data_offsets"] = [12, 20]  # hole after a
    text = json.dumps(doc).encode()
    with pytest.raises(CheckpointCorrupt, match="hole"):
        codec.decode_header(len(text).to_bytes(8, "little") + text)
    doc["b"] = {"dtype": "F32", "shape": [3], "data_offsets": [8, 16]}
    text = json.dumps(doc).encode()
    with pytest.raises(CheckpointCorrupt, match="shape"):
        codec.decode_header(len(text).to_bytes(8, "little") + text)
    # forged sizes: beyond what torch holds, booleans for ints, not a list
    for shape, offsets in (([0, 2**64], [8, 8]), ([True], [8, 12]), ({}, [8, 8]), ([2], [8, 2**64])):
        doc["b"] = {"dtype": "F32", "shape": shape, "data_offsets": offsets}
        text = json.dumps(doc).encode()
        with pytest.raises(CheckpointCorrupt, match="malformed|disagree"):
            codec.decode_header(len(text).to_bytes(8, "little") + text)


def test_chunk_seal_open_round_trip_and_tamper():
    keys = crypto.DataKeys(bytes(range(32)))
    data = os.urandom(1000)
    cid = crypto.chunk_id(data, keys)
    assert cid not in (hashlib.sha256(data).hexdigest(), crypto.chunk_id(data, None))  # keyed: no plaintext hash leaks
    sealed = crypto.seal_chunk(data, cid, keys)
    assert data not in sealed and len(sealed) == crypto.sealed_size(1000, True)
    out = bytearray(1000)
    crypto.open_chunk(sealed, cid, 1000, keys, memoryview(out))
    assert bytes(out) == data
    for pos in (0, 5, 500, len(sealed) - 1):
        bad = bytearray(sealed)
        bad[pos] ^= 0x01
        with pytest.raises(CheckpointCorrupt):
            crypto.open_chunk(bytes(bad), cid, 1000, keys, memoryview(bytearray(1000)))
    with pytest.raises(CheckpointCorrupt):  # bound to its id: cannot stand in for another chunk
        crypto.open_chunk(sealed, "0" * 64, 1000, keys, memoryview(bytearray(1000)))
    with pytest.raises(CheckpointCorrupt):  # another run's key
        crypto.open_chunk(sealed, cid, 1000, crypto.DataKeys(bytes(32)), memoryview(bytearray(1000)))


def test_streamed_sealing_equals_one_shot_aes_gcm_and_repeats():
    keys = crypto.DataKeys(bytes(range(32)))
    data = os.urandom(2 * crypto.SEAL_PIECE + 12345)  # three pieces, the last one short
    cid = crypto.chunk_id(data, keys)
    stream = crypto.SealedChunk(data, cid, keys)
    first = b"".join(bytes(p) for p in stream)
    nonce = bytes.fromhex(cid)[:12]
    one_shot = AESGCM(keys.chunk_seal_key).encrypt(nonce, data, crypto._chunk_aad(cid, len(data)))
    assert first == crypto.CHUNK_MAGIC + bytes([crypto.SEALED]) + one_shot and len(first) == stream.size
    assert b"".join(bytes(p) for p in stream) == first  # iterable again: a retried upload sends the same bytes


def test_plain_chunk_is_still_hashed():
    assert crypto.chunk_id(b"", None) == BLAKE3_EMPTY  # standard BLAKE3, so any BLAKE3 tool can check a chunk
    data = b"hello" * 10
    cid = crypto.chunk_id(data, None)
    blob = crypto.seal_chunk(data, cid, None)
    out = bytearray(len(data))
    crypto.open_chunk(blob, cid, len(data), None, memoryview(out))
    assert bytes(out) == data
    bad = bytearray(blob)
    bad[-1] ^= 0x80
    with pytest.raises(CheckpointCorrupt, match="hash"):
        crypto.open_chunk(bytes(bad), cid, len(data), None, memoryview(bytearray(len(data))))


def test_wrap_unwrap_and_wrong_master():
    master, dk = os.urandom(32), os.urandom(32)
    wrapped = crypto.wrap_key(master, dk, b"ctx", os.urandom(12))
    assert dk not in wrapped and crypto.unwrap_key(master, wrapped, b"ctx") == dk
    with pytest.raises(WrongKey):
        crypto.unwrap_key(os.urandom(32), wrapped, b"ctx")
    with pytest.raises(WrongKey):
        crypto.unwrap_key(master, wrapped, b"other run")


def _body(keys: crypto.DataKeys | None, signer=None, step=3, term=1):
    table = Table(codec.encode_header(codec.plan_entries({"w": torch.zeros(2)}), {}), ((0, 8),))
    body = Body(
        run=RUN, step=step, term=term, time_ns=1_700_000_000_000_000_000, content_bytes=len(table.header) + 8,
        chunks=(("c" * 64, 13 + (16 if keys else 0)),), table=None if keys else table,
        key_id="local:0011" if keys else None, wrapped_key=b"w" * 60 if keys else None, provenance={"node": "n1"},
    )
    if keys:
        from dataclasses import replace

        body = replace(body, sealed_table=seal_table(body, table, keys, bytes(12)))
    return body, table


def test_manifest_round_trip_signed_and_unsigned():
    keys = crypto.DataKeys(bytes(32))
    signer = crypto.Signer(bytes(32))
    body, table = _body(keys)
    raw = encode_manifest(body, signer)
    assert b'"w"' not in raw and b"shape" not in raw  # names and shapes only inside the sealed table
    decoded = decode_manifest(raw)
    check_signature(decoded, signer)
    assert decoded.body == body and open_table(decoded.body, keys) == table
    with pytest.raises(CheckpointCorrupt, match="signature"):
        check_signature(decoded, crypto.Signer(bytes([1] * 32)))
    plain, ptable = _body(None)
    pdec = decode_manifest(encode_manifest(plain, None))
    assert pdec.body == plain and open_table(pdec.body, None) == ptable


def test_golden_manifest_bytes():
    """Pins the manifest format: any change to these bytes needs a new format version."""
    keys = crypto.DataKeys(bytes(range(32)))
    body, _ = _body(keys)
    raw = encode_manifest(body, crypto.Signer(bytes(range(32, 64))))
    assert hashlib.sha256(raw).hexdigest() == GOLDEN_MANIFEST_SHA256
    data = bytes(range(256)) * 4
    cid = crypto.chunk_id(data, keys)
    assert cid == GOLDEN_CHUNK_ID
    assert crypto.chunk_id(data, None) == GOLDEN_PLAIN_CHUNK_ID
    assert hashlib.sha256(crypto.seal_chunk(data, cid, keys)).hexdigest() == GOLDEN_CHUNK_SHA256
    assert encode_run(RUN) == b'{"format":"elastictrain-checkpoint-run","run":"' + RUN.encode() + b'","version":1}'


BLAKE3_EMPTY = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"  # BLAKE3 spec test vector
GOLDEN_MANIFEST_SHA256 = "8d9f16c76f219ed6d3f56f2f66303f320eb2063c0b7f66a1a29fb5a227600e68"
GOLDEN_CHUNK_ID = "009cc4f0aaf684b3b9aa26449406d75e75090e689f62d453cf1a6b2113a94012"
GOLDEN_CHUNK_SHA256 = "d90aa43ea7390172d539130aeefad9e52a82ca5c40a57091ea445b1cd5aa57f2"
GOLDEN_PLAIN_CHUNK_ID = "882179b8dbccd285cda241d968cfcccb3156c5edac2fa3761bb6eda7ff8cb172"


def test_every_bit_flip_in_a_manifest_is_caught():
    keys, signer = crypto.DataKeys(bytes(32)), crypto.Signer(bytes(32))
    body, _ = _body(keys)
    raw = encode_manifest(body, signer)
    for pos in range(0, len(raw), 3):
        for bit in (0, 3, 7):
            bad = bytearray(raw)
            bad[pos] ^= 1 << bit
            with pytest.raises(CheckpointError):
                decoded = decode_manifest(bytes(bad))
                check_signature(decoded, signer)
                open_table(decoded.body, keys)


def test_unknown_version_and_truncation():
    body, _ = _body(None)
    raw = encode_manifest(body, None)
    doc = json.loads(raw)
    doc["version"] = 2
    with pytest.raises(UnsupportedFormat, match="version 2"):
        decode_manifest(json.dumps(doc).encode())
    for cut in (0, 1, len(raw) // 2, len(raw) - 1):
        with pytest.raises(CheckpointCorrupt):
            decode_manifest(raw[:cut])


@pytest.mark.parametrize(
    "name", ["manifests/../000000000001-00000000.json", "/manifests/000000000001-00000000.json",
             "manifests/000000000001-00000000.json.tmp-ab", "manifests/1-0.json", "manifests/x/000000000001-00000000.json"],
)
def test_manifest_names_with_path_tricks_are_not_manifests(name):
    assert parse_manifest_name(name) is None
    assert parse_manifest_name(manifest_name(12, 3)) == (12, 3)


@pytest.mark.parametrize("cid", ["../" + "a" * 61, "A" * 64, "a" * 63, "/etc/passwd"])
def test_chunk_ids_with_path_tricks_are_refused(cid):
    with pytest.raises(CheckpointCorrupt):
        chunk_path(cid)


def test_run_file_round_trip_and_damage():
    assert decode_run(encode_run(RUN)) == RUN
    with pytest.raises(CheckpointCorrupt):
        decode_run(encode_run(RUN)[:-3])


def test_step_and_term_beyond_what_a_name_holds_are_refused():
    biggest = 10**20 - 1
    assert parse_manifest_name(manifest_name(biggest, biggest)) == (biggest, biggest)
    for step, term in ((10**20, 0), (0, 10**20), (-1, 0)):
        with pytest.raises(ValueError, match="between 0 and"):
            manifest_name(step, term)


DEEP = "[" * 100_000 + "]" * 100_000  # valid JSON that Python's parser cannot hold


def test_json_nested_too_deep_is_damage_not_a_crash():
    with pytest.raises(CheckpointCorrupt, match="run.json is not valid JSON"):
        decode_run(DEEP.encode())
    text = json.dumps({"__metadata__": {}, "t": json.loads("[" * 50 + "]" * 50)})[:-1] + "," + '"x":' + DEEP + "}"
    text += " " * (-(len(text) + 8) % 8)
    with pytest.raises(CheckpointCorrupt, match="not valid JSON"):
        codec.decode_header(len(text).to_bytes(8, "little") + text.encode())
    keys = crypto.DataKeys(bytes(32))
    body, _ = _body(keys)
    sealed = crypto.seal_blob(keys.table_aead, DEEP.encode(), body.table_aad(), bytes(12))  # sealed by the key
    with pytest.raises(CheckpointCorrupt, match="tensor table is not JSON"):
        open_table(replace(body, sealed_table=sealed), keys)


def test_a_manifest_nested_near_the_parsers_limit_is_damage_not_a_crash():
    # json.loads accepts some depths that json.dumps (the canonical check) cannot write back
    for depth in range(600, 1000):  # where the band of such depths falls depends on the stack in use
        doc = '{"body":' + "[" * depth + "]" * depth + ',"format":"elastictrain-checkpoint","signature":{},"version":1}'
        with pytest.raises(CheckpointError):
            decode_manifest(doc.encode())


_NAMES = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_NAMES, st.sampled_from(sorted(codec.CODES)), st.lists(st.integers(0, 2**63 - 1), max_size=4),
                          st.integers(0, 2**63 - 1)), max_size=6, unique_by=lambda e: e[0]),
       st.dictionaries(_NAMES, st.text(max_size=40), max_size=3))
def test_the_header_size_check_never_lets_an_oversized_header_through(specs, metadata):
    entries = [codec.TensorEntry(n, d, tuple(shape), b, b + 8) for n, d, shape, b in specs if n != codec.METADATA_KEY]
    size = len(codec.encode_header(entries, metadata)) - 8
    saved = codec.MAX_WRITTEN_HEADER_BYTES
    try:
        codec.MAX_WRITTEN_HEADER_BYTES = size  # exactly at the limit: passes
        codec.check_header_size(entries, metadata)
        codec.MAX_WRITTEN_HEADER_BYTES = size - 1  # one byte over: refused, however cheap the check
        with pytest.raises(ValueError, match="that safetensors reads"):
            codec.check_header_size(entries, metadata)
    finally:
        codec.MAX_WRITTEN_HEADER_BYTES = saved


def test_tables_written_before_the_write_limit_are_still_read(monkeypatch):
    prefix = codec.encode_header(codec.plan_entries({"w": torch.zeros(2)}), {"pad": "x" * 5000})
    monkeypatch.setattr(codec, "MAX_WRITTEN_HEADER_BYTES", 4096)  # stands for 100,000,000 bytes
    with pytest.raises(ValueError, match="that safetensors reads"):
        codec.encode_header(codec.plan_entries({"w": torch.zeros(2)}), {"pad": "x" * 5000})
    entries, metadata, _ = codec.decode_header(prefix)  # read up to MAX_HEADER_BYTES, as before the limit
    assert [e.name for e in entries] == ["w"] and len(metadata["pad"]) == 5000
    assert codec.MAX_HEADER_BYTES == 100 * 1024 * 1024  # what earlier releases wrote up to stays readable


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_fuzz_manifest_parser_raises_only_checkpoint_errors(raw):
    try:
        decode_manifest(raw)
    except CheckpointError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_fuzz_mutated_manifest(data):
    body, _ = _body(None)
    raw = bytearray(encode_manifest(body, None))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    if bytes(raw) == encode_manifest(body, None):
        return
    with pytest.raises(CheckpointError):
        decode_manifest(bytes(raw))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 200), st.booleans())
def test_fuzz_chunk_parser(blob, length, encrypted):
    keys = crypto.DataKeys(bytes(32)) if encrypted else None
    with pytest.raises(CheckpointCorrupt):
        crypto.open_chunk(blob, "ab" * 32, length, keys, memoryview(bytearray(length)))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_table_header_parser(raw):
    prefix = len(raw).to_bytes(8, "little") + raw
    try:
        codec.decode_header(prefix)
    except CheckpointCorrupt:
        pass


def _retention_body(step, ids, run=RUN, term=0):
    return Body(run=run, step=step, term=term, time_ns=0, content_bytes=0,
                chunks=tuple((c * 64, 5) for c in ids), table=Table(b"", ()))


def test_retention_keeps_newest_and_their_chunks():
    body = _retention_body
    bodies = {manifest_name(s, 0): body(s, ids) for s, ids in [(1, "ab"), (2, "bc"), (3, "cd")]}
    chunks = {chunk_path(c * 64): 5 for c in "abcde"}

    def plan_for(keep_last, failed=frozenset(), committed=manifest_name(3, 0)):
        verified = frozenset(n for n, b in bodies.items() if b is not None)
        return plan_retention(bodies, chunks, keep_last=keep_last, run=RUN, failed=failed, verified=verified,
                              committed=committed)

    plan = plan_for(2)
    assert plan.manifests == (manifest_name(1, 0),)
    assert set(plan.chunks) == {chunk_path("a" * 64), chunk_path("e" * 64)}
    # found damaged by a restore: not counted as kept, its chunks kept while it stays, gone once older
    failed = frozenset({manifest_name(3, 0)})
    plan = plan_for(2, failed, committed=manifest_name(2, 0))
    assert plan.manifests == () and set(plan.chunks) == {chunk_path("e" * 64)}
    bodies[manifest_name(4, 0)] = body(4, "e")
    plan = plan_for(1, failed, committed=manifest_name(4, 0))
    assert plan.manifests == tuple(manifest_name(s, 0) for s in (1, 2, 3))
    assert set(plan.chunks) == {chunk_path(c * 64) for c in "abcd"}
    bodies[manifest_name(4, 0)] = None  # damaged newest: chunks cannot be judged, none deleted
    assert plan_for(2).chunks == ()


def test_retention_counts_and_deletes_only_verified_manifests_up_to_the_one_just_committed():
    body = _retention_body
    real = {manifest_name(s, 0): body(s, ids) for s, ids in [(1, "a"), (2, "b"), (3, "c")]}
    planted = {  # copies under huge steps, and an edited one: they do not verify
        manifest_name(10**12 + k, 0): body(10**12 + k, "cf") for k in range(3)
    }
    bodies = {**real, **planted}
    chunks = {chunk_path(c * 64): 5 for c in "abcdef"}
    plan = plan_retention(bodies, chunks, keep_last=2, run=RUN, verified=frozenset(real),
                          committed=manifest_name(3, 0))
    assert plan.manifests == (manifest_name(1, 0),)  # planted ones neither counted nor deleted
    assert set(plan.chunks) == {chunk_path("a" * 64), chunk_path("d" * 64), chunk_path("e" * 64)}
    # a newer manifest that verifies (unsigned plaintext: nothing to check but form) still does not push
    # out the one just committed, nor is it deleted
    plan = plan_retention(bodies, chunks, keep_last=1, run=RUN, verified=frozenset(bodies),
                          committed=manifest_name(3, 0))
    assert plan.manifests == (manifest_name(1, 0), manifest_name(2, 0))
    # the one just committed is never deleted, even when a restore marked its name failed earlier
    plan = plan_retention(bodies, chunks, keep_last=1, run=RUN, verified=frozenset(real),
                          failed=frozenset({manifest_name(3, 0)}), committed=manifest_name(3, 0))
    assert manifest_name(3, 0) not in plan.manifests


def test_snapshot_reuses_ids_of_unchanged_pieces_only():
    snap = Snapshotter(chunk_size=16)
    live = {"w": torch.arange(12, dtype=torch.float32)}  # 48 bytes: 3 pieces
    first = snap.take(live)
    assert first.reuse == {} and torch.equal(first.tensors["w"], live["w"])
    assert first.tensors["w"].data_ptr() != live["w"].data_ptr()
    snap.committed({("w", 0): "i0", ("w", 1): "i1", ("w", 2): "i2"})
    live["w"][5] = -1.0  # piece 1
    second = snap.take(live)
    assert second.reuse == {("w", 0): "i0", ("w", 2): "i2"}
    assert torch.equal(second.tensors["w"], live["w"])
    assert snap.take(live).reuse == {}  # not committed since: nothing known
    assert piece_ranges(0, 16) == [] and piece_ranges(33, 16) == [(0, 16), (16, 16), (32, 1)]


def test_the_signed_prefix_names_the_format_version():
    # a new VERSION needs a new prefix: otherwise a manifest a newer release wrote would verify as this
    # version's with a damaged version field, and restore would fall back past it (decode_as_current)
    from elastictrain.checkpoint import manifest

    assert f"/v{manifest.VERSION}/".encode() in manifest._SIGNED_PREFIX
