"""Rewards of the MiniMind RL stages: the reasoning-format rules as MiniMind's calculate_rewards
writes them, a local sequence-classification reward model, and the get_score(tokenizer, chat) form."""
import pytest
import torch
from torch import nn

from latentfast.data.reward_model import RewardModel, format_rewards, minimind_rewards, tag_rewards
from latentfast.models.minimind.tokenizer import load_tokenizer

GOOD = "<think>\nadd them\n</think>\n<answer>\n42\n</answer>"
GOOD2 = "<think>\nadd\n</think>\n\n<answer>\n7\n</answer>"
BAD = "<think>42</think> <answer>42"


def test_format_and_tag_rules():
    assert format_rewards([GOOD, GOOD2, BAD, GOOD + " more", "x" + GOOD]) == [0.5, 0.5, 0.0, 0.0, 0.0]
    assert tag_rewards([GOOD, BAD, "<think><think></think>", ""]) == [1.0, 0.75, 0.25, 0.0]


class _GetScore(nn.Module):
    """An InternLM2-style reward model: get_score(tokenizer, chat) -> float."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.seen = []

    def get_score(self, tokenizer, chat):
        self.seen.append(chat)
        return 10.0 if "42" in chat[-1]["content"] else -1.0 * len(chat[-1]["content"]) / 10


def test_minimind_mix_with_get_score_model():
    rm = RewardModel(_GetScore(), tokenizer=None)
    prompts = [[{"role": "user", "content": "6*7?"}]]
    r = minimind_rewards(prompts, [GOOD, BAD], rm, reasoning=True, num_generations=2)
    # GOOD: format 0.5 + tags 1.0 + 0.4 * clip(10) + 0.6 * clip(10); BAD: tags 0.75 + clip(10) (no <answer> span)
    assert r.tolist() == pytest.approx([1.5 + 3.0, 0.75 + 3.0])
    assert rm.model.seen[0][:-1] == prompts[0] and rm.model.seen[-1][-1]["content"] == "42"  # the answer-only chat
    r0 = minimind_rewards(prompts, [GOOD], rm, reasoning=False)
    assert r0.tolist() == [3.0]
    assert minimind_rewards(prompts, [GOOD], None, reasoning=True).tolist() == [1.5]
    with pytest.raises(ValueError, match="responses"):
        minimind_rewards(prompts, [GOOD], rm, num_generations=2)


def test_sequence_classification_reward_model_from_a_local_dir(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = load_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(cfg).eval()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    rm = RewardModel.load(str(tmp_path), "cpu")
    chats = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": c}] for c in ("yes", "no no no")]
    got = rm.score(chats, batch_size=1)
    with torch.no_grad():
        want = []
        for c in chats:
            ids = tok(tok.apply_chat_template(c, tokenize=False), return_tensors="pt", add_special_tokens=False)
            want.append(float(model(**ids).logits[0, 0]))
    torch.testing.assert_close(got, torch.tensor(want).clamp(-3, 3))
    torch.testing.assert_close(rm.score(chats, batch_size=2), got, rtol=1e-4, atol=1e-5)  # padded batch
    assert not any(p.requires_grad for p in rm.model.parameters())
    with pytest.raises(FileNotFoundError, match="reward_model_path"):
        RewardModel.load(str(tmp_path / "missing"), "cpu")
