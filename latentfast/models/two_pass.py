"""Comparison only: the HRPO recipe's two-pass recomputation of the thinking states.

``HybridThinkingLM`` trains from the hidden states the rollout stored (``recompute="stored"``).
The recipe instead runs an extra no-grad forward over the whole batch, keeps a B x T x D
hidden-state cache and re-reads the states from it; ``recompute="two_pass"`` /
``"two_pass_clean"`` reproduce that for tests (stored == two_pass on an unchanged policy) and
``bench/bench_hrpo_step.py`` (the memory and time it costs). Nothing in training uses it.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def two_pass_states(model, ids, mask, think, stored, clean: bool) -> torch.Tensor:
    """Thinking states (N x D) re-read from a no-grad first pass of ``model`` (a
    ``HybridThinkingLM``). ``two_pass`` mixes the first pass with the rollout's (frozen)
    states, so on an unchanged policy it reproduces the rollout's hidden states;
    ``two_pass_clean`` is the recipe verbatim (unmixed first pass, same-position read),
    which does not."""
    embeds = model.embed(ids)
    if not clean:
        idx = think.nonzero(as_tuple=True)
        e = embeds[idx]
        out, _ = model.thinking.mix_state(e, model.thinking.state(stored.to(e.dtype)))
        embeds = embeds.index_put(idx, out.to(embeds.dtype))
    cache = model.final_hidden(embeds, mask)  # B x T x D: the memory the stored design avoids
    if clean:
        return cache[think]
    return cache[:, :-1][think[:, 1:]]  # token t's state comes from the hidden state at t-1
