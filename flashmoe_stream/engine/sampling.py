"""Token sampling in llama.cpp's order: repeat penalty → top-k → top-p → min-p → temperature → draw."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8  # <= 0: greedy
    top_k: int = 40  # <= 0: off
    top_p: float = 0.95  # >= 1: off
    min_p: float = 0.05  # <= 0: off
    repeat_penalty: float = 1.0  # 1: off
    repeat_last_n: int = 64
    seed: int | None = None


class Sampler:
    def __init__(self, params: SamplingParams):
        self.p = params
        self.gen = torch.Generator()
        self.gen.manual_seed(params.seed if params.seed is not None else torch.seed())

    def __call__(self, logits: torch.Tensor, history: list[int]) -> int:
        p = self.p
        logits = logits.float().cpu().clone()
        if p.repeat_penalty != 1.0 and history:
            recent = torch.tensor(sorted(set(history[-p.repeat_last_n:])), dtype=torch.long)
            vals = logits[recent]
            logits[recent] = torch.where(vals > 0, vals / p.repeat_penalty, vals * p.repeat_penalty)
        if p.temperature <= 0:
            return int(logits.argmax())
        if 0 < p.top_k < logits.numel():
            kth = logits.topk(p.top_k).values[-1]
            logits[logits < kth] = float("-inf")
        probs = logits.softmax(-1)
        if p.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < p.top_p  # always keeps the most likely token
            drop = order[~keep]
            logits[drop] = float("-inf")
            probs = logits.softmax(-1)
        if p.min_p > 0:
            logits[probs < p.min_p * probs.max()] = float("-inf")
        probs = (logits / p.temperature).softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self.gen))
