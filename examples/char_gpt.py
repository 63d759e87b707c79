"""A small GPT-style character model on the Python standard library's own source files.

Every machine with Python has the corpus (`sysconfig.get_paths()["stdlib"]`), so
this runs anywhere without a download. Checkpoints are encrypted with your key
and the run resumes from the newest one: run the same command again (or with
more `--steps`) and it continues where the last run stopped.

    elastictrain ckpt keygen > gpt.key                  # a 32-byte key, base64; keep it secret
    python examples/char_gpt.py --uri file:///tmp/char-gpt --key file:gpt.key --steps 300
    python examples/char_gpt.py --uri file:///tmp/char-gpt --key file:gpt.key --steps 600   # continues

    # the same run on S3 or any S3-compatible storage (MinIO, Ceph, R2, ...):
    python examples/char_gpt.py --uri s3://bucket/char-gpt --key env:ET_KEY --endpoint-url http://minio:9000

    # inspect what was written
    elastictrain ckpt ls file:///tmp/char-gpt
    elastictrain ckpt export file:///tmp/char-gpt model.safetensors --key file:gpt.key

Characters are UTF-8 bytes (a vocabulary of 256), so a checkpoint does not
depend on which Python version supplied the text.
"""

from __future__ import annotations

import argparse
import math
import sys
import sysconfig
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import elastictrain as et

VOCAB = 256


def load_corpus(max_bytes: int) -> torch.Tensor:
    """The first `max_bytes` bytes of the standard library's .py files, in sorted path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, size = [], 0
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        size += len(data)
        if size >= max_bytes:
            break
    if not chunks:
        raise RuntimeError(f"no .py files under {root}: this Python has no standard library sources")
    text = b"\n".join(chunks)[:max_bytes]
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).long()


class Windows(torch.utils.data.Dataset):
    """Sample i: `context` bytes starting at i * stride, and the same window shifted by one as targets."""

    def __init__(self, data: torch.Tensor, context: int, stride: Optional[int] = None) -> None:
        self.data, self.context = data, context
        self.stride = stride or context // 2
        self.count = (len(data) - context - 1) // self.stride
        if self.count < 1:
            raise ValueError(f"corpus of {len(data)} bytes is shorter than one window of {context}")

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int):
        s = i * self.stride
        chunk = self.data[s : s + self.context + 1]
        return chunk[:-1], chunk[1:]


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class CharGPT(nn.Module):
    def __init__(self, context: int, dim: int, layers: int, heads: int) -> None:
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(VOCAB, dim)
        self.pos = nn.Embedding(context, dim)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCAB, bias=False)
        self.head.weight = self.tok.weight  # tied embeddings
        for module in self.modules():  # small initial logits: the first loss is about ln(256)
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        return self.head(self.ln(self.blocks(x)))

    @torch.no_grad()
    def generate(self, prompt: bytes, n: int) -> bytes:
        idx = torch.tensor([list(prompt)], dtype=torch.long, device=self.tok.weight.device)
        for _ in range(n):
            logits = self(idx[:, -self.context :])[:, -1]
            idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], dim=1)
        return bytes(idx[0].tolist())


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def make_train_fn(args: argparse.Namespace):
    def train_fn(ctx: et.Context) -> None:
        torch.set_num_threads(1)  # several workers share the machine's cores
        dataset = Windows(load_corpus(args.corpus_bytes), args.context)
        torch.manual_seed(0)  # the same initial weights on every worker and every run
        model = ctx.prepare_model(CharGPT(args.context, args.dim, args.layers, args.heads))
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
        state = ctx.state(model=model, optimizer=opt, tokens_seen=0)
        for step in ctx.steps(total_steps=args.steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
            with ctx.accumulate(model, opt, max_grad_norm=1.0) as acc:
                for x, y in ctx.micro_batches(dataset, step):
                    logits = model(x)
                    loss_sum = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1), reduction="sum")
                    acc.backward(loss_sum, num_items=y.numel())
            state.tokens_seen += args.batch * args.context
            ctx.report({"loss": acc.loss, "bits_per_byte": acc.loss / math.log(2), "tokens": state.tokens_seen})
        if ctx.rank == 0:
            module = getattr(model, "module", model)
            sample = module.generate(b"def ", args.sample_bytes).decode("utf-8", "replace")
            ctx.report({"sample": sample, "final_step": state.step})

    return train_fn


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--uri", default="file:///tmp/elastictrain-char-gpt", help="checkpoint URI (file://, s3://, ...)")
    p.add_argument("--key", default=None, help="encryption key spec: file:PATH, env:VAR or kms:KEY_ID (default: none)")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint for s3:// URIs (MinIO, a local server)")
    p.add_argument("--steps", type=int, default=300, help="total optimizer steps (a resumed run continues to this)")
    p.add_argument("--every", type=int, default=50, help="checkpoint every N steps")
    p.add_argument("--workers", type=int, default=2, help="max workers")
    p.add_argument("--min-workers", type=int, default=1)
    p.add_argument("--batch", type=int, default=32, help="global batch (sequences per step, over all workers)")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--context", type=int, default=64, help="context length in bytes")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--corpus-bytes", type=int, default=4_000_000, help="bytes of stdlib source to train on")
    p.add_argument("--sample-bytes", type=int, default=120, help="bytes to generate at the end")
    return p


def checkpoint_config(args: argparse.Namespace) -> et.CheckpointConfig:
    options: dict = {}
    if args.endpoint_url:
        options = {"client_kwargs": {"endpoint_url": args.endpoint_url}}
    return et.CheckpointConfig(
        uri=args.uri,
        every_steps=args.every,
        keep_last=2,
        encryption=et.EncryptionConfig(key=args.key) if args.key else None,
        storage_options=options,
    )


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    began = time.time()
    try:
        result = et.ElasticTrainer(
            make_train_fn(args),
            scaling=et.ScalingConfig(min_workers=args.min_workers, max_workers=args.workers),
            batch=et.BatchConfig(global_batch_size=args.batch, micro_batch_size=args.micro_batch),
            checkpoint=checkpoint_config(args),
            run=et.RunConfig(progress=True, progress_total=args.steps),
        ).fit()
    except et.TrainingFailed as exc:
        print(f"char_gpt: training failed: {exc}", file=sys.stderr, flush=True)
        return 1
    restored = [e for e in result.events if e["kind"] == "restored_from_checkpoint"]
    if restored:
        print(f"resumed from checkpoint at step {restored[0]['step']}")
    else:
        print("started from scratch")
    losses = [h for h in result.history if "loss" in h]
    last = losses[-1] if losses else {}
    sample = next((h["sample"] for h in reversed(result.history) if "sample" in h), "")
    print(f"steps={result.steps} loss={last.get('loss', float('nan')):.4f} "
          f"bits/byte={last.get('bits_per_byte', float('nan')):.3f} wall={time.time() - began:.1f}s "
          f"checkpoint={result.checkpoint_uri} encrypted={bool(args.key)}")
    print("sample:", repr(sample))
    return 0


if __name__ == "__main__":
    sys.exit(main())
