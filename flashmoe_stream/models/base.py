"""The layer loop every streaming MoE decoder shares, over one or several sequences at once.

An architecture supplies five pieces — ``embed``, ``attend`` (one sequence, its own KV cache),
``ffn`` (all rows of all sequences together, so each routed expert is fetched once per step for the
union of what the sequences route to), ``predict`` (the experts a layer will want, from the hidden
state before it, for prefetch) and ``head`` — plus ``new_kv_cache``. The loop here does the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import BudgetError
from ..quant import NATIVE_ROWS, small_ops_on_one_thread

# on_route(layer, expert ids [T, k], router weights [T, k]) — rows of all sequences, in order
OnRoute = Callable[[int, torch.Tensor, torch.Tensor], None]


class StreamingDecoder:
    cfg = None
    experts = None
    prefetch: bool = True
    prefetch_ahead: int = 1  # layers predicted and prefetched after each attention (1: the next one)
    device: torch.device

    # --- what an architecture supplies ----------------------------------------------------------
    def new_kv_cache(self, n_ctx: int):
        raise NotImplementedError

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """[T] token ids → [T, n_embd] float32 residual stream."""
        raise NotImplementedError

    def attend(self, i: int, x: torch.Tensor, kv, pos: torch.Tensor) -> torch.Tensor:
        """Layer i's attention output for one sequence's new rows x (to be added to the residual)."""
        raise NotImplementedError

    def ffn(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Layer i's FFN output for all rows, with the routed expert ids and weights (None: dense layer)."""
        raise NotImplementedError

    def predict(self, i: int, x: torch.Tensor) -> list[int]:
        """Experts layer i is likely to route x to ([] for a layer without routed experts)."""
        raise NotImplementedError

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and output projection: [T, n_vocab] float32."""
        raise NotImplementedError

    # --- the loop ---------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, kv, on_route: OnRoute | None = None) -> torch.Tensor:
        """Logits [T, n_vocab] (float32) for the new tokens [T], appended to ``kv``."""
        return self.forward_batch([(tokens, kv)], on_route)[0]

    @torch.no_grad()
    def forward_batch(self, segments: Sequence[tuple[torch.Tensor, object]],
                      on_route: OnRoute | None = None) -> list[torch.Tensor]:
        """Several sequences in one step: ``segments`` is [(new tokens [T_s], its KV cache)], each
        sequence attends only to its own cache; the FFN runs once over all rows. Returns logits per
        segment."""
        for tokens, kv in segments:
            if kv.length + tokens.shape[0] > kv.n_ctx:
                raise BudgetError(f"context full: {kv.length} + {tokens.shape[0]} tokens > n_ctx {kv.n_ctx} (raise -c)")
        sizes = [int(t.shape[0]) for t, _ in segments]
        if self.device.type == "cpu" and sum(sizes) <= NATIVE_ROWS:  # the native kernels do the matmuls
            with small_ops_on_one_thread():
                return self._layers(segments, sizes, on_route)
        return self._layers(segments, sizes, on_route)

    def _layers(self, segments, sizes: list[int], on_route: OnRoute | None) -> list[torch.Tensor]:
        pos = [torch.arange(kv.length, kv.length + n, device=self.device) for n, (_, kv) in zip(sizes, segments)]
        x = self.embed(torch.cat([t.reshape(-1) for t, _ in segments]).to(self.device))
        n_layer = self.cfg.n_layer
        for i in range(n_layer):
            parts = x.split(sizes)
            att = [self.attend(i, xs, kv, p) for xs, (_, kv), p in zip(parts, segments, pos)]
            x = x + (att[0] if len(att) == 1 else torch.cat(att))
            if self.prefetch:
                for j in range(i + 1, min(i + 1 + self.prefetch_ahead, n_layer)):
                    ahead = self.predict(j, x)
                    if ahead:
                        self.experts.prefetch(j, ahead)
            y, ids, weights = self.ffn(i, x)
            x = x + y
            if on_route is not None and ids is not None:
                on_route(i, ids, weights)
        for n, (_, kv) in zip(sizes, segments):
            kv.length += n
        return list(self.head(x).split(sizes))
