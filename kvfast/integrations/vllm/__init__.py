"""kvfast inside vLLM: ``KvfastConnector``, a vLLM (v1) KV connector over a kvfast store.

Point vLLM at it with ``"kv_connector_module_path": "kvfast.integrations.vllm"``. The connector is imported on first
access, so the parts that need no vLLM (``layout``: vLLM's tensors seen as kvfast pages) import without it:

    connector.py   the facade vLLM instantiates; hands each hook to the scheduler or the worker side
    scheduler.py   scheduler process: store lookups, fit checks, per-step metadata, outcomes
    worker.py      worker process: vLLM's tensors as pages, loads into vLLM's blocks, saves
    common.py      what the two sides exchange (metadata dataclasses)
    layout.py      vLLM's KV cache tensors as kvfast page views, probed with the backend's own writer
"""
from __future__ import annotations

from typing import Any

_CONNECTOR_NAMES = ("KvfastConnector", "KvfastConnectorMetadata", "KvfastWorkerMetadata", "LoadSpec", "SaveSpec")


def __getattr__(name: str) -> Any:
    if name in _CONNECTOR_NAMES:
        from kvfast.integrations.vllm import connector

        return getattr(connector, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_CONNECTOR_NAMES)
