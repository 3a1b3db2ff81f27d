"""CODI's adaptive explicit/latent decoding as an engine policy (greedy).

``BatchedSwitch`` is ``latentfast.eval.adaptive.SwitchController`` for a whole batch as
device tensors (same rule, same float64 running mean, so the same decisions; tested
against it), so a step needs no host round trip. ``SwitchPolicy`` feeds, per row, the
predicted token, ``<bot>``, a latent embedding ``prj(h)`` or ``<eot>``, and records
actions, tokens and entropies; ``finish`` returns them for the caller to build its traces.
"""
from __future__ import annotations

import torch

from .policies import _write

MODES = ("adaptive", "explicit", "latent")
NONE, TOKEN, BOT, LATENT, EOT = -1, 0, 1, 2, 3  # action codes (NONE: the row is done)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Next-token entropy in nats (fp32)."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


class BatchedSwitch:
    """Per-row state of the switching rule; ``decide`` is one step for the active rows."""

    def __init__(self, B: int, device, mode: str = "adaptive", max_switch_count: int = 5, window_e_to_l: int = 5,
                 window_l_to_e: int = 0, num_latent: int = 6):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode, self.max_switch_count, self.num_latent = mode, max_switch_count, num_latent
        self.window_e_to_l, self.window_l_to_e = window_e_to_l, max(1, window_l_to_e)
        z = lambda dtype=torch.long: torch.zeros(B, dtype=dtype, device=device)  # noqa: E731
        self.latent, self.answering = z(torch.bool), z(torch.bool)
        self.steps_in_mode, self.switches, self.latent_steps, self.ent_count = z(), z(), z(), z()
        self.ent_sum = z(torch.float64)
        self.latent_reference = torch.full((B,), float("inf"), dtype=torch.float64, device=device)

    def reference(self) -> torch.Tensor:
        return torch.where(self.ent_count > 0, self.ent_sum / self.ent_count.clamp(min=1), float("inf"))

    def decide(self, ent: torch.Tensor, boundary: torch.Tensor, active: torch.Tensor):
        """(action codes B, reference of each switch B) for entropies ``ent`` (B, fp32)."""
        e = ent.double()
        lat = self.latent & active
        exp = ~self.latent & active
        first = lat & (self.steps_in_mode == 0)
        self.latent_reference = torch.where(first, e, self.latent_reference)
        cap = self.steps_in_mode >= self.num_latent
        early = (self.steps_in_mode >= self.window_l_to_e) & (e > self.latent_reference)
        eot = lat & (cap | early if self.mode == "adaptive" else cap)
        stay = lat & ~eot
        ref = self.reference()
        if self.mode == "latent":
            bot = exp & (self.switches == 0)
        elif self.mode == "adaptive":
            bot = (exp & boundary & ~self.answering & (self.switches + 2 <= self.max_switch_count)
                   & (self.steps_in_mode >= self.window_e_to_l) & (e < ref))
        else:
            bot = torch.zeros_like(exp)
        token = exp & ~bot
        switch_ref = torch.where(eot, self.latent_reference, ref)
        switched = bot | eot
        self.latent = torch.where(switched, bot, self.latent)
        self.steps_in_mode = torch.where(switched, 0, self.steps_in_mode + (stay | token).long())
        self.switches += switched.long()
        self.latent_steps += stay.long()
        self.ent_sum = torch.where(token, self.ent_sum + e, self.ent_sum)
        self.ent_count += token.long()
        action = torch.full_like(self.switches, NONE)
        for code, where in ((TOKEN, token), (BOT, bot), (LATENT, stay), (EOT, eot)):
            action = torch.where(where, code, action)
        return action, switch_ref


class SwitchPolicy:
    """Greedy CODI decoding with ``BatchedSwitch`` (``model``: a ``CODIModel``). A row is
    done after ``max_new_tokens`` explicit tokens or at ``eos_token_id``; the answer
    marker (``marker_ids``, written explicitly) locks it in explicit mode."""

    samples = False

    def __init__(self, model, mode: str, max_new_tokens: int, *, eos_token_id: int, pad_token_id: int,
                 bot_token_id: int, eot_token_id: int, marker_ids, line_end_ids, max_switch_count: int = 5,
                 window_e_to_l: int = 5, window_l_to_e: int = 0):
        self.model, self.mode, self.max_new_tokens = model, mode, max_new_tokens
        self.ids = dict(eos=eos_token_id, pad=pad_token_id, bot=bot_token_id, eot=eot_token_id)
        self.marker_ids, self.line_end_ids = list(marker_ids), sorted(line_end_ids)
        self.switch_kw = dict(max_switch_count=max_switch_count, window_e_to_l=window_e_to_l,
                              window_l_to_e=window_l_to_e, num_latent=model.num_latent)

    def budget(self) -> int:
        """Steps that always suffice: every explicit token plus every possible latent block."""
        k = self.switch_kw
        return self.max_new_tokens + k["max_switch_count"] * (k["num_latent"] + 2) + k["num_latent"] + 2

    def setup(self, eng) -> None:
        B, S, dev, V = eng.B, eng.C, eng.device, eng.parts.config.vocab_size
        self.ctrl = BatchedSwitch(B, dev, self.mode, **self.switch_kw)
        self.done = eng.buffer("done", (B,), torch.bool, False)
        self.n_out = eng.buffer("n_out", (B,), torch.long, 0)
        self.last_out = eng.buffer("last_out", (B,), torch.long, -1)
        marker = self.marker_ids or [-2]
        self.recent = eng.buffer("recent", (B, max(1, len(self.marker_ids))), torch.long, -1)
        self.marker = eng.buffer("marker", (len(marker),), torch.long, torch.tensor(marker))
        self.ends_line = eng.buffer("ends_line", (V + 1,), torch.bool, False)  # index V: "no token yet" (a boundary)
        self.ends_line[torch.tensor(self.line_end_ids + [V], dtype=torch.long, device=dev)] = True
        self.actions = eng.buffer("actions", (B, S), torch.int8, NONE)
        self.tokens = eng.buffer("tokens", (B, S), torch.long, 0)
        self.entropies = eng.buffer("entropies", (B, S), torch.float32, 0)
        self.refs = eng.buffer("refs", (B, S), torch.float64, 0)

    def buffers(self):
        return [self.done, self.n_out, self.last_out, self.recent, self.marker, self.ends_line, self.actions,
                self.tokens, self.entropies, self.refs]

    def prompt_embeds(self, eng, input_ids):
        return eng.parts.embedding(input_ids)

    def head(self, eng, h):
        logits = eng.parts.logits(h)
        ent, nxt = entropy(logits), logits.argmax(-1)
        active = ~self.done
        V = self.ends_line.numel() - 1
        boundary = self.ends_line[torch.where(self.last_out < 0, V, self.last_out)]
        act, ref = self.ctrl.decide(ent, boundary, active)
        token = act == TOKEN
        self.n_out += token.long()
        self.last_out = torch.where(token, nxt, self.last_out)
        self.recent.copy_(torch.where(token[:, None], torch.cat([self.recent[:, 1:], nxt[:, None]], 1), self.recent))
        if self.marker_ids:
            self.ctrl.answering |= token & (self.recent == self.marker).all(-1)
        self.done |= token & ((nxt == self.ids["eos"]) | (self.n_out >= self.max_new_tokens))
        ids = self.ids
        feed = torch.full_like(nxt, ids["pad"])
        feed = torch.where(token, nxt, feed)
        feed = torch.where(act == BOT, ids["bot"], feed)
        feed = torch.where(act == EOT, ids["eot"], feed)
        emb = eng.parts.embedding(feed)
        latent = self.model.latent_embed(h)
        e = torch.where((act == LATENT)[:, None], latent.to(emb.dtype), emb)
        _write(self.actions, eng.t, act)
        _write(self.tokens, eng.t, nxt)
        _write(self.entropies, eng.t, ent)
        _write(self.refs, eng.t, ref)
        return e, active

    def all_done(self, eng) -> torch.Tensor:
        return self.done.all()

    def finish(self, eng, steps: int) -> dict:
        """Host copies: per-row action codes, predicted tokens, entropies, switch references
        (steps columns), and the controller's latent-step / switch counts (copies on every
        device: the buffers may be the engine's pooled ones)."""
        c = self.ctrl
        host = lambda t: t.to("cpu", copy=True)  # noqa: E731
        return dict(actions=host(self.actions[:, :steps]), tokens=host(self.tokens[:, :steps]),
                    entropies=host(self.entropies[:, :steps]), refs=host(self.refs[:, :steps]),
                    latent_steps=host(c.latent_steps), switches=host(c.switches))
