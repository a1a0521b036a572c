"""Host-side KV-cache bookkeeping: page pool (free list, ref counts); prefix cache to come."""

from jaxllm.kv_cache.page_pool import SCRATCH_PAGE, NoFreePagesError, PagePool

__all__ = ["SCRATCH_PAGE", "NoFreePagesError", "PagePool"]
