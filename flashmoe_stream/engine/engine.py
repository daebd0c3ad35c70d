"""Engine: a model opened for streaming — dense weights resident, experts through the cache.

    eng = Engine.open("model.gguf" or "model.store", device="cuda", vram_cache="8G", ram_cache="16G")
    eng.logits(ids)                       # [T, n_vocab], fresh context
    for piece in eng.generate("What's AI?", max_tokens=64): print(piece, end="")
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import psutil
import torch

from ..config import parse_size
from ..errors import FlashMoeError
from .sampling import Sampler, SamplingParams


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prompt_cached: int = 0  # of prompt_tokens, those whose keys and values were kept from the last call
    prompt_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    routes: list = field(default_factory=list, repr=False)
    tokens: list = field(default_factory=list, repr=False)  # the ids the model ran: prompt, then generated

    @property
    def prompt_tok_s(self) -> float:
        """Prompt tokens actually computed per second (kept ones do not count)."""
        n = self.prompt_tokens - self.prompt_cached
        return n / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0


def resolve_device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FlashMoeError(f"--device {device}: no CUDA device is available here; use --device cpu")
    if dev.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise FlashMoeError(f"--device {device}: no XPU device is available here; use --device cpu")
    if dev.type not in ("cpu", "cuda", "xpu"):
        raise FlashMoeError(f"--device {device}: unsupported (use cpu, cuda or xpu)")
    return dev


def _free_device_bytes(dev: torch.device) -> int:
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0]
    if dev.type == "xpu":
        props = torch.xpu.get_device_properties(dev)
        return int(props.total_memory - torch.xpu.memory_reserved(dev))
    return psutil.virtual_memory().available


class Engine:
    def __init__(self, store, model, tokenizer, cache, device: torch.device, n_ctx: int, metadata=None):
        self.store, self.model, self.tokenizer, self.cache = store, model, tokenizer, cache
        self.metadata = metadata  # the GGUF metadata (chat template, ...)
        self.device, self.n_ctx = device, n_ctx
        self.config = model.cfg
        self.last = GenerationStats()
        # the KV cache of the last generate() and the tokens whose keys and values it holds: a prompt
        # that starts with those tokens (the next turn of a chat) only prefills what is new
        self._kv = None
        self._kv_tokens: list[int] = []

    @classmethod
    def open(cls, path: str | os.PathLike, device: str = "cpu", vram_cache=None, ram_cache=None,
             policy: str = "lfru", prefetch: bool = True, n_ctx: int = 4096, dtype: torch.dtype | None = None,
             threads: int = 8, llama_numerics: bool | None = None, prefetch_ahead: int = 1,
             graphs: bool = True) -> "Engine":
        """Open a GGUF (any shard) or an expert store. Budgets: bytes, "8G"/"512M", or "10%" of the
        model's expert bytes; by default the device tier takes 80 % of free device memory left after
        the dense weights and the host tier half of the available RAM. ``llama_numerics`` rounds the
        activations before each quantised matmul as llama.cpp's CPU kernels do (logits then agree with
        llama.cpp's to float rounding); by default on for the CPU, off on GPUs, where it costs time and
        llama.cpp's own GPU kernels round differently anyway. ``graphs``: when the device tier holds every
        expert of a CUDA model, load them all at open and decode single tokens from a CUDA graph."""
        from ..cache import ExpertCache
        from ..gguf_file import open_gguf
        from ..io import ExpertStore
        from ..models import build_model
        from .tokenizer import Tokenizer

        dev = resolve_device(device)
        if llama_numerics is None:
            llama_numerics = dev.type == "cpu"
        dtype = dtype or (torch.bfloat16 if dev.type != "cpu" else torch.float32)
        store = ExpertStore(path)
        dense = open_gguf(store.dense_path)
        cfg = store.config
        weights = _load_dense(dense, dev, dtype)
        expert_bytes = sum(store.expert_nbytes(layer) * store.n_expert for layer in store.layers)
        ram = parse_size(ram_cache, expert_bytes) if ram_cache is not None else \
            psutil.virtual_memory().available // 2
        if dev.type == "cpu":
            # experts are used from RAM: the "device" tier is the RAM cache, the host tier only stages reads
            vram = ram
            ram = 4 * cfg.n_expert_used * max(store.expert_read_nbytes(layer, 0) for layer in store.layers)
        elif vram_cache is not None:
            vram = parse_size(vram_cache, expert_bytes)
        else:
            vram = int(_free_device_bytes(dev) * 0.8)
        cache = ExpertCache(store, device=dev, device_budget=vram, host_budget=ram, policy=policy,
                            prefetch=prefetch, threads=threads)
        try:
            types = {name: t.qtype for name, t in dense.tensors.items()} if llama_numerics else None
            model = build_model(cfg, weights, cache, prefetch=prefetch, weight_types=types)
            model.prefetch_ahead = max(1, int(prefetch_ahead))
            if graphs and vram >= expert_bytes and hasattr(model, "graphs_supported") and model.graphs_supported():
                _make_resident(model, cache, cfg)
            tok = Tokenizer.from_metadata(dense.metadata)
        except BaseException:
            cache.close()
            raise
        return cls(store, model, tok, cache, dev, n_ctx, dense.metadata)

    # --- tokens ---------------------------------------------------------------------------------

    def tokenize(self, text: str, add_bos: bool | None = None) -> list[int]:
        return self.tokenizer.encode(text, add_bos=add_bos)

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    # --- compute --------------------------------------------------------------------------------

    def logits(self, token_ids: list[int] | torch.Tensor) -> torch.Tensor:
        """Logits [T, n_vocab] for ``token_ids`` in a fresh context (one row per position)."""
        ids = torch.as_tensor(token_ids, dtype=torch.long)
        kv = self.model.new_kv_cache(max(len(ids), 1))
        return self.model.forward(ids, kv).cpu()

    def generate(self, prompt: str | list[int], max_tokens: int = 128, temperature: float = 0.8, top_k: int = 40,
                 top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0, seed: int | None = None,
                 stream: bool = True, record_routes: bool = False, on_route=None) -> Iterator[str] | str:
        """``on_route(layer, ids [T, k], weights [T, k])`` is called for every MoE layer of every forward call."""
        params = SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, seed=seed)
        it = self._generate(prompt, max_tokens, params, record_routes, on_route)
        return it if stream else "".join(it)

    def _generate(self, prompt, max_tokens: int, params: SamplingParams, record_routes: bool,
                  user_on_route=None) -> Iterator[str]:
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise FlashMoeError("empty prompt: give at least one token")
        if len(ids) >= self.n_ctx:
            raise FlashMoeError(f"prompt of {len(ids)} tokens does not fit the context of {self.n_ctx} (raise -c)")
        stats = self.last = GenerationStats(prompt_tokens=len(ids))
        on_route = (lambda layer, r, w: stats.routes.append((layer, r.cpu(), w.cpu()))) if record_routes else None
        if user_on_route is not None:
            on_route = user_on_route if on_route is None else \
                (lambda layer, r, w, a=on_route: (a(layer, r, w), user_on_route(layer, r, w)))
        sample = Sampler(params)
        need = min(self.n_ctx, len(ids) + max_tokens)
        kv, keep = self._kv, 0
        if kv is not None and kv.n_ctx >= need:
            keep = _common_prefix(self._kv_tokens, ids)
            keep = min(keep, len(ids) - 1)  # the last prompt token is run again: its logits start the reply
        else:  # room to grow: a chat's next turns reuse it
            kv = self.model.new_kv_cache(min(self.n_ctx, max(2 * need, 512)))
        self._kv = kv
        kv.length = keep
        fed = self._kv_tokens = ids[:keep]  # kept in step with kv, even if the caller stops iterating
        stats.prompt_cached = keep
        decoder = self.tokenizer.incremental_decoder()
        t0 = time.perf_counter()
        logits = self.model.forward(torch.tensor(ids[keep:]), kv, on_route)[-1]
        fed.extend(ids[keep:])
        stats.prompt_seconds = time.perf_counter() - t0
        history = stats.tokens = list(ids)
        t0 = time.perf_counter()
        for _ in range(min(max_tokens, self.n_ctx - len(ids))):
            tok = sample(logits, history)
            if tok in self.tokenizer.eog_ids:
                break
            history.append(tok)
            stats.decode_tokens += 1
            piece = decoder.push(tok)
            if piece:
                yield piece
            if kv.length >= kv.n_ctx:
                break
            logits = self.model.forward(torch.tensor([tok]), kv, on_route)[-1]
            fed.append(tok)
            stats.decode_seconds = time.perf_counter() - t0
        stats.decode_seconds = time.perf_counter() - t0
        tail = decoder.flush()
        if tail:
            yield tail

    def stats(self) -> dict:
        s = self.cache.stats()
        s["generation"] = {"prompt_tokens": self.last.prompt_tokens, "prompt_cached": self.last.prompt_cached,
                           "prompt_tok_s": self.last.prompt_tok_s,
                           "decode_tokens": self.last.decode_tokens, "decode_tok_s": self.last.decode_tok_s}
        return s

    def close(self) -> None:
        self.cache.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _make_resident(model, cache, cfg) -> None:
    """Load every expert onto the device now, and let the model decode from a CUDA graph over them."""
    from tqdm import tqdm

    experts = {}
    for layer in tqdm(range(cfg.n_layer), desc="experts to the GPU", unit="layer", leave=False,
                      disable=None):
        experts[layer] = cache.get(layer, range(cfg.n_expert))
    cache.release()
    model.use_resident_experts(experts)


_QKV = ("attn_q", "attn_k", "attn_v")


def _qkv_chunk(tensors: dict, name: str) -> int | None:
    """For a layer's q, k or v weight where the three are of one type and width and k's height divides
    theirs: k's height, the rows per planar chunk that let the three run as one GPU launch (QTensor's
    ``chunk``; models/graph.py). None otherwise."""
    part = next((p for p in _QKV if name.endswith(f".{p}.weight")), None)
    if part is None:
        return None
    ts = [tensors.get(name.replace(f".{part}.", f".{p}.")) for p in _QKV]
    if any(t is None or len(t.shape) != 2 for t in ts) or len({(t.qtype, t.shape[1]) for t in ts}) != 1:
        return None
    rows = ts[1].shape[0]
    return rows if all(t.shape[0] % rows == 0 for t in ts) else None


def _load_dense(model, dev: torch.device, dtype: torch.dtype) -> dict:
    """Every non-expert tensor onto the device: on GPUs the matrices in their GGML blocks (QTensor) where
    a fused kernel multiplies them in place, else dequantised once (norms and routers in float32).

    On the CPU the matrices stay in their blocks too where the native kernels take the type, multiplied
    with llama.cpp's activation rounding and integer dot products (the attention projections of the
    qwen3-30b shape: ~70 ms a token in float32, decode +9 % on the 2-core box; DeepSeek-V3's dense part
    would take ~60 GB of RAM in float32). Their summation order differs from float32's in the last bits,
    which on random-weight fixtures flips a router's near-tie here and there (tests/reference.py:
    assert_within_but_at_near_ties)."""
    from ..model_info import expert_tensor_layer
    from ..quant import QTensor, dequantize, fused_supported, native_supported

    out = {}
    for name, t in model.tensors.items():
        if expert_tensor_layer(name) is not None:
            continue
        raw = torch.from_numpy(model.tensor_bytes(name).copy()).to(dev)
        keep_f32 = len(t.shape) == 1 or name.endswith("ffn_gate_inp.weight")
        cpu_ok = dev.type == "cpu" and native_supported(t.qtype)
        if not keep_f32 and len(t.shape) == 2 and (fused_supported(t.qtype, dev) or cpu_ok):
            out[name] = QTensor(raw, t.qtype, t.shape, dtype, chunk=_qkv_chunk(model.tensors, name))
        else:
            out[name] = dequantize(raw, t.qtype, t.shape, torch.float32 if keep_f32 else dtype)
    return out
