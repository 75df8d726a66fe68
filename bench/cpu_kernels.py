"""Which CPU matrix kernels stream a decode step's weights at what speed, and what
the rest of our decode step costs: the evidence behind bench/CPU_NOTES.md.

    python bench/cpu_kernels.py                  # kernels at 1 and 8 rows, then the step budget
    python bench/cpu_kernels.py --rows 1 --json out.json

Part 1 runs every candidate kernel over the 48 matrices of 124M's twelve blocks
(the products of one decode step, LM head left out), back to back, and reports
the median time and the rate it reads weight bytes at, once right after a
512 MB write that pushes the weights out of the caches ("cold") and once
straight after that ("hot": whatever the caches kept). The machine's read
bandwidth (`sum()` over 1 GB) is printed beside them: a kernel that reads at
that rate is bandwidth-bound; one well below it is bound by its arithmetic.

Part 2 times `GPT2.generate` per token on a random 124M (fp32, bf16, int8) and,
in the same process, only the products it calls, with the same inputs: the
difference is what everything else costs (Python, small ops, attention). The
warm-up decodes 160 steps, so `generate` runs its recorded step
(gpt2.traced_step) where one applies; `--plain` measures the plain loop.

Part 3 times the step's other two kernels of ours against PyTorch's, same inputs,
interleaved: the MLP's GELU (rows x 3,072, fp32 and bf16) and greedy decoding's
argmax (rows x 50,257).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]  # (in, out) of one block
LAYERS = 12


def read_bandwidth_gbs() -> float:
    src = torch.ones(1 << 28)  # 1 GB of fp32
    best = min(_timed(src.sum) for _ in range(5))
    return src.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# -- part 1: kernels ----------------------------------------------------------------------------


def _quantize_rows(w: torch.Tensor):
    scale = w.abs().amax(dim=1) / 127  # (out,)
    return torch.round(w / scale[:, None]).to(torch.int8), scale


def _fbgemm_pack(w: torch.Tensor):
    q, scale = _quantize_rows(w)
    qw = torch._make_per_channel_quantized_tensor(
        q, scale.double(), torch.zeros(w.size(0), dtype=torch.long), 0
    )
    return torch.ops.quantized.linear_prepack(qw, None)


def _int4_pack(w: torch.Tensor, group: int = 64):
    """Asymmetric 4-bit groups along `in`, in the layout `_weight_int4pack_mm_for_cpu` reads."""
    n, k = w.shape
    g = w.view(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    zero = lo + 8 * scale  # the kernel computes (q - 8) * scale + zero
    scales_zeros = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().bfloat16()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.view(n, k), 1)
    return packed, scales_zeros


def kernels(rows: int) -> dict:
    """name -> (bytes per weight, prepared weights per matrix, fn(weight, x) -> y, x dtype)."""
    gen = torch.Generator().manual_seed(0)
    fp32 = [[torch.randn(n, k, generator=gen) * 0.02 for k, n in SHAPES] for _ in range(LAYERS)]

    def each(fn):
        return [[fn(w) for w in layer] for layer in fp32]

    def linear(w, x):
        return F.linear(x, w)

    def onednn(w, x):
        return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")

    out = {}
    if rows == 1:  # matrix-vector products (what batch-1 decoding runs for fp32 and bf16)
        out["fp32 torch.mv (MKL sgemv)"] = (4, fp32, lambda w, x: torch.mv(w, x[0]), torch.float32)
        out["bf16 torch.mv"] = (
            2,
            each(torch.Tensor.bfloat16),
            lambda w, x: torch.mv(w, x[0]),
            torch.bfloat16,
        )
    out["fp32 F.linear (MKL sgemm)"] = (4, fp32, linear, torch.float32)
    out["fp32 oneDNN packed linear"] = (
        4,
        each(lambda w: torch.ops.mkldnn._reorder_linear_weight(w, rows)),
        onednn,
        torch.float32,
    )
    out["bf16 oneDNN packed linear"] = (
        2,
        each(lambda w: torch.ops.mkldnn._reorder_linear_weight(w.bfloat16(), rows)),
        onednn,
        torch.bfloat16,
    )
    out["int8 FBGEMM linear_dynamic"] = (
        1,
        each(_fbgemm_pack),
        lambda w, x: torch.ops.quantized.linear_dynamic(x, w, False),
        torch.float32,
    )
    out["int8 x int8 torch._int_mm"] = (
        1,
        each(lambda w: _quantize_rows(w)[0]),
        lambda w, x: torch._int_mm(x, w.t()),
        torch.int8,
    )
    out["int8 weight-only _weight_int8pack_mm"] = (
        1,
        each(lambda w: (_quantize_rows(w)[0], _quantize_rows(w)[1].bfloat16())),
        lambda w, x: torch._weight_int8pack_mm(x, w[0], w[1]),
        torch.bfloat16,
    )
    out["int4 weight-only _weight_int4pack_mm"] = (
        0.5,
        each(_int4_pack),
        lambda w, x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w[0], 64, w[1]),
        torch.bfloat16,
    )
    out.update(our_kernels(each))
    return out


def our_kernels(each) -> dict:
    """gpt2's own kernels (gpt2.cpu_kernels), each that this machine runs."""
    from gpt2 import cpu_kernels as ck

    def call(kernel, x):
        return kernel(x)

    def int8_tail(w):
        q, scale = _quantize_rows(w)
        return q, (q.sum(dim=1, dtype=torch.int32), scale.float(), None)

    def vnni(w):
        q, tail = int8_tail(w)
        return ck.Kernel(torch.ops.gpt2.int8_linear, (q, *tail), ck.INT8_MAX_ROWS, "VNNI")

    def amx_int8(w):
        q, tail = int8_tail(w)
        return ck.Kernel(torch.ops.gpt2.int8_linear_amx, (ck.amx_layout(q, 4), q.shape[0], *tail),
                         ck.AMX_INT8_MAX_ROWS, "AMX")  # fmt: skip

    def avx512_bf16(w):
        return ck.Kernel(torch.ops.gpt2.bf16_linear, (w.bfloat16(), None), ck.BF16_MAX_ROWS,
                         "AVX512-BF16")  # fmt: skip

    def amx_bf16(w):
        w = w.bfloat16()
        return ck.Kernel(torch.ops.gpt2.bf16_linear_amx, (ck.amx_layout(w, 2), w.shape[0], None),
                         ck.AMX_BF16_MAX_ROWS, "AMX")  # fmt: skip

    def fp32(op):
        return lambda w: ck.Kernel(op, (w, None), ck.FP32_MAX_ROWS, "fp32")

    def int8wo(amx):
        def make(w):
            q, scale = _quantize_rows(w)
            bias = torch.zeros(q.shape[0])
            if amx:
                return ck.Kernel(torch.ops.gpt2.int8wo_linear_amx,
                                 (ck.amx_layout(q, 2), q.shape[0], scale.float(), bias),
                                 ck.AMX_INT8WO_MAX_ROWS, "AMX")  # fmt: skip
            return ck.Kernel(torch.ops.gpt2.int8wo_linear, (q, scale.float(), bias),
                             ck.INT8WO_MAX_ROWS, "AVX512-BF16")  # fmt: skip

        return make

    out = {}
    if ck.fp32_op() is not None:
        if torch.cpu._is_avx512_supported():
            out["fp32 gpt2 AVX-512"] = (4, each(fp32(torch.ops.gpt2.fp32_linear)), call,
                                        torch.float32)  # fmt: skip
        out["fp32 gpt2 AVX2"] = (4, each(fp32(torch.ops.gpt2.fp32_linear_avx2)), call,
                                 torch.float32)  # fmt: skip
    if ck.bf16_available():
        out["bf16 gpt2 AVX512-BF16"] = (2, each(avx512_bf16), call, torch.bfloat16)
    if ck.amx_available():
        out["bf16 gpt2 AMX"] = (2, each(amx_bf16), call, torch.bfloat16)
    if ck.int8_available():  # both quantize each row of x inside the call
        out["int8 gpt2 AVX512-VNNI"] = (1, each(vnni), call, torch.float32)
    if ck.amx_available():
        out["int8 gpt2 AMX"] = (1, each(amx_int8), call, torch.float32)
    if ck.bf16_available():  # both round each row of x to bf16 inside the call
        out["int8 weight-only gpt2 AVX512-BF16"] = (1, each(int8wo(False)), call, torch.float32)
    if ck.amx_available():
        out["int8 weight-only gpt2 AMX"] = (1, each(int8wo(True)), call, torch.float32)
    return out


def measure_kernels(rows: int, repeats: int) -> list[dict]:
    flush = torch.ones(1 << 27)  # 512 MB: more than the largest L3 of these machines
    weights_bytes = sum(k * n for k, n in SHAPES) * LAYERS
    results = []
    for name, (bpw, weights, fn, dtype) in kernels(rows).items():
        gen = torch.Generator().manual_seed(1)
        xs = {k: (torch.randn(rows, k, generator=gen) * 50).to(dtype) for k in (768, 3072)}

        def one_step(weights=weights, fn=fn, xs=xs):
            for layer in weights:
                for (k, _), w in zip(SHAPES, layer, strict=True):
                    fn(w, xs[k])

        try:
            one_step()
        except (RuntimeError, NotImplementedError) as e:  # a build without this kernel
            print(f"  {name}: not available here ({str(e).splitlines()[0][:80]})")
            continue
        cold, hot = [], []
        for _ in range(repeats):
            flush.add_(1.0)
            cold.append(_timed(one_step))
            hot.append(_timed(one_step))
        row = {"kernel": name, "rows": rows, "bytes_per_weight": bpw}
        for label, ts in (("cold", cold), ("hot", hot)):
            med = statistics.median(ts)
            row[f"{label}_ms"] = med * 1e3
            row[f"{label}_gbs"] = weights_bytes * bpw / med / 1e9
        results.append(row)
        print(f"  {name:38s} {row['cold_ms']:7.2f} ms {row['cold_gbs']:5.1f} GB/s   "
              f"{row['hot_ms']:7.2f} ms {row['hot_gbs']:5.1f} GB/s", flush=True)  # fmt: skip
    return results


# -- part 2: the decode step's budget -----------------------------------------------------------


def step_budget(precision: str, rows: int, new: int, repeats: int) -> dict:
    """Time per decode step (one new token per row) of generate() vs the products alone,
    interleaved in one process."""
    from gpt2.config import GPT2Config
    from gpt2.model import GPT2
    from gpt2.quantize import Int8Linear, PackedBF16Linear, prepare_bf16, quantize_model

    torch.manual_seed(0)
    model = GPT2(GPT2Config()).eval()
    if precision == "bf16":
        model = prepare_bf16(model)
    elif precision == "int8":
        model = quantize_model(model, "int8")
    idx = torch.randint(0, 50257, (rows, 8), generator=torch.Generator().manual_seed(0))
    x_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    xs = {k: torch.randn(rows, k).to(x_dtype) for k in (768, 3072)}
    if precision == "fp32":
        from gpt2.products import matmul_t

        mats = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
        mats.append(model.wte.weight)
        products = [lambda w=w: matmul_t(xs[w.size(1)], w) for w in mats]
    else:
        kinds = (Int8Linear, PackedBF16Linear)
        layers = [m for m in model.modules() if isinstance(m, kinds)]
        products = [lambda m=m: m(xs[m.in_features]) for m in layers]

    def decode():
        model.generate(idx, max_new_tokens=new, temperature=0.0)

    def only_products():
        for _ in range(new):
            for p in products:
                p()

    with torch.inference_mode():
        for _ in range(max(1, -(-160 // new))):  # warm-up; 128 steps make the recorded step
            decode()
        only_products()
        times = {"decode": [], "products": []}
        for _ in range(repeats):
            for name, fn in (("decode", decode), ("products", only_products)):
                time.sleep(0.2)
                times[name].append(_timed(fn) / new * 1e3)
    d, p = (statistics.median(times[k]) for k in ("decode", "products"))
    print(
        f"  {precision:5s} batch {rows}: {d:6.2f} ms per step, of which the {len(products)} "
        f"products {p:6.2f} ms and the rest {d - p:5.2f} ms ({(d - p) / d:.0%})",
        flush=True,
    )
    return {"precision": precision, "rows": rows, "decode_ms_per_step": d,
            "products_ms_per_step": p, "rest_ms_per_step": d - p}  # fmt: skip


# -- part 3: GELU and argmax ---------------------------------------------------------------


def measure_small_ops(rows: int, repeats: int) -> list[dict]:
    from gpt2 import cpu_kernels

    if not cpu_kernels.load(warn=False):
        print("  our kernels are not built here: nothing to compare")
        return []
    gen = torch.Generator().manual_seed(rows)
    h = torch.randn(rows, 3072, generator=gen) * 2
    logits = torch.randn(rows, 50257, generator=gen)
    hb = h.bfloat16()
    cases = [
        ("GELU fp32", lambda: F.gelu(h, approximate="tanh"), lambda: cpu_kernels.gelu(h)),
        ("GELU bf16", lambda: F.gelu(hb, approximate="tanh"), lambda: cpu_kernels.gelu(hb)),
        ("argmax", lambda: logits.argmax(dim=-1), lambda: cpu_kernels.argmax(logits)),
    ]
    out = []
    for name, theirs, ours in cases:
        times = {"pytorch": [], "ours": []}
        for _ in range(repeats):
            for who, fn in (("pytorch", theirs), ("ours", ours)):
                for _ in range(20):  # warm
                    fn()
                t = time.perf_counter()
                for _ in range(200):
                    fn()
                times[who].append((time.perf_counter() - t) / 200 * 1e6)
        med = {who: statistics.median(v) for who, v in times.items()}
        print(f"  {name:10s} {rows:3d} row(s): PyTorch {med['pytorch']:7.1f} us, ours "
              f"{med['ours']:7.1f} us ({med['pytorch'] / med['ours']:.2f}x)")  # fmt: skip
        out.append({"op": name, "rows": rows, "pytorch_us": med["pytorch"], "ours_us": med["ours"]})
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,8", help="rows per product (batch), comma-separated")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--new", type=int, default=32, help="tokens per decode in part 2")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip-budget", action="store_true", help="part 1 only")
    p.add_argument("--plain", action="store_true",
                   help="part 2 without the recorded CPU step (gpt2.traced_step)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)  # PyTorch's quantized-type notices
    bandwidth = read_bandwidth_gbs()
    print(f"{torch.get_num_threads()} threads, read bandwidth {bandwidth:.1f} GB/s "
          f"(torch {torch.__version__})")  # fmt: skip
    result = {"threads": torch.get_num_threads(), "read_bandwidth_gbs": bandwidth,
              "kernels": [], "small_ops": [], "budget": []}  # fmt: skip
    for rows in (int(r) for r in args.rows.split(",")):
        print(f"\nthe 48 block products of 124M, {rows} row(s): "
              f"{'cold':>20s} {'hot (after a cold run)':>29s}")  # fmt: skip
        result["kernels"] += measure_kernels(rows, args.repeats)
    print("\none call of the step's other kernels (medians, interleaved):")
    for rows in (int(r) for r in args.rows.split(",")):
        result["small_ops"] += measure_small_ops(rows, args.repeats)
    if args.plain:
        import gpt2.traced_step

        gpt2.traced_step.TRACE_CPU_STEP = False
    if not args.skip_budget:
        print(
            "\ngenerate() per step (one new token per row) vs its products alone "
            "(random 124M, greedy):"
        )
        for rows in (int(r) for r in args.rows.split(",")):
            for precision in ("fp32", "bf16", "int8"):
                result["budget"].append(step_budget(precision, rows, args.new, args.repeats))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
