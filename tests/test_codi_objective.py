"""CODI's loss left the model: CODIObjective on CODIModel's hidden states equals the loss that
CODIModel.forward computed inside the model (before the move), values and gradients."""
import itertools
import random

import pytest
import torch
import torch.nn.functional as F

from latentfast.data import build_tokenizer
from latentfast.hf import adapter
from latentfast.models import build_tiny_causal_lm
from latentfast.models.codi import CODIModel, encode_example, prepare_tokenizer, split_batch
from latentfast.nn.codi import LOSS_TYPES, CODIObjective
from latentfast.reference.codi_loss import codi_distill_loss

SMALL = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128)


@pytest.fixture(scope="module")
def tok():
    return prepare_tokenizer(build_tokenizer())


def old_forward_loss(m, batch, student_index, distill_loss_factor, ref_loss_factor, loss_type, div_std, ref_stats):
    """The reference: CODIModel.forward's loss as the model computed it before the move (commit
    ea9849d: ``_ce``, ``teacher_forward``, ``answer_prob``, ``forward``), copied here, with the
    distillation term the original CODI's formula (``latentfast.reference.codi_loss``, layers 'all')."""
    head = m.lm.get_output_embeddings()

    def ce(final_hidden, targets):
        sel = targets != -100
        if not sel.any():
            return final_hidden.sum() * 0.0
        return F.cross_entropy(head(final_hidden[sel]).float(), targets[sel])

    ids, mask = batch["teacher_ids"], batch["teacher_mask"]
    out = m.run(m.embed(ids), mask, adapter.positions_from_mask(mask), hidden_states=True)
    ref_ce, t_hidden = ce(out.last_hidden_state, batch["teacher_targets"]), out.hidden_states
    loss = ref_loss_factor * ref_ce
    metrics = {"ref_ce": ref_ce.detach()}
    if ref_stats:
        with torch.no_grad():
            pos = batch["teacher_distill"]
            b = torch.arange(pos.shape[0])
            p = head(t_hidden[-1][b, pos]).float().softmax(-1)
            metrics["ref_answer_prob"] = p[b, batch["teacher_ids"][b, pos + 1]].mean()
    has_student = batch.get("segments") is not None and batch["student_ids"].shape[0] > 0
    if has_student:
        s_hidden = m.student_forward(batch)
        s_ce = ce(s_hidden[-1], batch["student_targets"])
        sel = student_index if student_index is not None else slice(None)
        t_sel = tuple(h[sel] for h in t_hidden)
        distill = codi_distill_loss(s_hidden, t_sel, batch["student_distill"], batch["teacher_distill"][sel],
                                    loss_type=loss_type, div_std=div_std)
        loss = loss + s_ce + distill_loss_factor * distill
        metrics.update(ce=s_ce.detach(), distill=distill.detach())
    if m.prj is not None and (not has_student or not bool(batch["student_latent"].any())):
        loss = loss + 0.0 * sum(p.sum() for p in m.prj.parameters())
    metrics["loss"] = loss.detach()
    return loss, metrics


def grads(m, loss):
    m.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_type,div_std,rows", list(itertools.product(
    LOSS_TYPES, [False, True], ["hybrid", "some_cot", "all_cot", "no_latent"])))
def test_objective_equals_the_old_forward_loss_and_grads(tok, loss_type, div_std, rows):
    torch.manual_seed(0)
    m = CODIModel(build_tiny_causal_lm(tok, **SMALL), tok.bot_token_id, tok.eot_token_id, num_latent=2, prj_dim=32)
    rng = random.Random(len(loss_type) + div_std)
    exs = []
    for i in range(4):
        steps = [f"{i}+{k}={i + k}" for k in range(1 + i % 3)]
        latent = [rows != "no_latent" and (k == 0 or rng.random() < 0.5) for k in range(len(steps))]
        exs.append(encode_example(tok, f"Q{i}", steps, str(i), latent, 2, eos_delimiters=i % 2 == 0))
    cot = {"hybrid": [False] * 4, "some_cot": [True, False, True, False], "all_cot": [True] * 4,
           "no_latent": [False] * 4}[rows]
    batch, idx = split_batch(exs, cot, tok.pad_token_id)
    opts = dict(distill_loss_factor=20.0, ref_loss_factor=0.5)
    obj = CODIObjective(distill_layers="all", distill_loss_type=loss_type, distill_div_std=div_std, ref_stats=True,
                        **opts)
    loss, met = obj(m(batch, idx), batch, m.head)
    ref, ref_met = old_forward_loss(m, batch, idx, loss_type=loss_type, div_std=div_std, ref_stats=True, **opts)
    assert set(met) == set(ref_met)
    assert ("distill" in met) == (rows != "all_cot")
    for k in met:
        torch.testing.assert_close(met[k], ref_met[k], rtol=1e-5, atol=1e-6, msg=k)
    assert met["ref_ce"] > 0 and (rows == "all_cot" or met["ce"] > 0)
    g, g_ref = grads(m, loss), grads(m, ref)
    assert sorted(g) == sorted(g_ref) and any(n.startswith("prj.") for n in g)  # DDP: prj always in the graph
    for n in g:
        torch.testing.assert_close(g[n], g_ref[n], rtol=1e-4, atol=1e-6, msg=n)
    if rows == "no_latent":  # the student is the teacher: no distillation signal, CE = teacher CE
        assert float(met["distill"]) == pytest.approx(0.0, abs=1e-6)


def test_objective_options_reach_the_loss(tok):
    """distill_loss_factor / ref_loss_factor weigh the terms as the formula says."""
    torch.manual_seed(0)
    m = CODIModel(build_tiny_causal_lm(tok, **SMALL), tok.bot_token_id, tok.eot_token_id, num_latent=2, prj_dim=32)
    exs = [encode_example(tok, f"Q{i}", [f"{i}+1={i + 1}", "2*2=4"], "4", [True, False], 2) for i in range(3)]
    batch, idx = split_batch(exs, [False] * 3, tok.pad_token_id)
    out = m(batch, idx)
    a, met = CODIObjective(distill_loss_factor=3.0, ref_loss_factor=0.25)(out, batch, m.head)
    expected = 0.25 * met["ref_ce"] + met["ce"] + 3.0 * met["distill"]
    torch.testing.assert_close(a.detach(), expected)
    assert float(met["distill"]) > 0
    with pytest.raises(ValueError, match="loss_type"):
        CODIObjective(distill_loss_type="mse")
