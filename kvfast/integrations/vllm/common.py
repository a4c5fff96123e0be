"""What the connector's scheduler side and worker side exchange each engine step, and the engine facts both read."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata
from vllm.v1.kv_cache_interface import FullAttentionSpec

from kvfast.errors import KvfastError
from kvfast.identity import checkpoint_fingerprint
from kvfast.integrations.vllm.layout import KVSpec

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

# What a refused file or a failed read raises: kvfast's own errors, the file system's, the loader's argument checks.
# The worker's hooks catch anything else too (a bug must cost a recompute, not the engine) but log its traceback.
DECLINE = (KvfastError, OSError, ValueError, KeyError)


@dataclass
class LoadSpec:
    """Fill a request's first vLLM blocks from a stored document.

    Attributes:
        req_id: vLLM's request id.
        document: the store's document key (under the metadata's fingerprint).
        path: the .kvf file (for messages).
        token_ids: the prompt's first ``num_tokens`` ids (the load checks the document holds exactly these).
        block_ids: the request's vLLM blocks covering them (``num_tokens / block_size`` of them).
    """

    req_id: str
    document: str
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
    """One engine step's work for the worker: loads before the forward, saves after it, and the requests vLLM
    preempted in this step (their blocks are freed: a save still reading them must finish that first)."""

    fingerprint: str | None = None
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    preempted: set[str] = field(default_factory=set)


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


@dataclass(frozen=True)
class EngineSpec:
    """The KV cache the engine allocates: its layers and what each holds."""

    num_layers: int
    kv: KVSpec


def unsupported_parallelism(vllm_config: VllmConfig) -> str | None:
    p = vllm_config.parallel_config
    if p.tensor_parallel_size != 1 or p.pipeline_parallel_size != 1:
        return (f"tensor_parallel_size={p.tensor_parallel_size}, pipeline_parallel_size={p.pipeline_parallel_size}: "
                "kvfast documents hold every layer and head, so the connector runs with one worker only")
    return None


def engine_spec(kv_cache_config: KVCacheConfig | None) -> EngineSpec | str:
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
    return EngineSpec(len(groups[0].layer_names), kv)


def model_fingerprint(vllm_config: VllmConfig, tc: Any) -> str:
    """The served model's kvfast fingerprint: given in the extra config, or computed from its checkpoint folder."""
    given = tc.get_from_extra_config("model_fingerprint", None)
    if given:
        return str(given)
    folder = Path(vllm_config.model_config.model)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a local checkpoint folder; pass 'model_fingerprint' in "
                         "kv_connector_extra_config (kvfast.fingerprint of the model in its served dtype)")
    return checkpoint_fingerprint(folder, dtype=vllm_config.model_config.dtype)
