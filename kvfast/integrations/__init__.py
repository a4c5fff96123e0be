"""Serving-stack integrations: kvfast documents loaded into (and published from) engines' own KV caches.

Each integration lives in its own package and imports its engine only there, so ``import kvfast`` never needs one:

    kvfast.integrations.vllm   the vLLM KV connector (``KvfastConnector``); needs ``pip install kvfast[vllm]``
"""
