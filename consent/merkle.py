"""RFC 9162 (Certificate Transparency v2) Merkle tree hashing, proofs and proof verification.

Definitions (RFC 9162 §2.1.1): the hash of an empty tree is SHA-256 of the empty string;
a leaf hash is ``SHA-256(0x00 || leaf)``; an interior node is ``SHA-256(0x01 || left ||
right)``; a tree of ``n > 1`` leaves splits at ``k``, the largest power of two smaller
than ``n``. Proof generation follows §2.1.3.1 (PATH) and §2.1.4.1 (PROOF/SUBPROOF); the
verifiers are the algorithms of §2.1.3.2 and §2.1.4.2, in the style of sigstore-python's
small Merkle verifier. All functions here work on *leaf hashes*, so callers hash each
leaf once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

__all__ = [
    "EMPTY_ROOT",
    "leaf_hash",
    "node_hash",
    "root_from_leaf_hashes",
    "merkle_root",
    "Frontier",
    "inclusion_proof",
    "consistency_proof",
    "verify_inclusion",
    "verify_consistency",
]

_sha256 = hashlib.sha256
EMPTY_ROOT: bytes = _sha256(b"").digest()


def leaf_hash(leaf: bytes) -> bytes:
    """``SHA-256(0x00 || leaf)``."""
    return _sha256(b"\x00" + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """``SHA-256(0x01 || left || right)``."""
    return _sha256(b"\x01" + left + right).digest()


def root_from_leaf_hashes(hashes: Sequence[bytes]) -> bytes:
    """Merkle Tree Hash over leaf hashes, built iteratively level by level.

    Pairing neighbours on each level and carrying an odd last node up unchanged yields
    the same tree as RFC 9162's largest-power-of-two split, in O(n) hashes and no recursion.
    """
    level = list(hashes)
    if not level:
        return EMPTY_ROOT
    sha = _sha256
    while len(level) > 1:
        nxt = [sha(b"\x01" + a + b).digest() for a, b in zip(level[0::2], level[1::2])]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def merkle_root(leaves: Iterable[bytes]) -> bytes:
    """Merkle Tree Hash over raw leaves (hashes each leaf first)."""
    return root_from_leaf_hashes([leaf_hash(x) for x in leaves])


class Frontier:
    """The right edge of a growing tree: roots of its perfect subtrees, largest first.

    A tree of ``size = 2^a + 2^b + ...`` (``a > b > ...``) is fully summarised for
    appending by the roots of those perfect subtrees (at most 64 hashes), so a ledger
    can append and re-sign its head in O(log n) without re-reading old leaves.
    """

    __slots__ = ("size", "nodes")

    def __init__(self, size: int = 0, nodes: Sequence[bytes] = ()) -> None:
        if len(nodes) != bin(size).count("1"):
            raise ValueError(f"a frontier of size {size} has {bin(size).count('1')} nodes, got {len(nodes)}")
        self.size = size
        self.nodes = list(nodes)

    def append(self, leaf_hash_: bytes) -> None:
        """Add one leaf hash (binary-counter carry: merge equal-height subtrees)."""
        nodes = self.nodes
        nodes.append(leaf_hash_)
        n = self.size
        while n & 1:
            right = nodes.pop()
            nodes[-1] = _sha256(b"\x01" + nodes[-1] + right).digest()
            n >>= 1
        self.size += 1

    def extend(self, leaf_hashes: Iterable[bytes]) -> None:
        """Append many leaf hashes, level by level (one list comprehension of hashes per level).

        At height ``h`` the existing subtree root of that height (if any) is the left
        neighbour of the new nodes, so it is prepended; pairs are merged into the next
        level and an odd node left over at the right end is the new frontier node at ``h``.
        """
        level = list(leaf_hashes)
        if not level:
            return
        old, added = self.size, len(level)
        heights = [h for h in range(old.bit_length() - 1, -1, -1) if old >> h & 1]
        existing = dict(zip(heights, self.nodes))
        result: dict[int, bytes] = {}
        sha = _sha256
        h = 0
        while level:
            if h in existing:
                level.insert(0, existing.pop(h))
            if len(level) % 2:
                result[h] = level.pop()
            level = [sha(b"\x01" + a + b).digest() for a, b in zip(level[0::2], level[1::2])]
            h += 1
        result.update(existing)
        self.size = old + added
        self.nodes = [result[k] for k in sorted(result, reverse=True)]
        assert len(self.nodes) == bin(self.size).count("1"), "frontier invariant broken"

    def root(self) -> bytes:
        """The RFC 9162 root of the tree so far: fold the subtree roots right to left."""
        if not self.nodes:
            return EMPTY_ROOT
        r = self.nodes[-1]
        for h in reversed(self.nodes[:-1]):
            r = _sha256(b"\x01" + h + r).digest()
        return r

    def to_bytes(self) -> bytes:
        """Concatenated subtree roots (with ``size`` this restores the frontier)."""
        return b"".join(self.nodes)

    @classmethod
    def from_bytes(cls, size: int, blob: bytes) -> Frontier:
        """Inverse of :meth:`to_bytes`."""
        if len(blob) % 32:
            raise ValueError("frontier blob length is not a multiple of 32")
        return cls(size, [blob[i : i + 32] for i in range(0, len(blob), 32)])

    def copy(self) -> Frontier:
        return Frontier(self.size, list(self.nodes))


def _split(n: int) -> int:
    """Largest power of two strictly smaller than ``n`` (``n > 1``)."""
    return 1 << ((n - 1).bit_length() - 1)


def _mth(hashes: Sequence[bytes], lo: int, hi: int) -> bytes:
    return root_from_leaf_hashes(hashes[lo:hi])


def inclusion_proof(hashes: Sequence[bytes], index: int, tree_size: int | None = None) -> list[bytes]:
    """Audit path for leaf ``index`` in the tree of the first ``tree_size`` leaf hashes (§2.1.3.1)."""
    n = len(hashes) if tree_size is None else tree_size
    if not 0 <= index < n <= len(hashes):
        raise ValueError(f"leaf index {index} is not in a tree of size {n}")
    path: list[bytes] = []
    lo, hi, m = 0, n, index
    while hi - lo > 1:
        k = _split(hi - lo)
        if m < k:
            path.append(_mth(hashes, lo + k, hi))
            hi = lo + k
        else:
            path.append(_mth(hashes, lo, lo + k))
            lo, m = lo + k, m - k
    path.reverse()  # PATH lists the deepest sibling first
    return path


def consistency_proof(hashes: Sequence[bytes], old_size: int, new_size: int | None = None) -> list[bytes]:
    """Consistency proof from the tree of ``old_size`` leaves to ``new_size`` leaves (§2.1.4.1)."""
    n = len(hashes) if new_size is None else new_size
    if not 0 <= old_size <= n <= len(hashes):
        raise ValueError(f"no consistency proof from size {old_size} to size {n}")
    if old_size in (0, n):
        return []
    proof: list[bytes] = []
    lo, hi, m, complete = 0, n, old_size, True
    while m != hi - lo:
        k = _split(hi - lo)
        if m <= k:
            proof.append(_mth(hashes, lo + k, hi))
            hi = lo + k
        else:
            proof.append(_mth(hashes, lo, lo + k))
            lo, m, complete = lo + k, m - k, False
    if not complete:
        proof.append(_mth(hashes, lo, hi))
    proof.reverse()
    return proof


def verify_inclusion(leaf_hash_: bytes, index: int, tree_size: int, proof: Sequence[bytes], root: bytes) -> bool:
    """RFC 9162 §2.1.3.2: does ``proof`` show leaf ``index`` of ``tree_size`` under ``root``?"""
    if index < 0 or index >= tree_size:
        return False
    fn, sn, r = index, tree_size - 1, leaf_hash_
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(old_size: int, new_size: int, proof: Sequence[bytes], old_root: bytes, new_root: bytes) -> bool:
    """RFC 9162 §2.1.4.2: is the tree ``new_root`` an append-only extension of ``old_root``?"""
    if old_size < 0 or new_size < old_size:
        return False
    if old_size == new_size:
        return not proof and old_root == new_root
    if old_size == 0:
        return not proof  # the empty tree is a prefix of every tree
    if not proof:
        return False
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # exact power of two: the old root is a node of the new tree
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == old_root and sr == new_root
