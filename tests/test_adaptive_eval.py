"""Entropy-based explicit/latent switching: scripted entropies, then a tiny CODI model."""
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
