"""Held-out accuracy (greedy and sampled at T=0.7) of gemma-3-270m and of a latentfast-grpo LoRA checkpoint
(r16/alpha32, PEFT's default targets) on the same synthetic one-step arithmetic prompts.

    python bench/eval_rl_gemma_checkpoint.py runs/grpo/checkpoint-25 48
"""
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import LoraConfig, get_peft_model
from latentfast.data import make_arithmetic
from latentfast.data.rewards import gold_answer
from latentfast.train.rl.data import FEW_SHOT
from latentfast.train.rl.policy import CausalLMPolicy, Sampling
from latentfast.train.rl.rewards import accuracy

d = "/root/.cache/latentfast/gemma-3-270m"
ckpt = sys.argv[1]
n = int(sys.argv[2])
tok = AutoTokenizer.from_pretrained(d)
lm = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
lm = get_peft_model(lm, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM"))
rows = make_arithmetic(n, seed=12345, min_steps=1, max_steps=1)
prompts = [f"{FEW_SHOT}Question: {r['question']}\nAnswer:" for r in rows]
gold = [gold_answer(r["answer"]) for r in rows]
enc = tok(prompts)["input_ids"]
P = max(map(len, enc))
ids = torch.tensor([[0] * (P - len(x)) + x for x in enc])
mask = torch.tensor([[0] * (P - len(x)) + [1] * len(x) for x in enc])
pol = CausalLMPolicy(lm, tok, reference=None)

def acc(tag):
    out = {}
    for name, s in (("greedy", Sampling(14, do_sample=False)), ("sampled_t0.7", Sampling(14, temperature=0.7))):
        g = torch.Generator().manual_seed(0)
        res = []
        for i in range(0, n, 16):
            ro = pol.rollout(ids[i:i + 16], mask[i:i + 16], s, generator=g)
            res += accuracy(None, tok.batch_decode(ro.completion_ids, skip_special_tokens=True), gold[i:i + 16])
        out[name] = sum(res) / len(res)
    print(tag, out, flush=True)
    return out

base = acc("base")
sd = load_file(f"{ckpt}/model.safetensors")
sd = {k[len("lm."):] if k.startswith("lm.") else k: v for k, v in sd.items()}
missing, unexpected = lm.load_state_dict(sd, strict=False)
assert not unexpected, unexpected[:3]
assert len(sd) > 0 and all("lora" in k for k in sd), list(sd)[:3]
trained = acc("trained")
print("RESULT " + json.dumps(dict(n=n, checkpoint=ckpt, base=base, trained=trained, lora_tensors=len(sd))))
