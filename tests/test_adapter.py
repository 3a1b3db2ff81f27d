"""The Hugging Face adapter (latentfast.hf.adapter) and the one capture mechanism."""
import pytest
import torch

from latentfast.data import build_tokenizer
from latentfast.hf import adapter
from latentfast.hf.capture import AttentionCapture, KVCapture, QKCapture
from latentfast.models import build_tiny_causal_lm

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64)


@pytest.fixture(scope="module")
def lm():
    return build_tiny_causal_lm(build_tokenizer(), seed=0, **SMALL).eval()


def _left_padded():
    ids = torch.randint(10, 500, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


def test_positions_count_real_tokens_only():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 0, 1, 1]])
    assert adapter.positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 1, 2, 3]]


def test_inputs_embeds_forward_equals_the_ids_forward(lm):
    ids, mask = _left_padded()
    pos = adapter.positions_from_mask(mask)
    ref = lm.model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
    emb = lm.get_input_embeddings()(ids)
    out = adapter.run_decoder(lm, emb, mask, output_hidden_states=True)
    torch.testing.assert_close(out.last_hidden_state, ref)
    assert len(out.hidden_states) == SMALL["num_hidden_layers"] + 1
    # with a cache: prefix then one more token == the whole sequence at once
    cache = adapter.new_cache(lm.config)
    adapter.run_decoder(lm, emb[:, :-1], mask[:, :-1], pos[:, :-1], cache=cache)
    last = adapter.run_decoder(lm, emb[:, -1:], mask, pos[:, -1:], cache=cache).last_hidden_state
    torch.testing.assert_close(last[:, 0], ref[:, -1], atol=1e-5, rtol=1e-4)
    assert adapter.cache_kwarg(adapter.decoder(lm)) in ("cache", "past_key_values")


def test_lora_unwrap_and_lm_head(lm):
    import copy

    peft = adapter.add_lora(copy.deepcopy(lm), rank=4)
    hf = adapter.unwrap(peft)
    assert hf is not peft and type(hf) is type(lm) and adapter.unwrap(lm) is lm
    assert adapter.lm_head_weight(peft) is hf.get_output_embeddings().weight
    assert adapter.lm_head_bias(peft) is None
    assert len(adapter.decoder_layers(peft)) == SMALL["num_hidden_layers"]
    assert any("lora_A" in n for n, p in peft.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="rank"):
        adapter.add_lora(lm, rank=0)


def test_keep_in_graph_gives_every_parameter_a_zero_grad():
    used, unused = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
    loss = used(torch.ones(2, 3)).sum()
    loss2 = adapter.keep_in_graph(loss, unused.parameters())
    assert loss2.item() == loss.item()
    loss2.backward()
    assert all(p.grad is not None and not p.grad.any() for p in unused.parameters())


def test_one_capture_mechanism_for_kv_qk_and_inputs(lm):
    ids, mask = _left_padded()
    cache = adapter.new_cache(lm.config)
    with AttentionCapture(lm, layers=[0], query_layers=[-1], inputs=True) as cap:
        lm.model(input_ids=ids, attention_mask=mask, use_cache=True, **{adapter.cache_kwarg(lm.model): cache})
    torch.testing.assert_close(cap.kv(0)[0], cache.layers[0].keys)
    torch.testing.assert_close(cap.kv(-1)[1], cache.layers[1].values)  # query layers get k/v too
    q, k = cap.qk(1)
    assert q.shape[1] == SMALL["num_attention_heads"] and q.requires_grad  # the graph is kept (KV loss)
    assert cap.inputs(1).shape == (2, 7, SMALL["hidden_size"])
    with pytest.raises(KeyError):
        cap.qk(0)
    # the KV distiller's and diagnose's views agree with it
    with KVCapture(lm, [1], [1]) as kv_cap, QKCapture(lm, [-1]) as qk_cap:
        lm.model(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(kv_cap.qk(1)[0], q)
    torch.testing.assert_close(qk_cap.qk[-1][0], q)
    assert not qk_cap.qk[-1][0].requires_grad  # QKCapture: detached
    assert not qk_cap._handles and kv_cap._handles  # QKCapture: hooks only inside the block
    kv_cap.remove()
