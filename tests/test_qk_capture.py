"""QKCapture + fused importance == the recipe's output_attentions mean on a real HF model."""
import pytest
import torch

from latentfast.nn import QKCapture
from latentfast.ops import attention_token_importance


@pytest.fixture(scope="module")
def model():
    from transformers import Qwen2ForCausalLM

    from latentfast.models.tiny import tiny_config

    torch.manual_seed(0)
    return Qwen2ForCausalLM(tiny_config(512, attn_implementation="eager")).eval()


def test_matches_output_attentions(model):
    ids = torch.randint(10, 500, (2, 19))
    mask = torch.ones(2, 19, dtype=torch.long)
    mask[1, :6] = 0  # left padding, as batched generation uses
    with QKCapture(model, layers=[0, -1]) as cap:
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    for layer in (0, -1):
        q, k = cap.qk[layer]
        assert q.shape == (2, 4, 19, 32) and k.shape == (2, 2, 19, 32) and not q.requires_grad
        fused = attention_token_importance(q, k, attention_mask=mask)
        eager = attention_token_importance(out.attentions[layer], attention_mask=mask)
        torch.testing.assert_close(fused, eager, atol=1e-6, rtol=1e-4)
    # hooks are gone after the block
    n = len(cap.qk)
    cap.qk.clear()
    model(input_ids=ids)
    assert n == 2 and not cap.qk


def test_bad_layer(model):
    with pytest.raises(ValueError, match="out of range"):
        QKCapture(model, layers=[10])
