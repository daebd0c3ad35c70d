"""One-token decode steps on a CUDA GPU from fused kernels (qwen3moe, llama-with-experts).

Each layer is about a dozen launches (models/_fused.py: residual add + RMSNorm, q/k-norm + RoPE + the
KV-cache write, attention, routing, SiLU * up; the fused GEMV kernels for the matmuls, q, k and v in one
where their planar chunks allow, engine._qkv_chunk). On Hopper and later each launches while the one
before it runs (programmatic dependent launch, quant.pdl_options). Attention reads the position from
the device and loops over the filled part of the cache, so nothing depends on the length filled. Two ways
to run them:

* ``GraphDecode``, when the device tier holds the whole model: nothing needs to be fetched, so the host
  has no reason to see the routing. One token's pass through every layer (the embedding lookup,
  attention, routing, the fused expert kernels, the head) is captured once as a CUDA graph and
  replayed per token, with the token and its position as device inputs; the experts are addressed
  through per-layer offset tables indexed by the router's choice on the device.
* ``StreamDecode``, when experts stream through the cache: the same kernels, with one host round trip a
  layer (the chosen experts' ids, and the next layer's predicted ones, come back in one copy; the cache's
  get() gives their device addresses, which go forth in one copy). After a sequence's first step the
  pieces between round trips replay as CUDA graphs. The torch layer loop costs ~100 launches and two
  host syncs a layer; the disk idles while it runs.
"""

from __future__ import annotations

import logging
import os
import weakref

import numpy as np
import torch

from ..quant import QTensor, fused_gemv_pairs, fused_q8_buffers, fused_quantize_q8
from .common import fused_supported_for, mm, rope_angles

log = logging.getLogger(__name__)

_NAMES = ("gate", "up", "down")
FUSE_QKV = os.environ.get("FLASHMOE_FUSE_QKV", "1") != "0"  # FLASHMOE_FUSE_QKV=0: q, k and v in three launches


def _proj(x: torch.Tensor, w, x8=None) -> torch.Tensor:
    """x [1, K] @ w.T as float32 [N] (a fused kernel where w is a QTensor that one takes; ``x8``: x rounded
    to 8 bits, shared by the weights that multiply the same x)."""
    return (w.matmul(x, torch.float32, x8=x8) if isinstance(w, QTensor) else mm(x, w, None).float()).view(-1)


def supported(model) -> bool:
    """Whether ``model`` can decode one token with the fused kernels here: a CUDA device, no llama.cpp
    activation rounding, a power-of-two head size (the attention kernel's), and every layer's expert
    types taken by the fused kernels (asked of the cache, before any load)."""
    dev, c = model.device, model.cfg
    return dev.type == "cuda" and not model.llama_numerics and c.head_dim & (c.head_dim - 1) == 0 and \
        c.n_head % c.n_head_kv == 0 and all(fused_supported_for(model.experts, i, dev) for i in range(c.n_layer))


class _FusedStep:
    """The buffers of one-token steps of ``model`` (an MoEDecoder) over one KV cache, and a layer's kernels."""

    def __init__(self, model, kv):
        c = model.cfg
        self.model, self.cfg = model, c
        self._kv = weakref.ref(kv)  # a finished sequence's cache is freed with its steps
        dev = self.device = model.device
        k = c.n_expert_used
        self.xrows_gu = torch.zeros(2 * k, dtype=torch.int64, device=dev)
        self.xrows_down = torch.arange(k, dtype=torch.int64, device=dev)
        self.inp = torch.zeros(2, dtype=torch.int64, device=dev)  # the token and its position
        self.tok, self.pos = self.inp[:1], self.inp[1:]
        self.x_in = torch.zeros(1, c.n_embd, dtype=torch.float32, device=dev)
        self.ids = torch.zeros(c.n_layer, k, dtype=torch.int64, device=dev)
        self.weights = torch.zeros(c.n_layer, k, dtype=torch.float32, device=dev)
        cos, sin = rope_angles(torch.arange(kv.n_ctx, device=dev), c.head_dim, c.rope_theta)
        self.cos, self.sin = cos[:, 0].contiguous(), sin[:, 0].contiguous()  # [n_ctx, D/2]: a lookup per step
        self.offs = torch.zeros(c.n_layer, 3 * k, dtype=torch.int64, device=dev)  # the routed experts' offsets
        self.h = torch.zeros(c.n_embd, dtype=model.dtype, device=dev)  # the normed input of the next matmuls
        self.hf = torch.zeros(c.n_embd, dtype=torch.float32, device=dev)  # ... in float32, for the router
        self.q = torch.zeros(c.n_head * c.head_dim, dtype=torch.float32, device=dev)
        self.att = torch.zeros(c.n_head * c.head_dim, dtype=model.dtype, device=dev)
        self.act = None  # SiLU(gate) * up, [k, n_ff] (n_ff known from the first experts)
        # h, att and act rounded to 8 bits by the kernels that write them, for the GEMVs on 8-bit activations
        # (no quantize_q8 launch of their own; None where a width is not a multiple of 32)
        self.x8h = fused_q8_buffers(1, c.n_embd, dev) if c.n_embd % 32 == 0 else None
        self.x8att = fused_q8_buffers(1, c.n_head * c.head_dim, dev) if c.head_dim % 32 == 0 else None
        self.x8act = None
        self.logit = torch.zeros(c.n_expert, dtype=torch.float32, device=dev)  # a layer's router logits
        self._in_host = torch.zeros(2, dtype=torch.int64, pin_memory=True)
        self._in_copied = torch.cuda.Event()  # recorded after each copy of _in_host
        self.qkv = [self._qkv_pairs(model.attn[i]) for i in range(c.n_layer)]

    def _qkv_pairs(self, w) -> tuple[torch.Tensor, torch.Tensor] | None:
        """q's, k's and v's planar chunks as the pairs of one launch (offsets from q's blocks, all on input
        row 0), where the three are QTensors of one type, width and chunk (engine._qkv_chunk); else None."""
        ts = [getattr(w, n, None) for n in ("q", "k", "v")]
        if not FUSE_QKV or not all(isinstance(t, QTensor) and t.planar for t in ts) or \
                len({(t.qtype, t.chunk, t.shape[1]) for t in ts}) != 1:
            return None
        offs = [o for t in ts for o in t.pairs(1, base=ts[0].raw)[0]]
        return (torch.tensor(offs, dtype=torch.int64, device=self.device),
                torch.zeros(len(offs), dtype=torch.int32, device=self.device))

    @property
    def kv(self):
        return self._kv()

    def _set_input(self, token: torch.Tensor, pos: int) -> None:
        """The token and its position into the device inputs (one copy from pinned memory)."""
        self._in_copied.synchronize()  # the last copy has read the pinned buffer (at once if never recorded)
        self._in_host.numpy()[:] = (int(token.reshape(-1)[0]), pos)
        self.inp.copy_(self._in_host, non_blocking=True)
        self._in_copied.record()

    def _embed(self) -> None:
        from . import _fused as K

        m = self.model
        self.x_in.copy_(m.embed(self.tok))
        K.add_norm(self.x_in.view(-1), None, None, m.attn[0].norm, self.cfg.rms_eps, self.h, x8=self.x8h)

    def _attention(self, i: int) -> torch.Tensor:
        """Layer i's attention added to the residual, the FFN's input normed into h (and hf); returns the
        router's logits [n_expert]."""
        from . import _fused as K

        m, c, kv = self.model, self.cfg, self.kv
        w, f = m.attn[i], m.ffn_w[i]
        h1 = self.h.view(1, -1)
        x8 = self.x8h or fused_quantize_q8(h1)  # q, k and v multiply the same input
        if self.qkv[i] is not None:  # one launch
            offs, rows = self.qkv[i]
            y = fused_gemv_pairs(h1, w.q.raw, offs, rows, w.q.qtype, (w.q.chunk, w.q.shape[1]), x8=x8, planar=True,
                                 early=True).view(-1)
            nq, nk = w.q.shape[0], w.k.shape[0]
            q, kk, v = y[:nq], y[nq:nq + nk], y[nq + nk:]
        else:
            q, kk, v = (_proj(h1, t, x8) for t in (w.q, w.k, w.v))
        K.qk_rope(q, kk, v, w.q_norm, w.k_norm, self.cos, self.sin, self.pos, kv.k[i], kv.v[i], self.q, c.rms_eps,
                  c.rope_neox)
        K.attend(self.q, kv.k[i], kv.v[i], self.pos, self.att, x8=self.x8att)
        K.add_norm(self.x_in.view(-1), _proj(self.att.view(1, -1), w.o, self.x8att), None, f.norm, c.rms_eps, self.h,
                   self.hf, x8=self.x8h)
        return K.router_logits(self.hf, f.router, self.logit)

    def _experts(self, i: int, offs: torch.Tensor, base: torch.Tensor, types: dict, aligned: bool) -> None:
        """Layer i's routed experts (pairs: ``offs`` [3k] bytes from ``base``, gate then up then down) weighted
        into the residual, the next layer's input normed into h."""
        from . import _fused as K

        m, c = self.model, self.cfg
        k = c.n_expert_used
        (tg, sg, pg), (tu, su, pu), (td, sd, pd) = (types[n] for n in _NAMES)
        h1 = self.h.view(1, -1)
        x8 = self.x8h
        if tg == tu and pg == pu:
            gu = fused_gemv_pairs(h1, base, offs[:2 * k], self.xrows_gu, tg, sg, aligned, x8=x8, planar=pg)
        else:
            x8 = x8 or fused_quantize_q8(h1)
            gu = torch.cat([fused_gemv_pairs(h1, base, offs[j * k:(j + 1) * k], self.xrows_gu[:k], t, sh, aligned, x8=x8,
                                             planar=pl)
                            for j, (t, sh, pl) in enumerate(((tg, sg, pg), (tu, su, pu)))])
        if self.act is None:
            self.act = torch.zeros(k, sd[1], dtype=m.dtype, device=self.device)
            self.x8act = fused_q8_buffers(k, sd[1], self.device) if sd[1] % 32 == 0 else None
        K.silu_mul(gu, self.act, x8=self.x8act)
        y = fused_gemv_pairs(self.act, base, offs[2 * k:], self.xrows_down, td, sd, aligned, x8=self.x8act,
                             planar=pd)
        nxt = m.attn[i + 1].norm if i + 1 < c.n_layer else m.out_norm
        K.add_norm(self.x_in.view(-1), y, self.weights[i], nxt, c.rms_eps, self.h, x8=self.x8h)

    def _head(self) -> torch.Tensor:
        return _proj(self.h.view(1, -1), self.model.output, self.x8h).view(1, -1)


class GraphDecode(_FusedStep):
    """One-token steps replayed from a CUDA graph. ``experts[layer]`` lists every expert of the layer (the
    cache's ExpertWeights, on the GPU); holding them keeps their memory valid for the graph's lifetime
    whatever the cache does."""

    def __init__(self, model, experts: dict[int, list], kv):
        super().__init__(model, kv)
        c = self.cfg
        self.experts = experts  # referenced: the addresses in the tables stay valid
        first = experts[min(experts)][0].blocks
        self.base = first["gate"].data
        self.types = {n: (b.qtype, b.shape, b.planar) for n, b in first.items()}
        addrs = np.array([[[e.blocks[n].data.data_ptr() for e in experts[i]] for n in _NAMES]
                          for i in range(c.n_layer)], dtype=np.int64)  # [L, 3, n_expert]
        self.aligned = not (addrs % 16).any()
        self.tables = torch.from_numpy(addrs - self.base.data_ptr()).to(self.device)
        self.graph = None
        self.logits = None

    def _step(self) -> torch.Tensor:
        from . import _fused as K

        c = self.cfg
        self._embed()
        for i in range(c.n_layer):
            K.route_topk(self._attention(i), self.tables[i], c.n_expert_used, c.expert_weights_norm, self.ids[i],
                         self.weights[i], self.offs[i])
            self._experts(i, self.offs[i], self.base, self.types, self.aligned)
        return self._head()

    def _capture(self) -> None:
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        saved = (self.kv.k[:, 0].clone(), self.kv.v[:, 0].clone())  # the warm-up writes position 0
        with torch.cuda.stream(s):
            for _ in range(2):  # compile the kernels, settle the allocator
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()
        self.kv.k[:, 0], self.kv.v[:, 0] = saved

    def step(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        """Logits [1, n_vocab] of ``token`` (one id) at position ``pos``; writes its K and V there."""
        if self.graph is None:
            self._set_input(token, 0)
            self._capture()
        self._set_input(token, pos)
        self.graph.replay()
        return self.logits.clone()

    def routes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The last step's expert ids and router weights, [n_layer, k] each: copies on the GPU, made in the
        step's stream, so asking for them does not wait for the step (a host copy waits where it is made)."""
        return self.ids.clone(), self.weights.clone()


class StreamDecode(_FusedStep):
    """One-token steps with the experts from the cache (``model.experts``), one host round trip a layer.

    The first step launches the kernels one by one (they compile); then the pieces between round trips
    (the embedding, each layer's attention and routing, each layer's experts, the head) are captured as
    CUDA graphs, one launch each: the experts' addresses are a device table the host fills per layer.
    A layer whose experts are not all 16-byte aligned runs its expert kernels eagerly (the graphs take
    the aligned kernels). ``piece_graphs = False`` keeps every step eager."""

    piece_graphs = True

    def __init__(self, model, kv):
        super().__init__(model, kv)
        c = self.cfg
        k = c.n_expert_used
        self.base = torch.zeros(16, dtype=torch.uint8, device=self.device)  # offsets are from here
        self.table = torch.zeros(3, c.n_expert, dtype=torch.int64, device=self.device)  # route_topk's (unused)
        self.pred = torch.zeros(k, dtype=torch.int64, device=self.device)
        self.xn = torch.zeros(c.n_embd, dtype=torch.float32, device=self.device)  # normed for the prediction
        self._pw = torch.zeros(k, dtype=torch.float32, device=self.device)  # the prediction's (unused) weights
        self._po = torch.zeros(3 * k, dtype=torch.int64, device=self.device)  # ... and offsets
        self._back = torch.zeros(2 * k, dtype=torch.int64, pin_memory=True)  # ids, then the predicted ids
        self._wback = torch.zeros(k, dtype=torch.float32, pin_memory=True)
        self._offs_host = torch.zeros(c.n_layer, 3 * k, dtype=torch.int64, pin_memory=True)
        self._copied = [torch.cuda.Event() for _ in range(c.n_layer)]  # the last copy of _offs_host[i] read it
        self.types: dict[int, dict] = {}  # per layer: name -> (qtype, shape, planar) of its experts' blocks
        self.graphs: list | None = None  # embedding, (routing, experts) per layer, head; once captured
        self.logits = None
        self._steps = 0
        self._no_graphs = False  # a capture failed here

    # --- the pieces between two round trips -----------------------------------------------------
    def _ahead(self, i: int) -> bool:
        return self.model.prefetch and i + 1 < self.cfg.n_layer

    def _route(self, i: int) -> None:
        """Layer i's attention and routing; where prefetching, the next layer's router applied to this
        layer's attention output (its likely experts) into pred."""
        from . import _fused as K

        m, c = self.model, self.cfg
        k = c.n_expert_used
        K.route_topk(self._attention(i), self.table, k, c.expert_weights_norm, self.ids[i], self.weights[i],
                     self.offs[i])
        if self._ahead(i):
            K.add_norm(self.x_in.view(-1), None, None, m.ffn_w[i + 1].norm, c.rms_eps, self.xn)
            K.route_topk(K.router_logits(self.xn, m.ffn_w[i + 1].router, self.logit), self.table, k, False,
                         self.pred, self._pw, self._po)

    def _pieces(self) -> list:
        L = self.cfg.n_layer
        out = [self._embed]
        for i in range(L):
            out += [lambda i=i: self._route(i),
                    lambda i=i: self._experts(i, self.offs[i], self.base, self.types[i], True)]
        return out + [self._head]

    def _capture(self) -> None:
        if hasattr(self.model.experts, "wait_idle"):
            self.model.experts.wait_idle()  # no copy of the cache's threads runs during the capture
        pool = torch.cuda.graph_pool_handle()  # replayed in the order captured: they may share memory
        graphs = []
        for fn in self._pieces():
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool, capture_error_mode="thread_local"):
                out = fn()
            graphs.append(g)
        self.logits = out
        self.graphs = graphs

    def _run(self, j: int, fn, *args) -> torch.Tensor | None:
        """Piece j: its graph's replay once captured (None), else fn(*args)."""
        if self.graphs is None:
            return fn(*args)
        self.graphs[j].replay()
        return None

    # --- a step ---------------------------------------------------------------------------------
    def step(self, token: torch.Tensor, pos: int, on_route=None) -> torch.Tensor:
        """Logits [1, n_vocab] of ``token`` at position ``pos`` (writes its K and V there); ``on_route`` as
        the layer loop calls it."""
        m, c = self.model, self.cfg
        cache, k, L = m.experts, c.n_expert_used, c.n_layer
        if self.graphs is None and self._steps and self.piece_graphs and not self._no_graphs:
            try:
                self._capture()
            except Exception as e:  # noqa: BLE001 - a torch or driver that cannot capture these: stay eager
                self._no_graphs, self.graphs = True, None
                log.warning("CUDA-graph capture of the streamed decode step failed (%s); launching its kernels "
                            "one by one", str(e).splitlines()[0] if str(e) else type(e).__name__)
        stream = torch.cuda.current_stream(self.device)
        self._set_input(token, pos)
        self._run(0, self._embed)
        for i in range(L):
            self._run(1 + 2 * i, self._route, i)
            ahead = self._ahead(i)
            back = self._back[: 2 * k if ahead else k]
            back[:k].copy_(self.ids[i], non_blocking=True)
            if ahead:
                back[k:].copy_(self.pred, non_blocking=True)
            if on_route is not None:
                self._wback.copy_(self.weights[i], non_blocking=True)
            stream.synchronize()
            ids = back[:k].tolist()
            if ahead:
                cache.prefetch(i + 1, back[k:].tolist())
            got = cache.get(i, ids)
            if on_route is not None:
                on_route(i, back[:k].clone().view(1, k), self._wback.clone().view(1, k))
            addrs = np.array([[e.blocks[n].data.data_ptr() for e in got] for n in _NAMES], dtype=np.int64)
            self._copied[i].synchronize()
            self._offs_host[i].numpy()[:] = (addrs - self.base.data_ptr()).reshape(-1)
            self.offs[i].copy_(self._offs_host[i], non_blocking=True)
            self._copied[i].record()
            if i not in self.types:
                b = got[0].blocks
                self.types[i] = {n: (b[n].qtype, b[n].shape, b[n].planar) for n in _NAMES}
            if (addrs % 16).any():  # the graphs' kernels take aligned blocks only
                self._experts(i, self.offs[i], self.base, self.types[i], False)
            else:
                self._run(2 + 2 * i, self._experts, i, self.offs[i], self.base, self.types[i], True)
        # get(i) pins layer i's experts until a get() of another layer, which follows a sync after their
        # kernels: the cache never evicts what a queued kernel still reads
        logits = self._run(2 * L + 1, self._head)
        self._steps += 1
        return self.logits.clone() if logits is None else logits


__all__ = ["GraphDecode", "StreamDecode", "supported"]
