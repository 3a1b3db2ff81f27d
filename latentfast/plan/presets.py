"""The trainers' settings as planner workloads: the seed notes' / recipes' defaults (for the
README tables) and the map from a trainer's parsed config to a workload (``--plan``)."""
from __future__ import annotations

from .steps import Workload

# (label, workload) at the seed notes' settings: the trainer's own step (``plan.trainers``) in the
# latentfast columns, ``plan.steps``' sketch of the peers' step in the recipe ones. HRPO: hrpo_gsm8k.py's
# defaults (seed notes 000/001; per-device 8 completions = 2 prompts x 4, accumulation 4, LoRA r32, 1024 + 1024 tokens
# in the recipe; 512 + 512 is the example). CODI: seed note 003 (Llama-3.2-1B-Instruct,
# batch 4, 6 latents, prj 2048, bf16). KV: seed note 004 (Qwen2-1.5B-class student).
# MiniMind: seed note 002 (640 x 12 MoE, gated attention), MiniMind's per-stage batch and length.
SEED_SETTINGS = [
    ("HRPO Qwen2.5-1.5B-Instruct LoRA r32, 8 x (512+512), accum 4",
     Workload("Qwen2.5-1.5B-Instruct", "hrpo", micro_batch=8, grad_accum=4, prompt_len=512, completion_len=512,
              lora_rank=32, beta=0.005)),
    ("same + gradient checkpointing",
     Workload("Qwen2.5-1.5B-Instruct", "hrpo", micro_batch=8, grad_accum=4, prompt_len=512, completion_len=512,
              lora_rank=32, beta=0.005, grad_ckpt=True)),
    ("GRPO Qwen2.5-0.5B-Instruct full, 8 x (256+256), beta 0.04",
     Workload("Qwen2.5-0.5B-Instruct", "grpo", micro_batch=8, grad_accum=1, prompt_len=256, completion_len=256,
              beta=0.04)),
    ("CODI Llama-3.2-1B-Instruct LoRA r128, 4 x 256, 6 latents",
     Workload("Llama-3.2-1B-Instruct", "codi", micro_batch=4, completion_len=256, lora_rank=128)),
    ("KV distill Qwen2.5-0.5B <- Qwen2.5-1.5B, 8 x 512",
     Workload("Qwen2.5-0.5B", "kv", micro_batch=8, completion_len=512, teachers=["Qwen2.5-1.5B"])),
    ("KV distill multi-teacher 0.5B <- {1.5B, 1.5B}, 8 x 512",
     Workload("Qwen2.5-0.5B", "kv", micro_batch=8, completion_len=512, teachers=["Qwen2.5-1.5B", "Qwen2.5-1.5B"])),
    ("MiniMind pretrain 640x12 MoE, 32 x 340",
     Workload("minimind-640x12-moe", "sft", micro_batch=32, completion_len=340, trainer="pretrain")),
    ("MiniMind DPO 640x12 MoE, 4 pairs x 1024",
     Workload("minimind-640x12-moe", "dpo", micro_batch=8, completion_len=1024, trainer="minimind_dpo")),
    ("MiniMind GRPO 640x12 MoE, 2 x 8 gen (66+1536), RM",
     Workload("minimind-640x12-moe", "grpo", micro_batch=16, prompt_len=66, completion_len=1536, beta=0.02,
              reward_model=True, trainer="minimind_grpo")),
]
