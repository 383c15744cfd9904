"""``fedretain consent init | pin | verify``: the node identity side of the officer's CLI.

A node's ledger is trusted only under the node's pinned key (:mod:`.identity`): ``init
--silo`` pins a new node's key, ``pin`` pins an existing ledger's key as a deliberate act,
and ``verify`` checks against the pin (or a key the officer gives), never silently against
the key a ledger declares about itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from .cli_base import _TRUST_OPT, EMBEDDED_WARNING, _Ctx, _friendly, _loc, _open, _require_trust


@click.command()
@click.option("--controller", required=True, help="the merchant id this node's ledger belongs to")
@click.pass_obj
@_loc
@_friendly
def init(obj: _Ctx, controller: str) -> None:
    """Create a new ledger and (if missing) the node's signing key; for a node's ledger also pin the key.

    A node's ledger is one given by --silo or one inside a node state folder (``.node``).

    Idempotent: a ledger that exists for the same controller is left as it is. For a
    different controller the message says how to recover (an empty ledger may be removed).
    """
    from . import signing
    from .identity import NODE_DIR, load_pin, write_pin
    from .ledger import ConsentLedger

    if obj.db.exists():
        _init_existing(obj, controller.strip())
        return
    existed = obj.key.exists()
    state_dir = obj.state_dir
    node_state = state_dir is not None and (obj.silo is not None or state_dir.name == NODE_DIR)
    pin = load_pin(state_dir) if state_dir is not None and node_state else None
    if pin is not None and (not existed
                            or pin.key_fingerprint != signing.fingerprint(signing.load_private_key(obj.key))):
        raise click.ClickException(f"{pin.path} pins key {pin.key_fingerprint}, not the key in {obj.key}; "
                                   "refusing to create a ledger the node would not trust (restore the node key)")
    ledger = ConsentLedger.create(obj.db, controller=controller, key_path=obj.key)
    if state_dir is not None and node_state and pin is None:  # a node's ledger: pin its key now
        pin = write_pin(state_dir, ledger.controller, ledger.public_key)
        click.echo(f"pinned the node key {pin.key_fingerprint} for merchant {pin.merchant_id!r} in {pin.path}")
    pub = obj.key.with_name(obj.key.name + ".pub")
    if not pub.exists():
        pub.write_text(signing.public_key_pem(ledger.public_key))
    click.echo(f"created consent ledger {obj.db} for controller {ledger.controller!r}")
    click.echo(f"node key {obj.key} ({'existing' if existed else 'new, mode 0600'}), public key {pub}")
    click.echo(f"key fingerprint {ledger.key_fingerprint}")
    ledger.close()


def _init_existing(obj: _Ctx, controller: str) -> None:
    with _open(obj) as ledger:
        have, size = ledger.controller, ledger.size
    if have == controller:
        click.echo(f"consent ledger {obj.db} already exists for controller {have!r} ({size} records); nothing to do")
        return
    side = ", ".join(str(obj.db) + x for x in ("", "-wal", "-shm"))
    if size == 0:
        raise click.ClickException(
            f"consent ledger {obj.db} exists for controller {have!r}, not {controller!r}, and is still empty. "
            f"If {controller!r} is right, remove the empty ledger ({side}) and run init again; otherwise "
            f"use --controller {have}")
    raise click.ClickException(
        f"consent ledger {obj.db} holds {size} records for controller {have!r}; a ledger's controller never "
        f"changes. Import {controller!r}'s records into a separate ledger (another --db), or check the "
        "export's controller column")


# feature name -> consent scopes it reads. The consent package does not import the feature
# registry (layering); the ``fedretain`` front end hands it in (fedretain/cli/consent.py).


@click.command()
@click.option("--public-key", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="verify against this public key PEM instead of the node's pinned key or node key")
@_TRUST_OPT
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
@click.option("--against", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="also check the ledger against the heads the platform witnessed (a run.json or its witness.db)")
@click.pass_obj
@_loc
@_friendly
def verify(obj: _Ctx, public_key: Path | None, trust_embedded_key: bool, as_json: bool,
           against: Path | None = None) -> None:
    """Check the hash chain, indexed columns, Merkle roots and signatures (exit 1 if tampered).

    The key: --public-key, else the node's pinned key (--silo, or node.json beside --db), else
    the node key file; a ledger signed by another key fails. With none of them, checking against
    the key the ledger declares about itself needs --trust-embedded-key and prints a WARNING.
    """
    from .signing import load_public_key
    from .witness_check import check_file

    pub = load_public_key(public_key) if public_key is not None else None
    with _open(obj) as ledger:
        _require_trust(obj, ledger, pub is not None, trust_embedded_key)
        res = ledger.verify(pub)
        seen = check_file(ledger, against, pub) if against is not None else None
    warn = res.key_source.startswith("ledger")
    if as_json:
        d = res.to_dict()
        if warn:
            d["warning"] = EMBEDDED_WARNING
        if seen is not None:
            d["against"] = seen.to_dict()
        click.echo(json.dumps(d, indent=2))
    else:
        click.echo(res.describe() + (f"\n{seen.describe()}" if seen else ""))
        if warn:
            click.echo(f"WARNING: {EMBEDDED_WARNING}")
    if not res.ok or (seen is not None and not seen.ok):
        raise SystemExit(1)


@click.command()
@click.option("--public-key", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="pin this public key PEM [default: the public half of the node key]")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="the node's state folder when it is not SILO/.node")
@click.option("--replace", is_flag=True, help="replace an existing pin (a deliberate key rotation)")
@click.pass_obj
@_loc
@_friendly
def pin(obj: _Ctx, public_key: Path | None, state_dir: Path | None, replace: bool) -> None:
    """Pin the key the node's consent ledger must be signed with (a deliberate act; prints what it pins).

    The node then trusts its ledger only under this key. The ledger must verify under the
    key being pinned; an existing, different pin is replaced only with --replace.
    """
    from . import signing
    from .identity import PinError, load_pin, write_pin
    from .ledger import ConsentLedger

    state = state_dir or (obj.state_dir if obj.silo is not None else None)
    if state is None:
        raise click.ClickException("pin needs the node: pass --silo SILO (or --state-dir DIR with --db)")
    if public_key is not None:
        pub, source = signing.load_public_key(public_key), f"public key {public_key}"
    elif obj.key.exists():
        pub, source = signing.load_private_key(obj.key).public_key(), f"node key {obj.key}"
    else:
        raise click.ClickException(f"no node key at {obj.key}: pass --key NODE_KEY, or --public-key PEM of the key "
                                   "this node's ledger must be signed with")
    fp = signing.fingerprint(pub)
    with ConsentLedger.open(obj.db) as ledger:
        res = ledger.verify(pub)
        controller = ledger.controller
    if not res.ok:
        raise click.ClickException(f"{obj.db} does not verify under {fp} ({source}): {res.reason}; nothing pinned")
    merchant_file = obj.silo / "merchant.json" if obj.silo is not None else None
    if merchant_file is not None and merchant_file.is_file():
        mid = str(json.loads(merchant_file.read_text(encoding="utf-8")).get("merchant_id", ""))
        if mid and mid != controller:
            raise click.ClickException(f"{obj.db} is the ledger of merchant {controller!r}, but {merchant_file} says "
                                       f"{mid!r}; nothing pinned")
    try:
        existing = load_pin(state)
    except PinError:
        if not replace:
            raise
        existing = None
    if existing is not None and (existing.key_fingerprint, existing.merchant_id) == (fp, controller):
        click.echo(f"{existing.path} already pins key {fp} for merchant {controller!r}; nothing to do")
        return
    if existing is not None and not replace:
        raise click.ClickException(f"{existing.path} already pins key {existing.key_fingerprint} for merchant "
                                   f"{existing.merchant_id!r}; pass --replace to pin {fp} instead (a key rotation)")
    new = write_pin(state, controller, pub, replace=True)
    click.echo(f"pinned key {fp} ({source}) for merchant {controller!r} in {new.path}")
    click.echo(f"the node now refuses any consent ledger not signed by {fp}")
