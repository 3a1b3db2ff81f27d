"""``latentfast-hrpo``, ``-codi``, ``-sft``, ``-grpo``, ``-dpo``, ``-rloo``, ``-kv-distill``,
``-minimind``: parse (torch-free), then ``--plan`` or train (see ``latentfast.scripts``)."""
from __future__ import annotations

from latentfast.train.entry import console_entry


def plan_or(cfg):
    """``cfg`` unless it asks for ``--plan``: then the plan of exactly these flags, and exit."""
    if getattr(cfg, "plan", False):
        from latentfast.plan.from_config import plan_and_exit

        plan_and_exit(cfg)
    return cfg


def hrpo_main(argv=None):
    from latentfast.train.hrpo_config import parse_args

    cfg = plan_or(parse_args(argv))
    from latentfast.train.hrpo import run

    return run(cfg)


def codi_main(argv=None):
    from latentfast.train.codi_config import parse_args

    cfg = plan_or(parse_args(argv))
    from latentfast.train.codi import run

    return run(cfg)


def sft_main(argv=None):
    from latentfast.train.sft_config import parse_args

    cfg = plan_or(parse_args(argv))
    from latentfast.train.sft import run

    return run(cfg)


def grpo_main(argv=None):
    from latentfast.train.rl.grpo_config import parse_args

    cfg = plan_or(parse_args(argv))
    from latentfast.train.rl.grpo import run

    return run(cfg)


def dpo_main(argv=None):
    from latentfast.train.rl.dpo_config import parse_args

    cfg = plan_or(parse_args(argv))
    from latentfast.train.rl.dpo import run

    return run(cfg)


def rloo_main(argv=None):
    from latentfast.train.rl.rloo_config import parse_args

    cfg = plan_or(parse_args(argv))
    from latentfast.train.rl.rloo import run

    return run(cfg)


def kv_distill_main(argv=None):
    from latentfast.train.kv_distill.cli import parse_args

    cfg = plan_or(parse_args(argv))
    from latentfast.train.kv_distill.run import run

    return run(cfg)


def minimind_main(argv=None):
    from latentfast.train.minimind import cli

    stage, cfg = cli.parse(argv)
    return cli.run(stage, plan_or(cfg))


hrpo, codi, sft, grpo, dpo, rloo, kv_distill, minimind = (
    console_entry(m) for m in (hrpo_main, codi_main, sft_main, grpo_main, dpo_main, rloo_main, kv_distill_main,
                               minimind_main))
