"""MiniMind LoRA fine-tuning (``train_lora.py``): rank-8 LoRA on every square ``nn.Linear``
(q_proj and o_proj under GQA; a gated q_proj is not square and is skipped, as in MiniMind),
the base frozen, CE on the assistant spans + the MoE aux loss.

    latentfast-minimind lora                           # demo: from out/full_sft_64.pth -> out/lora/lora_identity_64.pth
    torchrun --nproc_per_node 2 -m latentfast.train.minimind.lora \\
        --hidden_size 640 --num_hidden_layers 12 --use_moe 1 --headwise_attn_output_gate 1 --use_wandb

The base comes from ``{save_dir}/../{from_weight}_{hidden_size}{_moe}.pth`` (MiniMind saves LoRA
into ``../out/lora`` and loads the base from ``../out``); only the LoRA weights are saved, as
``{save_dir}/{lora_name}_{hidden_size}.pth`` under MiniMind's key names
(``model.layers.0.self_attn.q_proj.lora.A.weight`` / ``...lora.B.weight``). PEFT does the
LoRA (``hf.adapter.add_lora``, alpha = rank: MiniMind's unscaled ``B(A(x))``).
"""
from __future__ import annotations

import pathlib

import torch
from torch import nn

from latentfast import files
from latentfast.hf.adapter import add_lora, unwrap
from latentfast.models.minimind.pth import read_pth

from .args import LoRAArgs
from .common import DEMO, LMLoss, MiniMindTrainer, cli_of, stage_main

DEMO_ROWS = 16


def square_linears(model: nn.Module) -> list[str]:
    """Names of the square ``nn.Linear`` layers (MiniMind's ``apply_lora`` rule)."""
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and m.in_features == m.out_features]


def lora_state_dict(lm) -> dict:
    """The LoRA weights under MiniMind's names: ``{module}.lora.A.weight`` (r x in) and
    ``{module}.lora.B.weight`` (out x r)."""
    out = {}
    for name, mod in unwrap(lm).named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            out[f"{name}.lora.A.weight"] = mod.lora_A["default"].weight.detach().cpu()
            out[f"{name}.lora.B.weight"] = mod.lora_B["default"].weight.detach().cpu()
    return out


def save_lora(lm, path, dtype=torch.float16) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(dtype) for k, v in lora_state_dict(lm).items()}
    files.assert_finite(state.items(), str(path))  # after the cast: fp16 overflow is an error, not a file
    return files.save_with_sidecar(path, lambda tmp: torch.save(state, tmp))


def load_lora(lm, path) -> None:
    """Load MiniMind-named LoRA weights into a PEFT-wrapped ``lm`` (made by this stage's ``add_lora``)."""
    state = read_pth(path)
    mods = dict(unwrap(lm).named_modules())
    for key, v in state.items():
        name, _, part = key.removeprefix("module.").rpartition(".lora.")
        mod = mods.get(name)
        if mod is None or not hasattr(mod, "lora_A"):
            raise KeyError(f"{path}: {key} names no LoRA layer of the model (different --hidden_size / gate?)")
        tgt = (mod.lora_A if part.startswith("A") else mod.lora_B)["default"].weight
        with torch.no_grad():
            tgt.copy_(v.to(tgt.dtype))


def with_lora(base, rank: int):
    for p in base.parameters():
        p.requires_grad_(False)
    return add_lora(base, rank, alpha=rank, target_modules=square_linears(base))


class LoRA(MiniMindTrainer):
    stage = "lora"
    config_class = LoRAArgs
    data_kind = "sft"
    wandb_name = "LoRA"

    @classmethod
    def weight_dir_of(cls, cfg):
        return pathlib.Path(cfg.save_dir).parent

    def load_rows(self):
        rows = super().load_rows()
        # the demo's stand-in for MiniMind's lora_identity.jsonl (a few hundred rows, 50 epochs): 16 rows, revisited
        return rows[:DEMO_ROWS] if self.cfg.data_path == DEMO else rows

    def build_model(self):
        self.lm = with_lora(self.init_lm(self.cfg.from_weight), self.cfg.lora_rank).to(self.device)
        return LMLoss(self.lm)

    def weights_file(self):
        return pathlib.Path(self.cfg.save_dir) / f"{self.cfg.stem}.pth"

    def save_weights(self):
        return save_lora(self.lm, self.weights_file())


main = stage_main(LoRA, __doc__)
cli = cli_of(main)

if __name__ == "__main__":
    cli()
