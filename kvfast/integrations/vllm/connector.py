"""kvfast as a vLLM KV connector: serve prompts from stored documents' KV, and publish prompts' KV.

Enable it with vLLM's ``kv_transfer_config`` (README, "Serving with vLLM")::

    {"kv_connector": "KvfastConnector", "kv_connector_module_path": "kvfast.integrations.vllm",
     "kv_role": "kv_consumer" | "kv_producer" | "kv_both", "kv_load_failure_policy": "recompute",
     "kv_connector_extra_config": {"store": "/srv/kv"}}

This class is a facade, as vLLM splits a connector: each hook goes to the scheduler side (scheduler.py) or the
worker side (worker.py); what they exchange is in common.py. The data's path:

    scheduler  get_num_new_matched_tokens: prompt ──hash chain──▶ Store.match (this model's fingerprint)
                 ──▶ .kvf header through the loader's own check ──▶ "n tokens come from kvfast"
               build_connector_meta: loads (document, tokens, vLLM block ids) and saves (prompts just prefilled)
    worker     register_kv_caches: vLLM's tensors ──layout.py (probed with the backend's writer)──▶ KVPages with
                 vLLM's strides, or a refusal
               start_load_kv ──Store.load_into──▶ checked chunks written into vLLM's own blocks, layer-major, in the
                 background (or one copy from the store's RAM tier); trusted keys honoured, the ledger records it
               wait_for_layer_load(layer) waits for that layer only; wait_for_save starts publishing prompts
                 (Store.put) on a background thread; get_finished reports each save over, and vLLM, which held the
                 request's blocks from request_finished on, frees them
               failures: the request's blocks are reported invalid -> vLLM recomputes them
    scheduler  update_connector_output / request_finished: outcomes returned as kv_transfer_params

Nothing here ever raises into the engine on bad input: an unknown KV layout, another model's artifact or a
corrupted one make the connector decline (log, and vLLM prefills itself); only a broken configuration (no
store folder) stops the engine at start.

Extra config (``kv_connector_extra_config``):
    store: the kvfast store's folder (required).
    model_fingerprint: the served model's :func:`kvfast.fingerprint`; default: computed from the checkpoint
        folder with :func:`kvfast.checkpoint_fingerprint` in the served dtype.
    verify: check every chunk's CRC-32C while loading (default true).
    trusted_keys: Ed25519 public key files; when given, only documents signed by one of them are loaded.
    ram_bytes: the store's host RAM tier in this worker (default: the store's, and 0 when vLLM runs on CPU);
        0 turns it off.
    origin: an S3-compatible origin below the store, ``"s3://bucket/prefix"`` (endpoint and credentials from the
        standard AWS environment variables): prompts are published there too, and a document found only there
        is fetched once into this node's store, then loaded (kvfast.Store's ``origin``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvfast.integrations.vllm.common import (
    KvfastConnectorMetadata,
    KvfastWorkerMetadata,
    LoadSpec,
    SaveSpec,
    unsupported_parallelism,
)
from kvfast.integrations.vllm.scheduler import KvfastScheduler
from kvfast.integrations.vllm.worker import KvfastWorker
from kvfast.store import Store
from kvfast.store.store import DEFAULT_RAM_BYTES

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request


class KvfastConnector(KVConnectorBase_V1):
    """A vLLM v1 KV connector over a kvfast :class:`~kvfast.Store` (see the module docstring).

    Roles (``kv_role``): ``kv_consumer`` loads the longest stored block-aligned prefix of each prompt,
    ``kv_producer`` publishes each prompt's KV once it is prefilled, ``kv_both`` does both.

    Example:
        >>> from vllm import LLM                                                     # doctest: +SKIP
        >>> llm = LLM(model="models/tiny", kv_transfer_config={                      # doctest: +SKIP
        ...     "kv_connector": "KvfastConnector", "kv_connector_module_path": "kvfast.integrations.vllm",
        ...     "kv_role": "kv_consumer", "kv_load_failure_policy": "recompute",
        ...     "kv_connector_extra_config": {"store": "/srv/kv"}})
    """

    _cache_hit_source = CacheHitSource.DISK

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        tc = self._kv_transfer_config
        root = tc.get_from_extra_config("store", None)
        if not root:
            raise ValueError("KvfastConnector: kv_connector_extra_config needs 'store': the kvfast store folder")
        trusted = tc.get_from_extra_config("trusted_keys", None)
        ram_bytes = tc.get_from_extra_config("ram_bytes", None)
        if ram_bytes is None:
            # vLLM on CPU: the OS page cache already keeps a hot file in memory, and the native load from it is
            # the one copy (layer by layer, any layout); a RAM tier would hold a second copy and add a strided
            # torch copy per request (bench/RESULTS.md, "vLLM").
            ram_bytes = 0 if vllm_config.device_config.device_type == "cpu" else DEFAULT_RAM_BYTES
        store = Store(root, trusted_keys=trusted or None, ram_bytes=int(ram_bytes),
                      origin=tc.get_from_extra_config("origin", None) or None)
        disabled = unsupported_parallelism(vllm_config)
        self._scheduler: KvfastScheduler | None = None
        self._worker: KvfastWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = KvfastScheduler(vllm_config, kv_cache_config, tc, store, disabled)
        else:
            self._worker = KvfastWorker(vllm_config, kv_cache_config, store,
                                        bool(tc.get_from_extra_config("verify", True)), disabled)

    # -- scheduler side -------------------------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self._scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        self._scheduler.update_connector_output(connector_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self._scheduler.request_finished(request, block_ids)

    # -- worker side ----------------------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvfastConnectorMetadata)
        self._worker.start_load_kv(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        self._worker.wait_for_layer_load(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata,
                      **kwargs: Any) -> None:
        # Nothing per layer: a prompt is published once its whole prefill is done, from its blocks, which vLLM
        # holds until get_finished reports the save over, so one background gather reads every layer.
        return

    def wait_for_save(self) -> None:
        meta = self._connector_metadata
        self._worker.wait_for_save(meta if isinstance(meta, KvfastConnectorMetadata) else None)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self._worker.get_finished(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.get_block_ids_with_load_errors()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        return self._worker.build_connector_worker_meta()


__all__ = ["KvfastConnector", "KvfastConnectorMetadata", "KvfastWorkerMetadata", "LoadSpec", "SaveSpec"]
