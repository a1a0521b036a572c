"""Host-side KV-cache bookkeeping: page pool (free lists, ref counts) and prefix cache (hashes)."""

from jaxllm.kv_cache.page_pool import SCRATCH_PAGE, NoFreePagesError, PagePool
from jaxllm.kv_cache.prefix_cache import PrefixCache

__all__ = ["SCRATCH_PAGE", "NoFreePagesError", "PagePool", "PrefixCache"]
