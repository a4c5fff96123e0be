"""The connector's scheduler side: which prompt tokens kvfast supplies (store lookup and the one fit check, before
vLLM plans around them), which prompts to publish, each step's metadata for the worker, and every request's outcome
(returned as its ``kv_transfer_params``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vllm.logger import init_logger

from kvfast.errors import KvfastError
from kvfast.identity import document_key
from kvfast.integrations.vllm.common import (
    DECLINE,
    KvfastConnectorMetadata,
    KvfastWorkerMetadata,
    LoadSpec,
    SaveSpec,
    engine_spec,
    model_fingerprint,
)
from kvfast.loader.compat import check_file
from kvfast.store import Store, StoreEntry, StoreKey

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = init_logger("vllm.kvfast.integrations.vllm")


@dataclass
class _Plan:
    """A match found by ``get_num_new_matched_tokens``, waiting for vLLM to allocate its blocks."""

    entry: StoreEntry
    token_ids: list[int]  # the prompt's first tokens the load covers (whole vLLM blocks)


@dataclass
class _Tracked:
    """A producer's view of a request being prefilled."""

    token_ids: list[int]
    block_ids: list[int]
    saved: bool = False


class KvfastScheduler:
    """The scheduler-process half of :class:`~kvfast.integrations.vllm.KvfastConnector`."""

    def __init__(self, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig | None, tc: Any, store: Store,
                 disabled: str | None):
        self._store, self._tc = store, tc
        self._consumer, self._producer = tc.is_kv_consumer, tc.is_kv_producer
        self._block_size = vllm_config.cache_config.block_size
        self._fingerprint: str | None = None
        self._spec = engine_spec(kv_cache_config)
        self._plans: dict[str, _Plan] = {}  # req id -> match, until blocks are allocated
        self._pending: dict[str, _Plan] = {}  # req id -> load to schedule in this step's metadata
        self._tracked: dict[str, _Tracked] = {}  # producer: requests being prefilled
        self._outcome: dict[str, dict[str, Any]] = {}  # req id -> kv_transfer_params at finish
        self._saving: set[str] = set()  # req ids whose save the worker got: vLLM holds their blocks at finish
        # Why the connector declines everything (None: it works); set at start or by the worker's report.
        self._disabled = disabled
        if self._disabled is None and isinstance(self._spec, str):
            self._disabled = self._spec
        if self._disabled is None:
            try:
                self._fingerprint = model_fingerprint(vllm_config, tc)
            except (KvfastError, OSError, ValueError) as exc:
                self._disabled = f"cannot fingerprint the served model: {exc}"
        if self._disabled is not None:
            logger.error("kvfast: connector disabled (%s); vLLM prefills every prompt itself", self._disabled)
        else:
            logger.info("kvfast: store %s, model %s, role %s%s", store.root, self._fingerprint, tc.kv_role,
                        _policy_warning(tc))

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        """How many prompt tokens after vLLM's own ``num_computed_tokens`` kvfast supplies (loaded synchronously).

        The longest stored prefix of the prompt under this model's fingerprint, cut to whole vLLM blocks and
        to at most ``len(prompt) - 1`` tokens (the last one must be computed to give logits). Its file's header
        passes the loader's own check here (shape, dtype, fingerprint, token ids), so a wrong or unreadable
        artifact is declined before vLLM plans around it.
        """
        self._plans.pop(request.request_id, None)
        if not self._consumer or self._disabled is not None or request.prompt_token_ids is None:
            return 0, False
        ids = list(request.prompt_token_ids)
        try:
            match = self._store.match(self._fingerprint, ids)
        except DECLINE as exc:  # an unreadable store must not stop the engine
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
        why = self._check_artifact(match.entry, ids[:n])
        if why is not None:
            self._decline(request.request_id, why)
            return 0, False
        self._plans[request.request_id] = _Plan(match.entry, ids[:n])
        return n, False

    def _check_artifact(self, entry: StoreEntry, ids: list[int]) -> str | None:
        """Why the stored file cannot serve these tokens to this engine, or None when it can."""
        kv = self._spec.kv
        try:
            self._store.check_trusted(entry)
            # header, manifest and token ids, checked before any plan; the parsed file is kept for the next request
            check_file(self._store.reader(entry), (self._spec.num_layers, kv.num_kv_heads, kv.head_dim), kv.dtype,
                       fingerprint=self._fingerprint, num_tokens=len(ids), token_ids=ids)
        except DECLINE as exc:
            return str(exc)
        return None

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        plan = self._plans.pop(request.request_id, None)
        if num_external_tokens > 0 and plan is not None:
            self._pending[request.request_id] = plan

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KvfastConnectorMetadata:
        """This step's loads (requests whose blocks were just allocated) and saves (prompts completed now)."""
        meta = KvfastConnectorMetadata(fingerprint=self._fingerprint,
                                       preempted=set(scheduler_output.preempted_req_ids or ()) & self._saving)
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
        meta.loads.append(LoadSpec(req_id, plan.entry.key.document, str(plan.entry.path), plan.token_ids,
                                   blocks[: n // self._block_size]))
        self._outcome[req_id] = {"kvfast_document": plan.entry.key.document, "kvfast_planned_tokens": n}

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
        self._saving.add(req_id)
        # The save runs in the background and may end after its request (max_tokens=1 ends in this very step):
        # the outcome names the document it publishes; a failure, when reported in time, replaces it.
        self._outcome.setdefault(req_id, {})["kvfast_published"] = key.document

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
        # A request may have finished already (request_finished ran in this step's output, e.g. a failed load
        # under kv_load_failure_policy="fail"): its outcome is gone, and must not be created again.
        for req_id, n in report.loaded.items():
            if req_id in self._outcome:
                self._outcome[req_id]["kvfast_supplied_tokens"] = n
        for req_id, why in report.failed.items():
            if req_id in self._outcome:
                self._decline(req_id, f"load failed: {why}")
        for req_id, what in report.saved.items():
            if req_id in self._outcome or req_id in self._tracked:
                self._outcome.setdefault(req_id, {})["kvfast_published"] = what

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Forget the request; its outcome goes back in ``RequestOutput.kv_transfer_params``. Its blocks are freed
        now, or, when its prompt is being published, once the worker reports the save over (``get_finished``)."""
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
        saving = req_id in self._saving
        self._saving.discard(req_id)
        return saving, outcome

    def outcomes_held(self) -> int:
        """Requests whose outcome or save is still held (tests: none may outlive its request)."""
        return len(self._outcome) + len(self._saving)


def _policy_warning(tc: Any) -> str:
    if getattr(tc, "kv_load_failure_policy", "recompute") == "recompute":
        return ""
    return ("; WARNING: kv_load_failure_policy is not 'recompute', so a load that fails in the worker fails its "
            "request instead of falling back to vLLM's prefill")
