"""RFC 9162 Merkle hashing, proofs and verifiers, checked against the RFC's definitions."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedretain.consent.merkle import (
    EMPTY_ROOT,
    Frontier,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    merkle_root,
    node_hash,
    root_from_leaf_hashes,
    verify_consistency,
    verify_inclusion,
)

# The Certificate Transparency reference test leaves and the published roots of the trees
# made of their first n leaves (RFC 6962 reference implementation's test vectors; RFC 9162
# hashes trees identically).
CT_LEAVES = [bytes.fromhex(h) for h in (
    "", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f")]
CT_ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
# (leaf index, tree size, audit path) from the same reference tests
CT_INCLUSION = [
    (0, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (5, 8, ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (1, 5, ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]
CT_CONSISTENCY = [
    (1, 1, []),
    (1, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (6, 8, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 5, ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]


# -- an independent, literal transcription of the RFC 9162 §2.1 definitions ----------------
def _k(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def ref_mth(d: list[bytes]) -> bytes:
    if not d:
        return hashlib.sha256(b"").digest()
    if len(d) == 1:
        return hashlib.sha256(b"\x00" + d[0]).digest()
    k = _k(len(d))
    return hashlib.sha256(b"\x01" + ref_mth(d[:k]) + ref_mth(d[k:])).digest()


def ref_path(m: int, d: list[bytes]) -> list[bytes]:
    if len(d) == 1:
        return []
    k = _k(len(d))
    if m < k:
        return ref_path(m, d[:k]) + [ref_mth(d[k:])]
    return ref_path(m - k, d[k:]) + [ref_mth(d[:k])]


def ref_subproof(m: int, d: list[bytes], b: bool) -> list[bytes]:
    if m == len(d):
        return [] if b else [ref_mth(d)]
    k = _k(len(d))
    if m <= k:
        return ref_subproof(m, d[:k], b) + [ref_mth(d[k:])]
    return ref_subproof(m - k, d[k:], False) + [ref_mth(d[:k])]


def leaves(n: int) -> list[bytes]:
    return [f"leaf-{i}".encode() for i in range(n)]


def test_hash_prefixes():
    assert leaf_hash(b"x") == hashlib.sha256(b"\x00x").digest()
    assert node_hash(b"a" * 32, b"b" * 32) == hashlib.sha256(b"\x01" + b"a" * 32 + b"b" * 32).digest()
    assert EMPTY_ROOT.hex() == CT_ROOTS[0]


@pytest.mark.parametrize("n", range(0, 9))
def test_ct_reference_roots(n):
    hashes = [leaf_hash(x) for x in CT_LEAVES[:n]]
    assert root_from_leaf_hashes(hashes).hex() == CT_ROOTS[n]
    assert merkle_root(CT_LEAVES[:n]).hex() == CT_ROOTS[n]
    fr = Frontier()
    fr.extend(hashes)
    assert fr.root().hex() == CT_ROOTS[n]


@pytest.mark.parametrize(("index", "size", "path"), CT_INCLUSION)
def test_ct_reference_inclusion(index, size, path):
    hashes = [leaf_hash(x) for x in CT_LEAVES]
    proof = inclusion_proof(hashes, index, size)
    assert [p.hex() for p in proof] == path
    assert verify_inclusion(hashes[index], index, size, proof, bytes.fromhex(CT_ROOTS[size]))
    assert not verify_inclusion(hashes[index], index, size, proof, bytes.fromhex(CT_ROOTS[size - 1]))


@pytest.mark.parametrize(("old", "new", "path"), CT_CONSISTENCY)
def test_ct_reference_consistency(old, new, path):
    hashes = [leaf_hash(x) for x in CT_LEAVES]
    proof = consistency_proof(hashes, old, new)
    assert [p.hex() for p in proof] == path
    assert verify_consistency(old, new, proof, bytes.fromhex(CT_ROOTS[old]), bytes.fromhex(CT_ROOTS[new]))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 8, 9, 16, 17, 31, 33, 100])
def test_against_recursive_reference(n):
    d = leaves(n)
    hashes = [leaf_hash(x) for x in d]
    root = ref_mth(d)
    assert root_from_leaf_hashes(hashes) == root
    for m in range(n):
        proof = inclusion_proof(hashes, m)
        assert proof == ref_path(m, d)
        assert verify_inclusion(hashes[m], m, n, proof, root)
    for m in range(1, n + 1):
        proof = consistency_proof(hashes, m)
        assert proof == ref_subproof(m, d, True)
        assert verify_consistency(m, n, proof, ref_mth(d[:m]), root)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 70), st.data())
def test_proofs_reject_wrong_inputs(n, data):
    d = leaves(n)
    hashes = [leaf_hash(x) for x in d]
    root = root_from_leaf_hashes(hashes)
    m = data.draw(st.integers(0, n - 1))
    proof = inclusion_proof(hashes, m)
    assert verify_inclusion(hashes[m], m, n, proof, root)
    assert not verify_inclusion(leaf_hash(b"forged"), m, n, proof, root)
    if n > 1:
        other = (m + 1) % n
        assert not verify_inclusion(hashes[m], other, n, proof, root)
    if proof:
        bad = list(proof)
        bad[0] = bytes(32)
        assert not verify_inclusion(hashes[m], m, n, bad, root)
    old = data.draw(st.integers(1, n))
    cproof = consistency_proof(hashes, old)
    old_root = root_from_leaf_hashes(hashes[:old])
    assert verify_consistency(old, n, cproof, old_root, root)
    if old < n:
        # a rewritten history (first leaf changed) is not an extension of the old tree
        forged = [leaf_hash(b"rewritten")] + hashes[1:]
        assert not verify_consistency(old, n, consistency_proof(forged, old), old_root,
                                      root_from_leaf_hashes(forged))
        assert not verify_consistency(old, n, cproof, leaf_hash(b"x"), root)


def test_frontier_round_trip_and_incremental_roots():
    hashes = [leaf_hash(x) for x in leaves(50)]
    fr = Frontier()
    for i, h in enumerate(hashes, 1):
        fr.append(h)
        assert fr.root() == root_from_leaf_hashes(hashes[:i])
        again = Frontier.from_bytes(fr.size, fr.to_bytes())
        assert again.root() == fr.root()
    with pytest.raises(ValueError):
        Frontier(3, [b"x" * 32])  # size 3 needs two subtree roots


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=6))
def test_frontier_bulk_extend_equals_one_by_one(chunks):
    hashes = [leaf_hash(x) for x in leaves(sum(chunks))]
    bulk, single = Frontier(), Frontier()
    pos = 0
    for c in chunks:
        bulk.extend(hashes[pos:pos + c])
        for h in hashes[pos:pos + c]:
            single.append(h)
        pos += c
        assert bulk.size == single.size == pos
        assert bulk.nodes == single.nodes
        assert bulk.root() == root_from_leaf_hashes(hashes[:pos])


def test_verifiers_reject_malformed_sizes():
    h = leaf_hash(b"a")
    assert not verify_inclusion(h, 1, 1, [], h)
    assert not verify_inclusion(h, -1, 1, [], h)
    assert not verify_consistency(3, 2, [], h, h)
    assert not verify_consistency(2, 4, [], h, h)
    with pytest.raises(ValueError):
        inclusion_proof([h], 1)
    with pytest.raises(ValueError):
        consistency_proof([h], 2)
