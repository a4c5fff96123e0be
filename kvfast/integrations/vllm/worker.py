"""The connector's worker side: vLLM's KV tensors seen as kvfast pages (measured, or refused), loads into vLLM's own
blocks through the store (:meth:`kvfast.Store.load_into`: trust, RAM tier, usage ledger), per-layer waits, and the
publish of prompts whose prefill completed, in the background (saver.py)."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch
from vllm.logger import init_logger

from kvfast.cache.pages import KVPages
from kvfast.errors import KVLayoutError
from kvfast.integrations.vllm import common
from kvfast.integrations.vllm.common import DECLINE, KvfastConnectorMetadata, KvfastWorkerMetadata, LoadSpec
from kvfast.integrations.vllm.layout import KVWriter, discover_views, layer_index
from kvfast.integrations.vllm.saver import BackgroundSaver
from kvfast.loader import LoadHandle, choose_path
from kvfast.store import Store, StoreKey

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

logger = init_logger("vllm.kvfast.integrations.vllm")


class KvfastWorker:
    """The worker-process half of :class:`~kvfast.integrations.vllm.KvfastConnector`."""

    def __init__(self, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig | None, store: Store, verify: bool,
                 disabled: str | None):
        self._vllm_config, self._kv_cache_config = vllm_config, kv_cache_config
        self._store, self._verify, self._disabled = store, verify, disabled
        self._pages: KVPages | None = None
        self._refused: str | None = None  # why vLLM's KV caches were refused
        self._layer_of: dict[str, int] = {}
        self._handles: dict[str, tuple[LoadSpec, LoadHandle, float]] = {}  # req id -> load, handle, start time
        self._report = KvfastWorkerMetadata()
        self._invalid: set[int] = set()
        self._saver = BackgroundSaver(store)

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Recognise the KV cache tensors vLLM allocated (shape, dtype, strides, backend) or refuse them.

        A refusal is logged with what was found, reported to the scheduler (which then declines every request),
        and never raised: vLLM serves on, prefilling everything itself.
        """
        try:
            if self._disabled is not None:
                raise KVLayoutError(self._disabled)
            self._pages, self._layer_of = _vllm_pages(kv_caches, self._vllm_config, self._kv_cache_config)
            self._saver.pages = self._pages
            # The loader picks its path from the pages' device and strides, once for every load into them.
            backend, method = choose_path(self._pages)
            logger.info("kvfast: %s, K strides %s, V strides %s: loads take the %s/%s path", self._pages,
                        self._pages.keys[0].stride(), self._pages.values[0].stride(), backend, method)
        except KVLayoutError as exc:
            self._refuse(str(exc))
        except Exception as exc:  # noqa: BLE001 - see DECLINE
            logger.exception("kvfast: inspecting vLLM's KV caches failed")
            self._refuse(f"inspecting vLLM's KV caches failed: {exc!r}")

    def _refuse(self, why: str) -> None:
        self._pages = self._saver.pages = None
        self._refused = self._report.refused = self._saver.refused = why
        logger.error("kvfast: %s; the connector declines every load and publishes nothing", why)

    def start_load_kv(self, meta: KvfastConnectorMetadata) -> None:
        """Start this step's loads: all checks run now, the bytes arrive layer by layer in the background.

        First, saves of requests vLLM preempted in this step read their blocks to the end: vLLM freed those blocks,
        and this step's loads and forward may write them."""
        self._saver.wait_gathered(meta.preempted)
        for load in meta.loads:
            if self._pages is None:
                self._fail(load, self._refused or "vLLM's KV caches were never registered")
                continue
            t0 = time.perf_counter()
            try:
                handle = self._store.load_into(StoreKey(meta.fingerprint, load.document), self._pages,
                                               load.block_ids, load.token_ids, verify=self._verify, blocking=False)
            except Exception as exc:  # noqa: BLE001 - see DECLINE
                self._fail(load, exc)
                continue
            self._handles[load.req_id] = (load, handle, t0)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Block until every load of this step has written layer ``layer_name`` (failures are reported, not raised)."""
        layer = self._layer_of.get(layer_name)
        if layer is None:
            return
        for req_id, (load, handle, _) in list(self._handles.items()):
            try:
                handle.wait_layer(layer)
            except Exception as exc:  # noqa: BLE001 - see DECLINE
                del self._handles[req_id]
                self._fail(load, exc)

    def wait_for_save(self, meta: KvfastConnectorMetadata | None) -> None:
        """Settle this step's loads, then start publishing the prompts whose prefill completed (in the background:
        vLLM holds their blocks until :meth:`get_finished` reports them)."""
        for load, handle, t0 in self._handles.values():
            try:
                handle.wait()
            except Exception as exc:  # noqa: BLE001 - see DECLINE
                self._fail(load, exc)
                continue
            self._report.loaded[load.req_id] = load.num_tokens
            logger.info("kvfast: request %s: %d prompt tokens loaded (%s/%s path; load and forward %.1f ms): %s",
                        load.req_id, load.num_tokens, handle.backend, handle.method, (time.perf_counter() - t0) * 1e3,
                        load.path)
        self._handles.clear()
        if meta is None or not meta.saves:
            return
        t0 = time.perf_counter()
        for save in meta.saves:
            self._saver.submit(save.req_id, save.token_ids, save.block_ids, meta.fingerprint)
        logger.info("kvfast: %d save(s) handed to the background; they held the step %.3f ms", len(meta.saves),
                    (time.perf_counter() - t0) * 1e3)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """(requests whose save is over and which vLLM finished: it frees their blocks now, None): loads are
        synchronous, so nothing is ever "finished receiving"."""
        return self._saver.finished(finished_req_ids) or None, None

    def _fail(self, load: LoadSpec, why: str | Exception) -> None:
        """Report the load failed: its blocks go back to vLLM as invalid, and vLLM recomputes them."""
        logger.warning("kvfast: request %s: load of %s declined (%s); vLLM recomputes its %d tokens", load.req_id,
                       load.path, why, load.num_tokens,
                       exc_info=isinstance(why, Exception) and not isinstance(why, DECLINE))
        self._report.failed[load.req_id] = str(why)
        self._invalid.update(load.block_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        invalid, self._invalid = self._invalid, set()
        return invalid

    def build_connector_worker_meta(self) -> KvfastWorkerMetadata | None:
        report = self._report
        report.saved.update(self._saver.outcomes())
        if not (report.loaded or report.failed or report.saved or report.refused):
            return None
        self._report = KvfastWorkerMetadata()
        return report


def _vllm_pages(kv_caches: dict[str, torch.Tensor], vllm_config: VllmConfig,
                kv_cache_config: KVCacheConfig | None) -> tuple[KVPages, dict[str, int]]:
    """vLLM's caches as kvfast pages (HND views with vLLM's strides) and each vLLM layer name's layer index;
    KVLayoutError when the layout is unknown."""
    spec = common.engine_spec(kv_cache_config)
    if isinstance(spec, str):
        raise KVLayoutError(spec)
    layers = vllm_config.compilation_config.static_forward_context
    by_index: dict[int, tuple[str, torch.Tensor]] = {}
    for name, kv in kv_caches.items():
        i = layer_index(name)
        if i in by_index:
            raise KVLayoutError(f"layers {by_index[i][0]!r} and {name!r} both map to layer {i}")
        by_index[i] = (name, kv)
    if sorted(by_index) != list(range(spec.num_layers)):
        raise KVLayoutError(f"vLLM registered layers {sorted(by_index)}, expected 0..{spec.num_layers - 1}")
    keys, values = [], []
    for i in range(spec.num_layers):
        name, kv = by_index[i]
        k, v = discover_views(name, kv, spec.kv, _backend_writer(name, layers.get(name)))
        keys.append(k)
        values.append(v)
    return KVPages(keys, values, layout="HND"), {name: i for i, (name, _) in by_index.items()}


def _backend_writer(name: str, layer: Any) -> KVWriter:
    """The layer's own KV writer (``impl.do_kv_cache_update``), which discover_views probes; refused if absent."""
    backend = getattr(layer, "attn_backend", None)
    impl = getattr(layer, "impl", None)
    if backend is None or impl is None or not hasattr(impl, "do_kv_cache_update"):
        raise KVLayoutError(f"layer {name!r}: no attention backend with a separate KV writer found")
    if getattr(backend, "forward_includes_kv_cache_update", True):
        raise KVLayoutError(f"layer {name!r}: backend {backend.get_name()} writes KV inside its forward, so kvfast "
                            "cannot measure its layout")

    def write(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slots: torch.Tensor) -> None:
        impl.do_kv_cache_update(layer, key, value, kv_cache, slots)

    return write
