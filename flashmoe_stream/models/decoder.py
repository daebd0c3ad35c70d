"""The MoE decoder of qwen3moe and llama-with-experts (Mixtral): they differ only in per-head q/k
RMSNorm (qwen3moe) and the RoPE pairing (NEOX for qwen3moe), both read from the config.

Dense weights arrive as tensors keyed by their GGUF names; routed experts come from an
ExpertSource (the cache) one layer at a time, and the next layer's experts are predicted from the
current hidden state and prefetched while this layer's experts compute.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import torch

from ..config import ModelConfig
from .base import StreamingDecoder
from .common import (AttentionWeights, ExpertSource, KVCache, MoEWeights, act_for, attention, lookup, mm, moe,
                     predict_next, rms_norm, rope_angles)


class MoEDecoder(StreamingDecoder):
    def __init__(self, cfg: ModelConfig, weights: Mapping[str, torch.Tensor], experts: ExpertSource,
                 prefetch: bool = True, weight_types: Mapping[str, Any] | None = None):
        """``weight_types`` (GGUF name → ggml type of the dense weights): when given, activations are
        rounded as llama.cpp's CPU kernels round them (see common.act_for), so logits match llama.cpp's."""
        self.cfg, self.experts, self.prefetch = cfg, experts, prefetch
        self.resident = None  # every expert on the GPU: single tokens decode from a CUDA graph
        self.fused_steps = True  # else single tokens on a GPU run the torch layer loop (a reference)
        self._fused_ok = None
        self._rope = None  # (pos, its RoPE angles): the last step's, for its other layers
        self._streams = weakref.WeakKeyDictionary()  # KV cache -> its StreamDecode
        self.llama_numerics = weight_types is not None
        act = (lambda name: act_for(weight_types[name])) if weight_types is not None else (lambda name: None)
        W = weights.__getitem__
        self.embd = W("token_embd.weight")
        self.out_norm = W("output_norm.weight")
        self.output = weights.get("output.weight", self.embd)  # tied embeddings where there is no output
        self.output_act = act("output.weight" if "output.weight" in weights else "token_embd.weight")
        self.dtype, self.device = self.attn_dtype(weights), self.embd.device
        self.attn, self.ffn_w = [], []
        for i in range(cfg.n_layer):
            b = f"blk.{i}."
            self.attn.append(AttentionWeights(
                W(b + "attn_norm.weight"), W(b + "attn_q.weight"), W(b + "attn_k.weight"), W(b + "attn_v.weight"),
                W(b + "attn_output.weight"), weights.get(b + "attn_q_norm.weight"), weights.get(b + "attn_k_norm.weight"),
                tuple(act(b + f"attn_{p}.weight") for p in ("q", "k", "v", "output")), self.llama_numerics))
            self.ffn_w.append(MoEWeights(W(b + "ffn_norm.weight"), W(b + "ffn_gate_inp.weight")))

    # --- decode from a CUDA graph when every expert stays on the GPU (models/graph.py) -------------
    def graphs_supported(self) -> bool:
        """Whether single tokens can decode from a CUDA graph here (ask before loading every expert)."""
        from .graph import supported

        return supported(self)

    def use_resident_experts(self, experts: dict[int, list]) -> None:
        """Decode single tokens from a CUDA graph over ``experts`` (every expert of every layer, on the
        GPU, where graphs_supported())."""
        if len(experts) != self.cfg.n_layer or not self.graphs_supported():
            raise ValueError("CUDA-graph decode needs every layer's experts on a supported GPU")
        self.resident, self._graph = experts, None

    @torch.no_grad()
    def forward_batch(self, segments, on_route=None):
        if len(segments) != 1 or segments[0][0].numel() != 1 or segments[0][1].length >= segments[0][1].n_ctx:
            return super().forward_batch(segments, on_route)  # (a full context: its error)
        if self.resident is None:
            return self._stream_step(segments[0], on_route)
        from .graph import GraphDecode

        tokens, kv = segments[0]
        if self._graph is None or self._graph.kv is not kv:
            self._graph = None  # one graph at a time: the last KV cache's
            self._graph = GraphDecode(self, self.resident, kv)
        logits = self._graph.step(tokens.reshape(1), kv.length)
        kv.length += 1
        if hasattr(self.experts, "count_hits"):  # one token's top-k: k distinct experts a layer, all resident
            for i in range(self.cfg.n_layer):
                self.experts.count_hits(i, self.cfg.n_expert_used)
        if on_route is not None:  # device tensors: the host waits for them only where it reads them
            ids, weights = self._graph.routes()
            for i in range(self.cfg.n_layer):
                on_route(i, ids[i: i + 1], weights[i: i + 1])
        return [logits]

    def _stream_step(self, segment, on_route):
        """One token of one sequence with the fused kernels, its experts from the cache (models/graph.py),
        where they run here (``fused_steps``), else the layer loop."""
        from .graph import StreamDecode, supported

        tokens, kv = segment
        if self._fused_ok is None:
            self._fused_ok = supported(self)
        if not (self.fused_steps and self._fused_ok):
            return super().forward_batch([segment], on_route)
        st = self._streams.get(kv)
        if st is None:  # each sequence (a server's slots) keeps its own while its KV cache lives
            st = self._streams[kv] = StreamDecode(self, kv)
        logits = st.step(tokens, kv.length, on_route)
        kv.length += 1
        return [logits]

    @staticmethod
    def attn_dtype(weights: Mapping[str, torch.Tensor]) -> torch.dtype:
        return weights["blk.0.attn_q.weight"].dtype

    def new_kv_cache(self, n_ctx: int) -> KVCache:
        c = self.cfg
        return KVCache(c.n_layer, n_ctx, c.n_head_kv, c.head_dim, self.device, self.dtype)

    # --- the pieces StreamingDecoder's layer loop calls ------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return lookup(self.embd, tokens).float()  # the residual stream is float32

    def attend(self, i: int, x: torch.Tensor, kv: KVCache, pos: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        if self._rope is None or self._rope[0] is not pos:  # the layers of a step share pos: its angles once
            self._rope = (pos, rope_angles(pos, c.head_dim, c.rope_theta))
        return attention(x, self.attn[i], i, kv, pos, c.n_head, c.n_head_kv, c.head_dim, c.rms_eps, c.rope_theta,
                         c.rope_neox, self._rope[1])

    def ffn(self, i: int, x: torch.Tensor):
        c = self.cfg
        return moe(x, self.ffn_w[i], i, self.experts, c.n_expert_used, c.expert_weights_norm, c.rms_eps, self.dtype,
                   self.llama_numerics)

    def predict(self, i: int, x: torch.Tensor) -> list[int]:
        return predict_next(x, self.ffn_w[i], self.cfg.n_expert_used, self.cfg.rms_eps)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return mm(rms_norm(x, self.out_norm, self.cfg.rms_eps).to(self.dtype), self.output, self.output_act).float()
