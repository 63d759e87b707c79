"""A Hugging Face `transformers` causal LM trained elastically, then exported for `from_pretrained`.

A tiny GPT-2 (random init, no download) learns synthetic token sequences with AdamW, a cosine
schedule with warm-up, gradient clipping and bf16 autocast (CPU or GPU). Its config is kept in
the elastic state next to the weights, so the checkpoint exports as a folder that
`AutoModelForCausalLM.from_pretrained` reads:

    pip install transformers
    python examples/hf_causal_lm.py --uri file:///tmp/hf-lm --steps 60 --export /tmp/hf-lm-model
    elastictrain ckpt export file:///tmp/hf-lm /tmp/hf-lm-model --model model --hf-config hf_config --force

`--check` also trains the same steps in one plain PyTorch process (no elastictrain) and prints
how far the elastic run's final weights are from it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

import elastictrain as et


def model_config(args: argparse.Namespace) -> Any:
    """A tiny GPT-2 config (tied input and output embeddings, as GPT-2 has)."""
    from transformers import GPT2Config

    return GPT2Config(
        n_layer=args.layers, n_embd=args.hidden, n_head=args.heads, vocab_size=args.vocab, n_positions=args.seq,
        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )


def make_model(config: Any) -> torch.nn.Module:
    """The same random initial weights on every worker and every run."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


class Sequences(torch.utils.data.Dataset):
    """Sample i: an arithmetic sequence of tokens modulo the vocabulary (start and stride drawn from i)."""

    def __init__(self, n: int, seq: int, vocab: int) -> None:
        g = torch.Generator().manual_seed(1)
        start = torch.randint(0, vocab, (n, 1), generator=g)
        stride = torch.randint(1, 8, (n, 1), generator=g)
        self.tokens = (start + stride * torch.arange(seq + 1)) % vocab

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int):
        return self.tokens[i, :-1], self.tokens[i, 1:]


def loss_sum(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross entropy (the accumulator divides by the global token count)."""
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")


def optimizer_and_schedule(model: torch.nn.Module, args: argparse.Namespace):
    from transformers import get_cosine_schedule_with_warmup

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    return opt, get_cosine_schedule_with_warmup(opt, args.warmup, args.decay_steps or args.steps)


def make_train_fn(args: argparse.Namespace, at_step: Optional[Callable[[et.Context, int], None]] = None):
    """The training loop; `at_step(ctx, step)`, if given, runs at the top of every step (tests place faults there)."""
    autocast = torch.bfloat16 if args.bf16 else None

    def train_fn(ctx: et.Context) -> None:
        torch.set_num_threads(1)  # several workers share the machine's cores
        config = model_config(args)
        dataset = Sequences(args.samples, args.seq, args.vocab)
        model = ctx.prepare_model(make_model(config))
        opt, schedule = optimizer_and_schedule(model, args)
        # hf_config: a plain entry, so `ckpt export --model model --hf-config hf_config` writes config.json
        ctx.state(model=model, optimizer=opt, scheduler=schedule, hf_config=config.to_dict())
        for step in ctx.steps(total_steps=args.steps):
            if at_step is not None:
                at_step(ctx, step)
            with ctx.accumulate(model, opt, max_grad_norm=args.clip, autocast_dtype=autocast) as acc:
                for x, y in ctx.micro_batches(dataset, step):
                    acc.backward(loss_sum(model, x, y), num_items=y.numel())
            schedule.step()
            ctx.report({"loss": acc.loss, "lr": schedule.get_last_lr()[0], "grad_norm": acc.grad_norm})

    return train_fn


def batch_config(args: argparse.Namespace) -> et.BatchConfig:
    # dataset order (no shuffle) keeps the plain reference below free of elastictrain's sampler
    return et.BatchConfig(global_batch_size=args.batch, micro_batch_size=args.micro_batch, shuffle=False)


def reference_run(args: argparse.Namespace) -> tuple[dict[str, torch.Tensor], float]:
    """The same training in one plain PyTorch process: final weights and learning rate."""
    torch.set_num_threads(1)
    dataset = Sequences(args.samples, args.seq, args.vocab)
    model = make_model(model_config(args))
    opt, schedule = optimizer_and_schedule(model, args)
    per_epoch = len(dataset) // args.batch
    for step in range(args.steps):
        first = (step % per_epoch) * args.batch
        opt.zero_grad(set_to_none=True)
        for begin in range(first, first + args.batch, args.micro_batch):
            x, y = dataset.tokens[begin : begin + args.micro_batch, :-1], dataset.tokens[begin : begin + args.micro_batch, 1:]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                loss = loss_sum(model, x, y)
            loss.backward()  # summed, as acc.backward: the gradient is divided once by the token count
        for param in model.parameters():
            param.grad.mul_(1.0 / (args.batch * args.seq))
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        schedule.step()
    return model.state_dict(), schedule.get_last_lr()[0]


def distance(weights: dict, reference: dict, initial: dict) -> float:
    """||w - w_ref|| / ||w_ref - w_init||: how far from the reference, as a share of what training changed."""
    num = sum(float(((weights[n] - reference[n]) ** 2).sum()) for n in reference)
    den = sum(float(((reference[n] - initial[n]) ** 2).sum()) for n in reference)
    return (num / den) ** 0.5


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--uri", default="file:///tmp/elastictrain-hf-lm", help="checkpoint URI (file://, s3://, ...)")
    p.add_argument("--key", default=None, help="encryption key spec: file:PATH, env:VAR or kms:KEY_ID")
    p.add_argument("--export", default=None, metavar="DIR", help="after training, export a from_pretrained folder")
    p.add_argument("--check", action="store_true", help="compare with a plain one-process PyTorch run")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--every", type=int, default=20, help="checkpoint every N steps")
    p.add_argument("--workers", type=int, default=3, help="max workers")
    p.add_argument("--min-workers", type=int, default=1)
    p.add_argument("--batch", type=int, default=12, help="global batch (sequences per step, over all workers)")
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--samples", type=int, default=600, help="synthetic sequences in the dataset")
    p.add_argument("--seq", type=int, default=16, help="tokens per sequence")
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=6)
    p.add_argument("--decay-steps", type=int, default=None, help="the cosine reaches 0 here (default: --steps)")
    p.add_argument("--clip", type=float, default=1.0, help="max gradient norm")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="train in fp32 (no bf16 autocast)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    began = time.time()
    key = et.EncryptionConfig(key=args.key) if args.key else None
    try:
        result = et.ElasticTrainer(
            make_train_fn(args),
            scaling=et.ScalingConfig(min_workers=args.min_workers, max_workers=args.workers),
            batch=batch_config(args),
            checkpoint=et.CheckpointConfig(uri=args.uri, every_steps=args.every, keep_last=2, encryption=key),
        ).fit()
    except et.TrainingFailed as exc:
        print(f"hf_causal_lm: training failed: {exc}", file=sys.stderr, flush=True)
        return 1
    losses = [h for h in result.history if "loss" in h]
    first, last = (losses[0], losses[-1]) if losses else ({}, {})
    print(f"steps={result.steps} loss {first.get('loss', float('nan')):.3f} -> {last.get('loss', float('nan')):.3f} "
          f"lr={last.get('lr', float('nan')):.3g} wall={time.time() - began:.1f}s checkpoint={result.checkpoint_uri}")
    if args.export or args.check:
        from elastictrain.checkpoint.export import export_model

        out = args.export or os.path.join(tempfile.mkdtemp(prefix="hf-lm-"), "model")
        done = export_model(args.uri, out, "model", keys=[args.key] if args.key else None, overwrite=True,
                            hf_config_entry="hf_config")
        print(f"exported step {done.step} to {out}: AutoModelForCausalLM.from_pretrained({out!r})")
    if args.check:
        from safetensors.torch import load_file

        exported = load_file(f"{out}/model.safetensors")
        weights, lr = reference_run(args)
        initial = make_model(model_config(args)).state_dict()
        print(f"drift from a plain run: {distance(exported, weights, initial):.3g} of the update "
              f"(||w - w_plain|| / ||w_plain - w_init||); lr {last.get('lr')} vs plain {lr}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
