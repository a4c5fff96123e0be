"""kvfast as a vLLM KV connector: serve prompts from stored documents' KV, and publish prompts' KV.

Enable it with vLLM's ``kv_transfer_config`` (README, "Serving with vLLM")::

    {"kv_connector": "KvfastConnector", "kv_connector_module_path": "kvfast.integrations.vllm",
     "kv_role": "kv_consumer" | "kv_producer" | "kv_both", "kv_load_failure_policy": "recompute",
     "kv_connector_extra_config": {"store": "/srv/kv"}}

The data's path, split as vLLM splits a connector (scheduler process / worker process):

    scheduler  get_num_new_matched_tokens: prompt ──hash chain──▶ Store.match (this model's fingerprint)
                 ──▶ .kvf header checked (fingerprint, token ids) ──▶ "n tokens come from kvfast"
               build_connector_meta: loads (file, tokens, vLLM block ids) and saves (prompts just prefilled)
    worker     register_kv_caches: vLLM's tensors ──vllm_layout (probed with the backend's writer)──▶ K/V page
                 views with vLLM's strides, or a refusal
               start_load_kv ──kvfast.load_async──▶ checked chunks written into vLLM's pages by stride, layer-major
                 in the background (native reader when rows of D are contiguous, else the Python scatter)
               wait_for_layer_load(layer) waits for that layer only; wait_for_save gathers prompts' KV and
                 Store.put-s it (atomic publish)
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
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.logger import init_logger
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvfast.errors import KvfastError
from kvfast.identity import checkpoint_fingerprint, document_key
from kvfast.format import DTYPE_NAMES, open_kvf
from kvfast.integrations.vllm.layout import (
    KVLayoutError,
    KVSpec,
    KVWriter,
    VllmPagedKV,
    discover_views,
    layer_index,
)
from kvfast.load import LoadHandle, load_async
from kvfast.store import Store, StoreKey

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = init_logger(f"vllm.{__name__}")  # under "vllm", so it logs with the engine's handlers

# What a refused file or a failed read raises: kvfast's own errors, the file system's, the loader's argument checks.
# The worker's hooks catch anything else too (a bug must cost a recompute, not the engine) but log its traceback.
_DECLINE = (KvfastError, OSError, ValueError, RuntimeError)


# -- scheduler -> worker, and back -------------------------------------------------------------------------
@dataclass
class LoadSpec:
    """Fill a request's first vLLM blocks from a stored document.

    Attributes:
        req_id: vLLM's request id.
        path: the .kvf file.
        token_ids: the prompt's first ``num_tokens`` ids (the loader checks the file holds exactly these).
        block_ids: the request's vLLM blocks covering them (``num_tokens / block_size`` of them).
    """

    req_id: str
    path: str
    token_ids: list[int]
    block_ids: list[int]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class SaveSpec:
    """Publish a request's prompt KV once its prefill is complete.

    Attributes:
        req_id: vLLM's request id.
        token_ids: the whole prompt.
        block_ids: the request's vLLM blocks holding it.
    """

    req_id: str
    token_ids: list[int]
    block_ids: list[int]


@dataclass
class KvfastConnectorMetadata(KVConnectorMetadata):
    """One engine step's work for the worker: loads before the forward, saves after it."""

    fingerprint: str | None = None
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


@dataclass
class KvfastWorkerMetadata(KVConnectorWorkerMetadata):
    """What the worker did in one step, for the scheduler's log and the requests' ``kv_transfer_params``.

    Attributes:
        loaded: request id -> tokens loaded from kvfast.
        failed: request id -> why its load was declined (vLLM recomputes those blocks).
        saved: request id -> document key published (or why publishing failed, prefixed "failed: ").
        refused: why the worker refused vLLM's KV layout (then every load is declined), once.
    """

    loaded: dict[str, int] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    saved: dict[str, str] = field(default_factory=dict)
    refused: str | None = None

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, KvfastWorkerMetadata)
        return KvfastWorkerMetadata({**self.loaded, **other.loaded}, {**self.failed, **other.failed},
                                    {**self.saved, **other.saved}, self.refused or other.refused)


@dataclass
class _Plan:
    """A match found by ``get_num_new_matched_tokens``, waiting for vLLM to allocate its blocks."""

    path: str
    document: str
    token_ids: list[int]  # the prompt's first tokens the load covers (whole vLLM blocks)


@dataclass
class _Tracked:
    """A producer's view of a request being prefilled."""

    token_ids: list[int]
    block_ids: list[int]
    saved: bool = False


# -- the connector -------------------------------------------------------------------------------------------
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
        self._store = Store(root)
        self._verify = bool(tc.get_from_extra_config("verify", True))
        self._consumer, self._producer = tc.is_kv_consumer, tc.is_kv_producer
        self._block_size = vllm_config.cache_config.block_size
        # Why the connector declines everything (None: it works); set at start or by the worker's report.
        self._disabled: str | None = _unsupported_parallelism(vllm_config)
        if role == KVConnectorRole.SCHEDULER:
            self._init_scheduler(vllm_config)
        else:
            self._init_worker(vllm_config)

    # ==========================================================================================================
    # Scheduler side
    # ==========================================================================================================
    def _init_scheduler(self, vllm_config: VllmConfig) -> None:
        self._fingerprint: str | None = None
        self._spec = _engine_spec(self._kv_cache_config)
        self._plans: dict[str, _Plan] = {}  # req id -> match, until blocks are allocated
        self._pending: dict[str, _Plan] = {}  # req id -> load to schedule in this step's metadata
        self._tracked: dict[str, _Tracked] = {}  # producer: requests being prefilled
        self._outcome: dict[str, dict[str, Any]] = {}  # req id -> kv_transfer_params at finish
        if self._disabled is None and isinstance(self._spec, str):
            self._disabled = self._spec
        if self._disabled is None:
            try:
                self._fingerprint = _model_fingerprint(vllm_config, self._kv_transfer_config)
            except (KvfastError, OSError, ValueError) as exc:
                self._disabled = f"cannot fingerprint the served model: {exc}"
        if self._disabled is not None:
            logger.error("kvfast: connector disabled (%s); vLLM prefills every prompt itself", self._disabled)
        else:
            logger.info("kvfast: store %s, model %s, role %s%s", self._store.root, self._fingerprint,
                        self._kv_transfer_config.kv_role, _policy_warning(self._kv_transfer_config))

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        """How many prompt tokens after vLLM's own ``num_computed_tokens`` kvfast supplies (loaded synchronously).

        The longest stored prefix of the prompt under this model's fingerprint, cut to whole vLLM blocks and
        to at most ``len(prompt) - 1`` tokens (the last one must be computed to give logits). Its file's header
        is checked here (fingerprint, token ids), so a wrong or unreadable artifact is declined before vLLM
        plans around it.
        """
        self._plans.pop(request.request_id, None)
        if not self._consumer or self._disabled is not None or request.prompt_token_ids is None:
            return 0, False
        ids = list(request.prompt_token_ids)
        try:
            match = self._store.match(self._fingerprint, ids)
        except _DECLINE as exc:  # an unreadable store must not stop the engine
            self._decline(request.request_id, f"store lookup failed: {exc}")
            return 0, False
        if match is None:
            return 0, False
        n = min(match.num_tokens, len(ids) - 1) // self._block_size * self._block_size
        if n <= num_computed_tokens:
            return 0, False
        if num_computed_tokens:
            self._decline(request.request_id, f"vLLM's prefix cache already holds {num_computed_tokens} tokens; "
                          "kvfast loads whole prefixes only")
            return 0, False
        why = self._check_artifact(match.entry.path, ids[:n], match.entry)
        if why is not None:
            self._decline(request.request_id, why)
            return 0, False
        self._plans[request.request_id] = _Plan(str(match.entry.path), match.entry.key.document, ids[:n])
        return n, False

    def _check_artifact(self, path: Path, ids: list[int], entry: Any) -> str | None:
        """Why the stored file cannot serve these tokens to this engine, or None when it can."""
        spec = self._spec
        theirs = (entry.num_layers, entry.num_kv_heads, entry.head_dim, entry.dtype)
        dtype = DTYPE_NAMES.get(spec.kv.dtype, str(spec.kv.dtype))
        ours = (spec.num_layers, spec.kv.num_kv_heads, spec.kv.head_dim, dtype)
        if theirs != ours:
            return f"{path}: stored KV is (layers, kv_heads, head_dim, dtype) = {theirs}, this engine's {ours}"
        try:
            with open_kvf(path) as reader:  # header, manifest and token ids: cheap, and checked before any plan
                if reader.manifest.fingerprint != self._fingerprint:
                    return (f"{path}: made by model {reader.manifest.fingerprint[:19]}..., not by the served one "
                            f"({self._fingerprint[:19]}...)")
                if not np.array_equal(reader.token_ids[: len(ids)].numpy(), np.asarray(ids, dtype=np.int64)):
                    return f"{path}: its token ids differ from the prompt's first {len(ids)}"
        except _DECLINE as exc:
            return str(exc)
        return None

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        plan = self._plans.pop(request.request_id, None)
        if num_external_tokens > 0 and plan is not None:
            self._pending[request.request_id] = plan

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        """This step's loads (requests whose blocks were just allocated) and saves (prompts completed now)."""
        meta = KvfastConnectorMetadata(fingerprint=self._fingerprint)
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            blocks = list(new.block_ids[0])
            self._schedule_load(meta, new.req_id, blocks)
            if self._producer and self._disabled is None and new.prompt_token_ids is not None:
                self._tracked[new.req_id] = _Tracked(list(new.prompt_token_ids), blocks)
                self._schedule_save(meta, new.req_id, new.num_computed_tokens + scheduled.get(new.req_id, 0))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            new_blocks = cached.new_block_ids[i]
            resumed = req_id in cached.resumed_req_ids  # then new_block_ids are all the request's blocks
            tracked = self._tracked.get(req_id)
            if tracked is not None and new_blocks is not None:
                tracked.block_ids = list(new_blocks[0]) if resumed else tracked.block_ids + list(new_blocks[0])
            if resumed and new_blocks is not None:  # preempted, then matched and allocated again
                self._schedule_load(meta, req_id, list(new_blocks[0]))
            if tracked is not None:
                self._schedule_save(meta, req_id, cached.num_computed_tokens[i] + scheduled.get(req_id, 0))
        return meta

    def _schedule_load(self, meta: KvfastConnectorMetadata, req_id: str, blocks: list[int]) -> None:
        plan = self._pending.pop(req_id, None)
        if plan is None:
            return
        n = len(plan.token_ids)
        meta.loads.append(LoadSpec(req_id, plan.path, plan.token_ids, blocks[: n // self._block_size]))
        self._outcome[req_id] = {"kvfast_document": plan.document, "kvfast_planned_tokens": n}

    def _schedule_save(self, meta: KvfastConnectorMetadata, req_id: str, computed_after_step: int) -> None:
        tracked = self._tracked[req_id]
        if tracked.saved or computed_after_step < len(tracked.token_ids):
            return
        tracked.saved = True
        key = StoreKey(self._fingerprint, document_key(tracked.token_ids, self._store.block_tokens))
        if self._store.get(key) is not None:
            logger.debug("kvfast: request %s: document %s is already stored", req_id, key.document[:12])
            return
        nblocks = -(-len(tracked.token_ids) // self._block_size)
        meta.saves.append(SaveSpec(req_id, tracked.token_ids, tracked.block_ids[:nblocks]))

    def _decline(self, req_id: str, why: str) -> None:
        logger.warning("kvfast: request %s: declined (%s); vLLM prefills it itself", req_id, why)
        self._outcome[req_id] = {"kvfast_supplied_tokens": 0, "kvfast_declined": why}

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        """Log what the worker did and remember it for the requests' ``kv_transfer_params``."""
        report = connector_output.kv_connector_worker_meta
        if not isinstance(report, KvfastWorkerMetadata):
            return
        if report.refused and self._disabled is None:
            self._disabled = report.refused
            logger.error("kvfast: worker refused vLLM's KV cache (%s); loads and saves are off", report.refused)
        # A request may have finished already (request_finished ran in this step's output): its outcome is gone.
        for req_id, n in report.loaded.items():
            if req_id in self._outcome:
                self._outcome[req_id]["kvfast_supplied_tokens"] = n
        for req_id, why in report.failed.items():
            self._decline(req_id, f"load failed: {why}")
        for req_id, what in report.saved.items():
            if req_id in self._outcome or req_id in self._tracked:
                self._outcome.setdefault(req_id, {})["kvfast_published"] = what

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Forget the request; its outcome goes back in ``RequestOutput.kv_transfer_params``. Blocks are freed now."""
        req_id = request.request_id
        self._plans.pop(req_id, None)
        self._pending.pop(req_id, None)
        self._tracked.pop(req_id, None)
        outcome = self._outcome.pop(req_id, None)
        if outcome is not None and "kvfast_planned_tokens" in outcome and "kvfast_declined" not in outcome:
            # Loads are synchronous: vLLM handles a failed one (invalid blocks) before it finishes any request
            # of that step, and recomputes it instead. A planned load of a finishing request therefore landed,
            # even when the worker's report of it is processed after this call.
            outcome["kvfast_supplied_tokens"] = outcome["kvfast_planned_tokens"]
        return False, outcome

    # ==========================================================================================================
    # Worker side
    # ==========================================================================================================
    def _init_worker(self, vllm_config: VllmConfig) -> None:
        self._vllm_config = vllm_config
        self._cache: VllmPagedKV | None = None
        self._refused: str | None = None  # why vLLM's KV caches were refused
        self._load_backend = "auto"
        self._layer_of: dict[str, int] = {}
        self._handles: dict[str, tuple[LoadSpec, LoadHandle, float]] = {}  # req id -> load, handle, start time
        self._report = KvfastWorkerMetadata()
        self._invalid: set[int] = set()

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Recognise the KV cache tensors vLLM allocated (shape, dtype, strides, backend) or refuse them.

        A refusal is logged with what was found, reported to the scheduler (which then declines every request),
        and never raised: vLLM serves on, prefilling everything itself.
        """
        try:
            if self._disabled is not None:
                raise KVLayoutError(self._disabled)
            self._cache, self._layer_of = _paged_view(kv_caches, self._vllm_config, self._kv_cache_config)
            # The native reader fills pages whose rows of D elements are contiguous; a layout that stores D
            # with a stride (the CPU backend's K) takes the Python path, which scatters by stride.
            views = [t for i in range(self._cache.num_layers) for t in (self._cache.key_cache(i),
                                                                        self._cache.value_cache(i))]
            self._load_backend = "auto" if all(t.stride(-1) == 1 for t in views) else "python"
            logger.info("kvfast: %s, K strides %s, V strides %s, loader %s", self._cache, views[0].stride(),
                        views[1].stride(), self._load_backend)
        except KVLayoutError as exc:
            self._refuse(str(exc))
        except Exception as exc:  # noqa: BLE001 - see _DECLINE
            logger.exception("kvfast: inspecting vLLM's KV caches failed")
            self._refuse(f"inspecting vLLM's KV caches failed: {exc!r}")

    def _refuse(self, why: str) -> None:
        self._cache = None
        self._refused = self._report.refused = why
        logger.error("kvfast: %s; the connector declines every load and publishes nothing", why)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        """Start this step's loads: all checks run now, the bytes arrive layer by layer in the background."""
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvfastConnectorMetadata)
        for load in meta.loads:
            if self._cache is None:
                self._fail(load, self._refused or "vLLM's KV caches were never registered")
                continue
            t0 = time.perf_counter()
            try:
                with self._cache.loading_into(load.block_ids):
                    handle = load_async(load.path, self._cache, fingerprint=meta.fingerprint,
                                        num_tokens=load.num_tokens, token_ids=load.token_ids, verify=self._verify,
                                        backend=self._load_backend)
            except Exception as exc:  # noqa: BLE001 - see _DECLINE
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
            except Exception as exc:  # noqa: BLE001 - see _DECLINE
                del self._handles[req_id]
                self._fail(load, exc)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata,
                      **kwargs: Any) -> None:
        # Nothing per layer: a prompt is published once its whole prefill is done, and its blocks stay
        # allocated (and unchanged) until wait_for_save returns, so one gather there reads every layer.
        return

    def wait_for_save(self) -> None:
        """Settle this step's loads, then publish the prompts whose prefill completed (atomic store puts)."""
        for load, handle, t0 in self._handles.values():
            try:
                handle.wait()
            except Exception as exc:  # noqa: BLE001 - see _DECLINE
                self._fail(load, exc)
                continue
            self._report.loaded[load.req_id] = load.num_tokens
            logger.info("kvfast: request %s: %d prompt tokens loaded (%s path; load and forward %.1f ms): %s",
                        load.req_id, load.num_tokens, handle.backend, (time.perf_counter() - t0) * 1e3, load.path)
        self._handles.clear()
        meta = self._connector_metadata
        if not isinstance(meta, KvfastConnectorMetadata) or self._cache is None:
            return
        for save in meta.saves:
            self._report.saved[save.req_id] = self._save(save, meta.fingerprint)

    def _save(self, save: SaveSpec, fingerprint: str) -> str:
        t0 = time.perf_counter()
        try:
            seq = self._cache.sequence(save.block_ids, len(save.token_ids))
            keys, values = zip(*(self._cache.gather(seq, layer) for layer in range(self._cache.num_layers)))
            entry = self._store.put((list(keys), list(values)), token_ids=save.token_ids, fingerprint=fingerprint)
        except Exception as exc:  # noqa: BLE001 - see _DECLINE
            logger.warning("kvfast: request %s: publishing its prompt KV failed: %s", save.req_id, exc,
                           exc_info=not isinstance(exc, _DECLINE))
            return f"failed: {exc}"
        logger.info("kvfast: request %s: prompt KV published (%d tokens, %.3f s): %s", save.req_id,
                    len(save.token_ids), time.perf_counter() - t0, entry.path)
        return entry.key.document

    def _fail(self, load: LoadSpec, why: str | Exception) -> None:
        """Report the load failed: its blocks go back to vLLM as invalid, and vLLM recomputes them."""
        logger.warning("kvfast: request %s: load of %s declined (%s); vLLM recomputes its %d tokens", load.req_id,
                       load.path, why, load.num_tokens,
                       exc_info=isinstance(why, Exception) and not isinstance(why, _DECLINE))
        self._report.failed[load.req_id] = str(why)
        self._invalid.update(load.block_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        invalid, self._invalid = self._invalid, set()
        return invalid

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        report = self._report
        if not (report.loaded or report.failed or report.saved or report.refused):
            return None
        self._report = KvfastWorkerMetadata()
        return report


# -- helpers: what the engine is, and what it runs ----------------------------------------------------------------
@dataclass(frozen=True)
class _EngineSpec:
    num_layers: int
    kv: KVSpec


def _unsupported_parallelism(vllm_config: VllmConfig) -> str | None:
    p = vllm_config.parallel_config
    if p.tensor_parallel_size != 1 or p.pipeline_parallel_size != 1:
        return (f"tensor_parallel_size={p.tensor_parallel_size}, pipeline_parallel_size={p.pipeline_parallel_size}: "
                "kvfast documents hold every layer and head, so the connector runs with one worker only")
    return None


def _engine_spec(kv_cache_config: KVCacheConfig | None) -> _EngineSpec | str:
    """The KV shape the engine allocates (one full-attention group), or why the connector cannot serve it."""
    if kv_cache_config is None:
        return "vLLM passed no kv_cache_config"
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        return f"{len(groups)} KV cache groups (hybrid or sliding-window models) are not supported"
    spec = groups[0].kv_cache_spec
    if type(spec) is not FullAttentionSpec or spec.sliding_window:
        return f"KV cache spec {type(spec).__name__} is not plain full attention"
    if getattr(spec, "head_size_v", spec.head_size) != spec.head_size:
        return f"K and V head sizes differ ({spec.head_size} vs {spec.head_size_v})"
    kv = KVSpec(kv_cache_config.num_blocks, spec.block_size, spec.num_kv_heads, spec.head_size, spec.dtype)
    return _EngineSpec(len(groups[0].layer_names), kv)


def _paged_view(kv_caches: dict[str, torch.Tensor], vllm_config: VllmConfig,
                kv_cache_config: KVCacheConfig | None) -> tuple[VllmPagedKV, dict[str, int]]:
    """kvfast's view of vLLM's caches and each vLLM layer name's layer index; KVLayoutError when unknown."""
    spec = _engine_spec(kv_cache_config)
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
    return VllmPagedKV(keys, values), {name: i for i, (name, _) in by_index.items()}


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


def _model_fingerprint(vllm_config: VllmConfig, tc: Any) -> str:
    """The served model's kvfast fingerprint: given in the extra config, or computed from its checkpoint folder."""
    given = tc.get_from_extra_config("model_fingerprint", None)
    if given:
        return str(given)
    folder = Path(vllm_config.model_config.model)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a local checkpoint folder; pass 'model_fingerprint' in "
                         "kv_connector_extra_config (kvfast.fingerprint of the model in its served dtype)")
    return checkpoint_fingerprint(folder, dtype=vllm_config.model_config.dtype)


def _policy_warning(tc: Any) -> str:
    if getattr(tc, "kv_load_failure_policy", "recompute") == "recompute":
        return ""
    return ("; WARNING: kv_load_failure_policy is not 'recompute', so a load that fails in the worker fails its "
            "request instead of falling back to vLLM's prefill")


__all__ = ["KvfastConnector", "KvfastConnectorMetadata", "KvfastWorkerMetadata", "LoadSpec", "SaveSpec"]
