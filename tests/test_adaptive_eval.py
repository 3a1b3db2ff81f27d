"""Entropy-based explicit/latent switching: scripted entropies, then a tiny CODI model."""
import math

import pytest
import torch

from latentfast.eval.adaptive import (BOT, EOT, LATENT, TOKEN, SwitchController, evaluate, format_trace,
                                      generate_adaptive, results_table)


def run(ctrl, entropies):
    return [ctrl.decide(h) for h in entropies]


def test_explicit_never_switches():
    c = SwitchController("explicit")
    assert run(c, [5.0, 0.0, 0.0, 9.0, 0.0, 0.0, 0.0]) == [TOKEN] * 7
    assert c.switches == 0 and c.latent_steps == 0


def test_latent_mode_is_codi_inference():
    c = SwitchController("latent", num_latent=3)
    acts = run(c, [1.0] * 8)
    assert acts == [BOT, LATENT, LATENT, LATENT, EOT, TOKEN, TOKEN, TOKEN]
    # no early exit in latent mode, whatever the entropy
    c = SwitchController("latent", num_latent=2)
    assert run(c, [0.1, 9.0, 9.0, 9.0, 0.0, 0.0]) == [BOT, LATENT, LATENT, EOT, TOKEN, TOKEN]


def test_latent_blocks_open_only_at_step_boundaries():
    c = SwitchController("adaptive", window_e_to_l=1)
    assert c.decide(2.0) == TOKEN
    assert c.decide(0.1, boundary=False) == TOKEN  # mid-step: keep writing
    assert c.decide(0.1, boundary=True) == BOT


def test_adaptive_window_and_low_entropy_switch():
    c = SwitchController("adaptive", window_e_to_l=3, window_l_to_e=0, num_latent=6)
    # three explicit tokens (mean 2.0) before any switch is allowed, even at low entropy
    acts = run(c, [2.0, 0.1, 3.9])
    assert acts == [TOKEN] * 3
    assert c.reference == pytest.approx(2.0)
    assert c.decide(2.5) == TOKEN          # above the running mean: stay explicit
    assert c.decide(0.5) == BOT            # below it: compress
    assert c.events[-1][1] == "E->L"
    assert c.decide(4.0) == LATENT         # the first latent step is always fed (window 0 -> 1); its
    assert c.latent_reference == 4.0       # entropy is the block's reference
    assert c.decide(0.1) == LATENT         # more confident: keep going
    assert c.decide(4.5) == EOT            # less confident than at the start: back to explicit
    assert c.events[-1][1:] == ("L->E", 4.5, 4.0)
    assert c.latent_steps == 2 and c.switches == 2


def test_adaptive_window_l_to_e_and_cap():
    c = SwitchController("adaptive", window_e_to_l=1, window_l_to_e=3, num_latent=4)
    assert run(c, [1.0, 0.1]) == [TOKEN, BOT]
    assert run(c, [1.0, 9.0, 9.0]) == [LATENT, LATENT, LATENT]   # window: 3 latent steps first
    assert c.decide(9.0) == EOT
    c = SwitchController("adaptive", window_e_to_l=1, num_latent=2)
    assert run(c, [1.0, 0.1, 0.0, 0.0, 0.0]) == [TOKEN, BOT, LATENT, LATENT, EOT]  # capped at num_latent


def test_max_switch_count_and_answer_lock():
    c = SwitchController("adaptive", max_switch_count=3, window_e_to_l=1, num_latent=1)
    acts = run(c, [1.0, 0.1, 0.1, 0.1, 1.0, 0.1, 0.1, 0.1])
    # one latent block (2 switches); a second would need 4 > 3 switches
    assert acts.count(BOT) == 1 and acts.count(EOT) == 1
    assert c.switches == 2
    c = SwitchController("adaptive", window_e_to_l=1)
    c.decide(1.0)
    c.answering = True  # '####' written: finish explicitly
    assert run(c, [0.0, 0.0, 0.0]) == [TOKEN] * 3


def test_bad_mode():
    with pytest.raises(ValueError, match="mode must be one of"):
        SwitchController("sometimes")


@pytest.fixture(scope="module")
def codi_model():
    from latentfast.data import build_tokenizer
    from latentfast.models import build_tiny_causal_lm
    from latentfast.models.codi import CODIModel, prepare_tokenizer

    tok = prepare_tokenizer(build_tokenizer())
    lm = build_tiny_causal_lm(tok, hidden_size=64, num_hidden_layers=2, intermediate_size=128)
    return tok, CODIModel(lm, tok.bot_token_id, tok.eot_token_id, num_latent=3, prj_dim=32).eval()


def test_generate_modes(codi_model):
    tok, m = codi_model
    qs = ["Tom has 3 apples. How many apples does Tom have?", "Ann has 5 pens. Then they get 2 more pens."]
    lat = generate_adaptive(m, tok, qs, "latent", max_new_tokens=6)
    assert all(g.latent_steps == 3 and g.switches == 2 and g.trace[0] == ("L", 3) for g in lat)
    exp = generate_adaptive(m, tok, qs, "explicit", max_new_tokens=6)
    assert all(g.latent_steps == 0 and g.switches == 0 and 1 <= g.tokens <= 6 for g in exp)
    ada = generate_adaptive(m, tok, qs, "adaptive", max_new_tokens=10, window_e_to_l=1)
    for g in ada:
        assert g.switches <= 5 and g.latent_steps <= 3 * (g.switches + 1) // 2
        assert "->" in format_trace(g) or g.switches == 0


def test_latent_mode_matches_a_manual_codi_rollout(codi_model):
    """Batched decoding (left padding, per-row modes) == one sequence fed by hand."""
    from latentfast.data import format_prompt
    from latentfast.models.codi import new_cache

    tok, m = codi_model
    qs = ["Sam has 2 cards.", "Mia has 4 coins. Then they double their coins. How many coins does Mia have?"]
    gens = generate_adaptive(m, tok, qs, "latent", max_new_tokens=5)
    for q, g in zip(qs, gens):
        ids = tok(format_prompt(q), return_tensors="pt").input_ids
        cache, T = new_cache(m.config), ids.shape[1]
        with torch.no_grad():
            o = m.run(m.embed(ids), torch.ones(1, T, dtype=torch.long), torch.arange(T)[None], cache=cache)
            seq = [m.embed(torch.tensor([tok.bot_token_id]))]
            h = o.last_hidden_state[:, -1]
            out = []
            for step in range(3 + 1 + 5 + 1):
                e = seq[-1]
                o = m.run(e[:, None], torch.ones(1, T + 1, dtype=torch.long), torch.tensor([[T]]), cache=cache)
                T += 1
                h = o.last_hidden_state[:, -1]
                if step < 3:
                    seq.append(m.latent_embed(h))
                elif step == 3:
                    seq.append(m.embed(torch.tensor([tok.eot_token_id])))
                else:
                    nxt = int(m.logits(h).argmax(-1))
                    out.append(nxt)
                    seq.append(m.embed(torch.tensor([nxt])))
                    if nxt == tok.eos_token_id or len(out) == 5:
                        break
        assert g.text == tok.decode(out, skip_special_tokens=True)


def test_evaluate_and_verbose(codi_model, capsys):
    tok, m = codi_model
    rows = [{"question": "Tom has 3 apples.", "answer": "#### 3"}, {"question": "Ann has 1 pen.", "answer": "#### 1"}]
    recs = []
    r = evaluate(m, tok, rows, "adaptive", max_new_tokens=6, window_e_to_l=1, verbose=True, records=recs)
    assert r["n"] == 2 and 0 <= r["accuracy"] <= 1 and len(recs) == 2
    assert "[adaptive] #0" in capsys.readouterr().out
    assert "| adaptive |" in results_table([r])


@pytest.mark.parametrize("mode,kw", [("adaptive", dict(window_e_to_l=1)),
                                     ("adaptive", dict(window_e_to_l=3, window_l_to_e=2, max_switch_count=4,
                                                       num_latent=3)),
                                     ("latent", dict(num_latent=2)), ("explicit", {})])
def test_batched_switch_is_switch_controller_row_by_row(mode, kw):
    """The engine's device-tensor rule makes the same decisions, counts and switch
    references as one SwitchController per row (rows going idle, answer lock)."""
    from latentfast.generation.switching import BOT as B_, EOT as E_, LATENT as L_, NONE, TOKEN as T_, BatchedSwitch

    codes = {TOKEN: T_, BOT: B_, LATENT: L_, EOT: E_}
    g = torch.Generator().manual_seed(0)
    B, S = 48, 40
    ents = torch.rand(B, S, generator=g) * 3
    bnd = torch.rand(B, S, generator=g) < 0.5
    stop = torch.randint(S // 2, S + 1, (B,), generator=g)
    lock = torch.randint(0, S, (B,), generator=g)
    ctrls = [SwitchController(mode, **kw) for _ in range(B)]
    batch = BatchedSwitch(B, "cpu", mode, **kw)
    for s in range(S):
        active = s < stop
        for b in range(B):
            if s == int(lock[b]):
                ctrls[b].answering = True
        batch.answering |= lock == s
        acts, refs = batch.decide(ents[:, s], bnd[:, s], active)
        for b in range(B):
            if not active[b]:
                assert int(acts[b]) == NONE
                continue
            want = codes[ctrls[b].decide(float(ents[b, s]), bool(bnd[b, s]))]
            assert int(acts[b]) == want, (b, s)
            if want in (B_, E_):
                ref = ctrls[b].events[-1][3]
                assert (ref is None and not math.isfinite(float(refs[b]))) or ref == round(float(refs[b]), 4)
    assert batch.switches.tolist() == [c.switches for c in ctrls]
    assert batch.latent_steps.tolist() == [c.latent_steps for c in ctrls]
    if mode == "adaptive":
        assert sum(c.switches for c in ctrls) > B  # the rule did switch, both ways


def test_adaptive_batch_matches_one_sequence_at_a_time(codi_model, monkeypatch):
    """Left-padded batch on the engine == each question decoded alone by the plain loop
    with a SwitchController (frequent step boundaries, so latent blocks open and close)."""
    from latentfast.data import format_prompt
    from latentfast.eval import adaptive
    from latentfast.models.codi import new_cache

    tok, m = codi_model
    ends = frozenset(range(0, len(tok), 3))
    monkeypatch.setattr(adaptive, "_line_end_ids", lambda _tok: ends)
    qs = ["Sam has 2 cards.", "Mia has 4 coins. Then they double their coins. How many coins does Mia have?",
          "Tom has 3 apples. How many apples does Tom have?"]
    kw = dict(max_new_tokens=12, window_e_to_l=1, max_switch_count=6)
    gens = generate_adaptive(m, tok, qs, "adaptive", **kw)
    marker = list(tok.answer_marker_ids)
    for q, g in zip(qs, gens):
        ids = tok(format_prompt(q), return_tensors="pt").input_ids
        cache, T = new_cache(m.config), ids.shape[1]
        ctrl = SwitchController("adaptive", 6, 1, 0, m.num_latent)
        out, trace = [], []
        with torch.no_grad():
            h = m.run(m.embed(ids), torch.ones(1, T, dtype=torch.long), torch.arange(T)[None],
                      cache=cache).last_hidden_state[:, -1]
            for _ in range(200):
                logits = m.logits(h).float()
                logp = logits.log_softmax(-1)
                ent = float(-(logp.exp() * logp).sum(-1))
                nxt = int(logits.argmax(-1))
                act = ctrl.decide(ent, boundary=not out or out[-1] in ends)
                if act == TOKEN:
                    out.append(nxt)
                    e = m.embed(torch.tensor([nxt]))
                    trace.append(("E", nxt))
                    ctrl.answering |= out[-len(marker):] == marker
                    if nxt == tok.eos_token_id or len(out) >= 12:
                        break
                elif act == LATENT:
                    e = m.latent_embed(h)
                else:
                    e = m.embed(torch.tensor([tok.bot_token_id if act == BOT else tok.eot_token_id]))
                o = m.run(e[:, None], torch.ones(1, T + 1, dtype=torch.long), torch.tensor([[T]]), cache=cache)
                T += 1
                h = o.last_hidden_state[:, -1]
        assert g.text == tok.decode(out, skip_special_tokens=True)
        assert (g.latent_steps, g.switches, g.events) == (ctrl.latent_steps, ctrl.switches, ctrl.events)
    assert sum(g.switches for g in gens) >= 2 and any(g.latent_steps for g in gens)
