"""``latentfast.train.rl``: one RL trainer for any Hugging Face causal LM, on the training loop.

    rl_config.py   RLConfig (TRL ModelConfig + HF Trainer defaults), torch-free like every *_config.py: the
                   command lines parse (--help, argument errors) before their trainer loads
    trainer.py     RLTrainer (hooks rollout / score / advantages / loss), the policy model (LoRA via PEFT)
    policy.py      the policy protocol: rollout (the decode engine), hidden states, head, reference
    thinking.py    the thinking policy: HybridThinkingLM (HRPO, ``train/hrpo.py``) behind that protocol
    advantages.py  every estimator, named for whose it is (trl_group_zscore, minimind_group_batch_zscore,
                   rloo_baseline, gae, SPOTracker)
    objectives.py  GRPOLoss / DPOLoss: the one place a loss type's options are validated
    data.py        TRL dataset formats (prompt-only, preference; standard or conversational), built-in sets
    rewards.py     module:function reward functions (TRL's signature), reward-model folders, 'accuracy'
    grpo.py        GRPO; grpo_config.py: latentfast-grpo (TRL GRPOConfig's flags)
    dpo.py         DPO; dpo_config.py: latentfast-dpo (TRL DPOConfig's flags)
    rloo.py        RLOO; rloo_config.py: latentfast-rloo: a new algorithm in two small files (the example to copy)

MiniMind's dpo / ppo / grpo / spo stages are configurations of ``RLTrainer`` too
(``train/minimind/rl.py``: the MiniMind model as a ``CausalLMPolicy``, MiniMind's flags and files).
"""
