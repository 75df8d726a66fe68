"""Training-step throughput: this project's GPT2 vs transformers' GPT2LMHeadModel.

Both models get the same geometry (124M by default), the same AdamW
(lr 6e-4, betas 0.9/0.95, weight decay 0.1, fused on CUDA), the same batch and
sequence length, and the same autocast precision (bf16 where the device supports
it). A step is forward + cross-entropy + backward + clip + optimizer step, timed
after warm-up steps; the table shows tokens/s and our speed relative to HF's.

    python bench/train.py                                    # CPU: 124M, batch 1 x 256
    python bench/train.py --device cuda --batch 8 --seq 1024 --compile
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from gpt2.config import GPT2Config
from gpt2.model import GPT2
from gpt2.train.trainer import make_optimizer


def hf_model(config: GPT2Config, attn: str):
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel

    hf = HFConfig(vocab_size=config.n_vocab, n_positions=config.n_ctx, n_embd=config.n_embd,
                  n_layer=config.n_layer, n_head=config.n_head, resid_pdrop=0.0,
                  embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation=attn)
    return GPT2LMHeadModel(hf)


def time_steps(name, model, forward, *, device, dtype, batch, seq, steps, warmup) -> float:
    model.to(device).train()
    opt = make_optimizer(model, lr=6e-4, weight_decay=0.1, device=device)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50257, (batch, seq + 1), generator=g).to(device)
    inputs, targets = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = forward(model, inputs)
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    tps = batch * seq / statistics.median(times)
    print(f"  {name:<28} {tps:>10,.0f} tokens/s   (median of {steps} steps, "
          f"loss {loss.item():.3f})", flush=True)
    return tps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="124M")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="default: 1 on CPU, 8 on CUDA")
    p.add_argument("--seq", type=int, default=None, help="default: 256 on CPU, 1024 on CUDA")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 3 CPU, 20 CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="default 1 CPU, 5 CUDA")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    a = p.parse_args()
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    batch, seq = a.batch or (8 if cuda else 1), a.seq or (1024 if cuda else 256)
    steps, warmup = a.steps or (20 if cuda else 3), a.warmup or (5 if cuda else 1)
    bf16_ok = torch.cuda.is_bf16_supported() if cuda else True
    use_bf16 = a.dtype == "bf16" or (a.dtype == "auto" and bf16_ok)
    dtype = torch.bfloat16 if use_bf16 else None
    config = GPT2Config.preset(a.size)
    print(f"{a.size} training step, batch {batch} x {seq}, {device}, "
          f"{'bf16 autocast' if dtype else 'fp32'}, AdamW{', compiled' if a.compile else ''}, "
          f"{torch.get_num_threads()} threads")
    torch.manual_seed(0)
    ours = GPT2(config)
    theirs = hf_model(config, "sdpa")

    def ours_fwd(m, x):
        return m(x)

    def hf_fwd(m, x):
        return m(x).logits

    if a.compile:
        ours_fwd_c, hf_fwd_c = torch.compile(ours_fwd), torch.compile(hf_fwd)
    else:
        ours_fwd_c, hf_fwd_c = ours_fwd, hf_fwd
    kw = dict(device=device, dtype=dtype, batch=batch, seq=seq, steps=steps, warmup=warmup)
    r_ours = time_steps("gpt2 (this project)", ours, ours_fwd_c, **kw)
    ours.cpu()
    r_hf = time_steps("transformers GPT2LMHeadModel", theirs, hf_fwd_c, **kw)
    print(f"\n  ratio ours / transformers: {r_ours / r_hf:.2f}x")


if __name__ == "__main__":
    main()
