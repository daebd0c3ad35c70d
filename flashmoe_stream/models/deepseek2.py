"""DeepSeek-V2 / V2-Lite / V3 / R1 (llama.cpp's ``deepseek2``): multi-head latent attention and a
routed MoE with shared experts, as llama.cpp computes them.

Attention (MLA). Each token is compressed to a latent ``c`` (kv_lora_rank values, RMS-normed) plus
one RoPE'd key part ``k_pe`` shared by all heads; the KV cache keeps only those two per token. Head
h's key is ``[W_k[h] c, k_pe]`` and its value ``W_v[h] c``; attention is computed in the absorbed
form (as llama.cpp's MLA path): the query's no-RoPE part is mapped into latent space once,
``q_abs = W_k[h]ᵀ q_nope``, so scores are ``q_abs·c + q_pe·k_pe``, and the weighted sum of latents
is mapped out by ``W_v[h]`` at the end. Both layouts of the latent up-projection load: the split
``attn_k_b`` [H, r, nope] / ``attn_v_b`` [H, v, r] of current converters, and the legacy
``attn_kv_b`` [H·(nope+v), r], split here into the same two.

MoE. The first ``leading_dense_block_count`` layers have a plain SwiGLU FFN. The others route: scores
are softmax (V2) or sigmoid (V3) of the router logits; the choice uses the scores plus the
``exp_probs_b`` bias, limited to the best ``expert_group_used_count`` of ``expert_group_count``
groups (a group's score: the sum of its best two); the weights are the unbiased scores of the chosen
experts, optionally normalised, times ``expert_weights_scale``. Routed experts come from the cache
(``common.run_experts``); the shared experts are a resident SwiGLU added to their output.

RoPE is the normal (adjacent pairs) kind on the ``qk_rope`` part only, with YaRN scaling when the file
has it; llama.cpp's attention scale is then ``mscale² / sqrt(q/k head size)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..config import Deepseek2Config
from .base import StreamingDecoder
from .common import ExpertSource, _causal_mask, act_for, lookup, mm, plain, rms_norm, run_experts


class MLAKVCache:
    """Per layer and token: the normed latent [kv_lora_rank] and the RoPE'd shared key [qk_rope]."""

    def __init__(self, n_layer: int, n_ctx: int, kv_lora_rank: int, rope_dim: int, device, dtype):
        self.c = torch.zeros(n_layer, n_ctx, kv_lora_rank, device=device, dtype=dtype)
        self.pe = torch.zeros(n_layer, n_ctx, rope_dim, device=device, dtype=dtype)
        self.n_ctx = n_ctx
        self.length = 0

    def reset(self) -> None:
        self.length = 0


# --- YaRN RoPE, as ggml's rope_yarn and llama.cpp's deepseek2 attention scale ----------------------

@dataclass(frozen=True)
class Yarn:
    freq_scale: float = 1.0  # 1 / scaling factor
    ext_factor: float = 0.0  # 1 with YaRN, else 0
    magnitude: float = 1.0  # what cos and sin are multiplied by
    kq_scale: float = 1.0  # the attention logits' scale
    corr: tuple[float, float] = (0.0, 0.0)  # the dims between which interpolation ramps into extrapolation

    @classmethod
    def of(cls, c: Deepseek2Config) -> Yarn:
        kq = 1.0 / math.sqrt(c.head_dim)
        if c.rope_scaling_factor <= 1.0:
            return cls(magnitude=c.rope_attn_factor, kq_scale=c.rope_attn_factor ** 2 * kq)
        f, L = c.rope_scaling_factor, c.rope_yarn_log_mul

        def get_mscale(m: float) -> float:
            return 0.1 * m * math.log(f) + 1.0

        # llama_context: get_mscale(f, mscale) / get_mscale(f, mscale_all_dim), and for deepseek2 mscale is
        # mscale_all_dim (V2's 0.707) or 1 when that is 1: the ratio is 1 whenever the file has a log multiplier
        attn_factor = (1.0 if L != 0 else get_mscale(1.0)) * c.rope_attn_factor
        # ggml's rope multiplies the (pre-divided) attn_factor back by 1 + 0.1 ln f: attn_factor is the magnitude
        mscale = attn_factor * (1.0 + 0.1 * L * math.log(f))
        n_dims, base = c.qk_rope_dim, c.rope_theta

        def corr_dim(n_rot: float) -> float:
            return n_dims * math.log(c.rope_orig_ctx / (n_rot * 2 * math.pi)) / (2 * math.log(base))

        lo = max(0.0, math.floor(corr_dim(c.yarn_beta_fast)))
        hi = min(n_dims - 1.0, math.ceil(corr_dim(c.yarn_beta_slow)))
        return cls(1.0 / f, 1.0, attn_factor, mscale * mscale * kq, (lo, hi))


def rope_yarn(x: torch.Tensor, pos: torch.Tensor, theta: float, y: Yarn) -> torch.Tensor:
    """Normal RoPE (pairs 2i, 2i+1) of x [T, H, D] at positions pos [T], YaRN-scaled as ggml does."""
    D = x.shape[-1]
    i0 = torch.arange(0, D, 2, dtype=torch.float64, device=x.device)
    extrap = pos.to(torch.float64)[:, None] * theta ** (-i0 / D)[None, :]
    ang = extrap
    if y.freq_scale != 1.0 or y.ext_factor:
        interp = y.freq_scale * extrap
        ramp = 1 - ((i0 / 2 - y.corr[0]) / max(0.001, y.corr[1] - y.corr[0])).clamp(0, 1)
        mix = ramp * y.ext_factor
        ang = interp * (1 - mix) + extrap * mix
    cos = (ang.cos() * y.magnitude).float()[:, None, :]
    sin = (ang.sin() * y.magnitude).float()[:, None, :]
    xf = x.float()
    a, b = xf[..., 0::2], xf[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


# --- weights -------------------------------------------------------------------------------------

@dataclass
class MLAWeights:
    norm: torch.Tensor
    q: torch.Tensor | None  # direct query (q_lora_rank 0) ...
    q_a: torch.Tensor | None  # ... or the low-rank pair with its norm
    q_a_norm: torch.Tensor | None
    q_b: torch.Tensor | None
    kv_a: torch.Tensor  # [r + rope, n_embd]
    kv_a_norm: torch.Tensor
    k_b: torch.Tensor  # [H, r, nope]
    v_b: torch.Tensor  # [H, v, r]
    o: torch.Tensor
    acts: dict  # activation rounding before each matmul (llama.cpp numerics), by weight


@dataclass
class SwiGLU:
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    acts: tuple = (None, None, None)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        a = F.silu(mm(h, self.gate, self.acts[0])) * mm(h, self.up, self.acts[1])
        return mm(a.to(self.down.dtype), self.down, self.acts[2]).float()


@dataclass
class RouterWeights:
    norm: torch.Tensor
    router: torch.Tensor  # [n_expert, n_embd] float32
    bias: torch.Tensor | None  # exp_probs_b: added for the choice only


class Deepseek2Decoder(StreamingDecoder):
    def __init__(self, cfg: Deepseek2Config, weights: Mapping[str, torch.Tensor], experts: ExpertSource,
                 prefetch: bool = True, weight_types: Mapping[str, Any] | None = None):
        self.cfg, self.experts, self.prefetch = cfg, experts, prefetch
        self.llama_numerics = weight_types is not None
        act = (lambda name: act_for(weight_types[name])) if weight_types is not None else (lambda name: None)
        W, get = weights.__getitem__, weights.get
        self.embd = W("token_embd.weight")
        self.out_norm = W("output_norm.weight")
        self.output = get("output.weight", self.embd)
        self.output_act = act("output.weight" if "output.weight" in weights else "token_embd.weight")
        self.device = self.embd.device
        self.dtype = W("blk.0.attn_kv_a_mqa.weight").dtype
        self.yarn = Yarn.of(cfg)
        H, nope, v, r = cfg.n_head, cfg.qk_nope_dim, cfg.v_head_dim, cfg.kv_lora_rank
        self.attn, self.dense_ffn, self.router, self.shared = [], {}, {}, {}
        for i in range(cfg.n_layer):
            b = f"blk.{i}."
            lat_act = None
            if b + "attn_k_b.weight" in weights:
                k_b, v_b = plain(W(b + "attn_k_b.weight")), plain(W(b + "attn_v_b.weight"))
                k_act, v_act = act(b + "attn_k_b.weight"), act(b + "attn_v_b.weight")
            else:  # legacy: [H·(nope+v), r] → per head [nope+v, r]
                kv_b = plain(W(b + "attn_kv_b.weight")).view(H, nope + v, r)
                k_b, v_b = kv_b[:, :nope].transpose(1, 2).contiguous(), kv_b[:, nope:].contiguous()
                # llama.cpp decompresses there (attn_kv_b @ latent): the latent is what gets rounded
                k_act = v_act = None
                lat_act = act(b + "attn_kv_b.weight")
            names = ("attn_q", "attn_q_a", "attn_q_b", "attn_kv_a_mqa", "attn_output")
            acts = {n: act(b + n + ".weight") if b + n + ".weight" in weights else None for n in names}
            acts.update(k_b=k_act, v_b=v_act, latent=lat_act)
            self.attn.append(MLAWeights(
                W(b + "attn_norm.weight"), get(b + "attn_q.weight"), get(b + "attn_q_a.weight"),
                get(b + "attn_q_a_norm.weight"), get(b + "attn_q_b.weight"), W(b + "attn_kv_a_mqa.weight"),
                W(b + "attn_kv_a_norm.weight"), k_b, v_b, W(b + "attn_output.weight"), acts))
            norm = W(b + "ffn_norm.weight")
            if i < cfg.n_layer_dense_lead:
                self.dense_ffn[i] = (norm, self._swiglu(weights, b, "", act))
            else:
                self.router[i] = RouterWeights(norm, W(b + "ffn_gate_inp.weight"), get(b + "exp_probs_b.bias"))
                if b + "ffn_gate_shexp.weight" in weights:
                    self.shared[i] = self._swiglu(weights, b, "_shexp", act)

    @staticmethod
    def _swiglu(weights, b: str, suffix: str, act) -> SwiGLU:
        names = [f"{b}ffn_{p}{suffix}.weight" for p in ("gate", "up", "down")]
        return SwiGLU(*(weights[n] for n in names), tuple(act(n) for n in names))

    def new_kv_cache(self, n_ctx: int) -> MLAKVCache:
        c = self.cfg
        return MLAKVCache(c.n_layer, n_ctx, c.kv_lora_rank, c.qk_rope_dim, self.device, self.dtype)

    # --- the pieces StreamingDecoder's layer loop calls ------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return lookup(self.embd, tokens).float()

    def attend(self, i: int, x: torch.Tensor, kv: MLAKVCache, pos: torch.Tensor) -> torch.Tensor:
        c, w, a = self.cfg, self.attn[i], self.attn[i].acts
        T, H, nope, r = x.shape[0], c.n_head, c.qk_nope_dim, c.kv_lora_rank
        eps, dt = c.rms_eps, self.dtype
        h = rms_norm(x, w.norm, eps).to(dt)
        if w.q is not None:
            q = mm(h, w.q, a["attn_q"])
        else:
            q = mm(rms_norm(mm(h, w.q_a, a["attn_q_a"]), w.q_a_norm, eps).to(dt), w.q_b, a["attn_q_b"])
        q = q.view(T, H, c.head_dim)
        q_nope, q_pe = q[..., :nope], q[..., nope:]
        ckv = mm(h, w.kv_a, a["attn_kv_a_mqa"]).float()
        latent = rms_norm(ckv[:, :r], w.kv_a_norm, eps)
        if a["latent"] is not None:
            latent = a["latent"](latent)
        q_pe = rope_yarn(q_pe, pos, c.rope_theta, self.yarn)
        k_pe = rope_yarn(ckv[:, None, r:], pos, c.rope_theta, self.yarn)[:, 0]
        # the no-RoPE query in latent space, per head: [T, H, nope] x [H, r, nope] → [T, H, r]
        qn = q_nope if a["k_b"] is None else a["k_b"](q_nope)
        q_abs = torch.einsum("thd,hrd->thr", qn.to(w.k_b.dtype), w.k_b).float()
        start = kv.length
        kv.c[i, start: start + T] = latent.to(kv.c.dtype)
        kv.pe[i, start: start + T] = k_pe.to(kv.pe.dtype)
        lat, pe = kv.c[i, : start + T].float(), kv.pe[i, : start + T].float()
        if self.llama_numerics:  # llama.cpp keeps the cache in fp16 and rounds Q (and the softmax) to fp16
            r16 = lambda t: t.half().float()
            q_abs, q_pe, lat, pe = r16(q_abs), r16(q_pe), r16(lat), r16(pe)
        att = torch.einsum("thr,sr->hts", q_abs, lat) + torch.einsum("thp,sp->hts", q_pe, pe)
        mask = _causal_mask(T, start, x.device)
        att = (att * self.yarn.kq_scale).masked_fill(~mask, float("-inf")).softmax(-1)
        if self.llama_numerics:
            att = att.half().float()
        o_lat = torch.einsum("hts,sr->thr", att, lat)  # [T, H, r]
        if a["v_b"] is not None:
            o_lat = a["v_b"](o_lat)
        o = torch.einsum("thr,hvr->thv", o_lat.to(w.v_b.dtype), w.v_b)
        return mm(o.reshape(T, -1).to(dt), w.o, a["attn_output"]).float()

    def route(self, i: int, h: torch.Tensor, ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, k], expert ids [T, k]) for the normed rows h of MoE layer i (the weights of ``ids``
        instead of the top-k's where given)."""
        c = self.cfg
        probs, sel = self.scores(i, h)
        if ids is None:
            ids = sel.topk(c.n_expert_used, dim=-1).indices
        weights = probs.gather(1, ids)
        if c.expert_weights_norm:
            weights = weights / weights.sum(-1, keepdim=True).clamp(min=6.103515625e-5)
        if c.expert_weights_scale != 1.0:
            weights = weights * c.expert_weights_scale
        return weights, ids

    def selection(self, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The router's probabilities [T, n_expert] for the normed rows h of MoE layer i, and the selection
        scores (the bias added), before any group is left out."""
        c, rw = self.cfg, self.router[i]
        logits = h.float() @ rw.router.float().T
        probs = logits.sigmoid() if c.expert_gating == "sigmoid" else logits.softmax(-1)
        return probs, (probs if rw.bias is None else probs + rw.bias.float())

    def scores(self, i: int, h: torch.Tensor, groups: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """selection()'s probabilities, and the scores the top-k is taken over: the experts of groups not
        chosen at -inf (``groups`` [T, used] instead of the best groups where given)."""
        c = self.cfg
        probs, sel = self.selection(i, h)
        if c.n_expert_groups > 1:
            T, G = sel.shape[0], c.n_expert_groups
            if groups is None:
                groups = self.group_scores(sel).topk(c.n_group_used, dim=-1).indices  # [T, used groups]
            keep = torch.zeros(T, G, dtype=torch.bool, device=sel.device).scatter_(1, groups, True)
            sel = sel.view(T, G, -1).masked_fill(~keep[..., None], float("-inf")).view(T, -1)
        return probs, sel

    def group_scores(self, sel: torch.Tensor) -> torch.Tensor:
        """Each expert group's score [T, n_groups]: the sum of its two best selection scores."""
        return sel.view(sel.shape[0], self.cfg.n_expert_groups, -1).topk(2, dim=-1).values.sum(-1)

    def ffn(self, i: int, x: torch.Tensor):
        c = self.cfg
        if i in self.dense_ffn:
            norm, mlp = self.dense_ffn[i]
            return mlp(rms_norm(x, norm, c.rms_eps).to(self.dtype)), None, None
        h = rms_norm(x, self.router[i].norm, c.rms_eps)
        weights, ids = self.route(i, h)
        hd = h.to(self.dtype)
        out = run_experts(hd, weights, ids, i, self.experts, self.dtype, self.llama_numerics)
        if i in self.shared:
            out = out + self.shared[i](hd)
        return out, ids, weights

    def predict(self, i: int, x: torch.Tensor) -> list[int]:
        if i not in self.router:
            return []
        _, ids = self.route(i, rms_norm(x, self.router[i].norm, self.cfg.rms_eps))
        return torch.unique(ids).tolist()

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return mm(rms_norm(x, self.out_norm, self.cfg.rms_eps).to(self.dtype), self.output, self.output_act).float()
