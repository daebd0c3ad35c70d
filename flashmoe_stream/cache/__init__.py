"""The cache room: routed experts through a host (RAM) tier and a device tier, with eviction policies.

    ExpertCache(store, device, device_budget=, host_budget=, policy="lfru", prefetch=True, reader=None)
        .get(layer, ids) -> list[ExpertWeights]   blocks only on misses; pinned until a get of another layer
        .prefetch(layer, ids)                     background disk -> host -> device, never blocks
        .release() .wait_idle() .stats() .resident() .close()  (and a context manager)
    ExpertWeights / WeightBlock                   raw uint8 tensors on the device + qtype + shape per block
    Policy                                        the protocol: on_access, on_insert, on_evict, victim
    make_policy(name_or_"module:Class", **kw), POLICIES (built-in names)
    prefetch.PrefetchGate                         when to prefetch a layer (its recent prefetches' precision)
"""

from .expert_cache import ExpertCache, ExpertWeights, WeightBlock
from .policy import POLICIES, Policy, make_policy

__all__ = ["POLICIES", "ExpertCache", "ExpertWeights", "Policy", "WeightBlock", "make_policy"]
