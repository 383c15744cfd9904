"""The compat boundary: one version check, loud on any untested Flower/Opacus release."""

from __future__ import annotations

import importlib

import pytest

import fedretain.compat as compat


def test_installed_flower_and_opacus_are_the_tested_releases():
    problems = compat.version_problems(exact=True)
    assert not problems, "fedretain.compat was read against other releases: " + "; ".join(problems)


@pytest.mark.parametrize("module", ["fedretain.compat.flower", "fedretain.compat.opacus"])
def test_every_internal_name_compat_uses_still_exists(module):
    mod = importlib.import_module(module)
    missing = []
    for where, name in mod.INTERNALS:
        try:
            getattr(importlib.import_module(where), name)
        except (ImportError, AttributeError) as exc:
            missing.append(f"{where}.{name} ({type(exc).__name__})")
    assert not missing, f"{module}: Flower/Opacus internals changed: {', '.join(missing)}"


@pytest.mark.parametrize(("package", "fake"), [("flwr", "1.43.0"), ("opacus", "1.7.0"), ("flwr", "1.42.1")])
def test_a_different_version_fails_loudly_naming_it(monkeypatch, package, fake):
    real = compat.installed_version
    monkeypatch.setattr(compat, "installed_version", lambda p: fake if p == package else real(p))
    with pytest.raises(compat.CompatError) as err:
        compat.check_versions(exact=True)
    message = str(err.value)
    assert f"{package} {fake} is installed" in message and compat.TESTED[package] in message
    other = "opacus" if package == "flwr" else "flwr"
    assert f"{other} " not in message.split(".")[0] or f"{other} {real(other)} is installed" not in message


def test_run_time_check_accepts_a_patch_release_but_not_another_series(monkeypatch):
    monkeypatch.setattr(compat, "installed_version", lambda p: {"flwr": "1.42.3", "opacus": "1.6.0"}[p])
    compat.check_versions()  # same 1.42 series: the internals were read against it
    monkeypatch.setattr(compat, "installed_version", lambda p: {"flwr": "1.43.0", "opacus": "1.6.0"}[p])
    with pytest.raises(compat.CompatError, match=r"flwr 1\.43\.0 is installed.*flwr 1\.42\.0"):
        compat.check_versions()


def test_compat_modules_refuse_to_load_on_an_untested_release(monkeypatch):
    import sys

    monkeypatch.setattr(compat, "installed_version", lambda p: {"flwr": "1.50.0", "opacus": "1.6.0"}[p])
    monkeypatch.delitem(sys.modules, "fedretain.compat.flower", raising=False)
    with pytest.raises(compat.CompatError, match="flwr 1.50.0"):
        importlib.import_module("fedretain.compat.flower")
    monkeypatch.delitem(sys.modules, "fedretain.compat.flower", raising=False)


def test_a_refused_reply_keeps_its_metadata_and_carries_only_the_error():
    """``error_in_place_of`` relies on Flower's internal ``Message(metadata=, error=)`` form."""
    from flwr.app import ConfigRecord, Error, Message, Metadata, RecordDict

    from fedretain.compat.flower import error_in_place_of

    md = Metadata(run_id=7, message_id="r3", src_node_id=3, dst_node_id=0, reply_to_message_id="i3",
                  group_id="2", created_at=0.0, ttl=60.0, message_type="train")
    reply = Message(metadata=md, content=RecordDict({"c": ConfigRecord({"x": 1})}))
    out = error_in_place_of(reply, Error(901, "refused"))
    kept = (out.metadata.run_id, out.metadata.message_id, out.metadata.src_node_id,
            out.metadata.reply_to_message_id, out.metadata.message_type)
    assert kept == (7, "r3", 3, "i3", "train")
    assert out.has_error() and not out.has_content()
    assert (out.error.code, out.error.reason) == (901, "refused")
