"""The NIXL progress-delay patch, against a stand-in for NIXL's compiled bindings."""

import sys
import types

from app import engine_process


class _Config:
    pthrDelay = 0


def _fake_nixl(monkeypatch):
    created = []

    def nixl_agent(name, config):
        created.append((name, config.pthrDelay))
        return object()

    bind = types.SimpleNamespace(nixlAgent=nixl_agent, nixlAgentConfig=_Config, other=42)
    api = types.ModuleType("nixl._api")
    api.nixlBind = bind
    pkg = types.ModuleType("nixl")
    pkg._api = api
    monkeypatch.setitem(sys.modules, "nixl", pkg)
    monkeypatch.setitem(sys.modules, "nixl._api", api)
    return api, created


def test_patch_sets_delay_on_every_new_agent(monkeypatch):
    api, created = _fake_nixl(monkeypatch)
    assert engine_process.patch_nixl_progress_delay(100)
    api.nixlBind.nixlAgent("a", _Config())
    assert created == [("a", 100)]
    assert api.nixlBind.other == 42  # the rest of the bindings pass through


def test_patch_is_idempotent(monkeypatch):
    api, created = _fake_nixl(monkeypatch)
    engine_process.patch_nixl_progress_delay(100)
    engine_process.patch_nixl_progress_delay(5)
    api.nixlBind.nixlAgent("a", _Config())
    assert created == [("a", 100)]


def test_plugin_applies_delay_from_environment(monkeypatch):
    api, created = _fake_nixl(monkeypatch)
    monkeypatch.setenv(engine_process.NIXL_DELAY_ENV, "250")
    engine_process.setup_engine_process()
    api.nixlBind.nixlAgent("b", _Config())
    assert created == [("b", 250)]


def test_plugin_leaves_nixl_alone_without_setting(monkeypatch):
    api, created = _fake_nixl(monkeypatch)
    monkeypatch.delenv(engine_process.NIXL_DELAY_ENV, raising=False)
    engine_process.setup_engine_process()
    api.nixlBind.nixlAgent("c", _Config())
    assert created == [("c", 0)]


def test_amx_request_never_raises():
    assert engine_process.request_amx_permission() in (True, False)
