"""Time CPU dequantization options for one routed expert and print them with ratios.

    python -m benchmarks.dequant [--hidden 2048] [--ffn 1408] [--threads 2] [--repeat 40]

Defaults are a Qwen1.5-MoE-A2.7B expert (H=2048, F=1408).  Codes, scales and zeros are random (the
speed does not depend on the values), so hqq is not needed.  Part 1 compares ways to unpack the
4-bit and 2-bit codes of one [F, H] matrix, part 2 ways to turn codes into float weights, part 3
times ``fate.quant.unpack_expert`` on whole blobs next to the matmuls of a decode step.  Each row
shows the median and minimum of ``--repeat`` runs after warm-up; ratios (of minima) are relative to
the first row of a table (the option fate.quant uses).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from fate.quant import (
    QuantSpec,
    expert_blob_layout,
    pack_codes,
    unpack_codes,
    unpack_expert,
)


def time_ms(fn, repeat: int) -> tuple:
    """(median, minimum) wall time of ``fn`` in ms over ``repeat`` runs after 3 warm-up runs.  The
    minimum is the better estimate on a shared machine."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, min(times) * 1e3


def table(title: str, rows, repeat: int) -> None:
    print(f"\n{title}")
    print(f"  {'':44s} {'median':>8s}    {'min':>8s}   ratio of min")
    base = None
    for name, fn in rows:
        med, best = time_ms(fn, repeat)
        base = best if base is None else base
        print(f"  {name:44s} {med:8.3f} ms {best:8.3f} ms   x{best / base:5.2f}")


def unpack_variants(packed: torch.Tensor, bits: int):
    rows, m = packed.shape
    per = 8 // bits
    mask = (1 << bits) - 1
    strided = torch.empty(rows, m, per, dtype=torch.uint8)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8)

    def widen():  # what fate.quant does
        return unpack_codes(packed, bits)

    def stack():
        return torch.stack([(packed >> (bits * k)) & mask for k in range(per)], -1)

    def strided_out():
        for k in range(per):
            torch.bitwise_and(packed >> (bits * k) if k else packed, mask, out=strided[..., k])
        return strided

    def broadcast():
        return (packed.unsqueeze(-1) >> shifts) & mask

    ref = widen().view(rows, m, per)
    for f in (stack, strided_out, broadcast):
        assert torch.equal(f().view(rows, m, per), ref)
    return [
        (f"{bits}-bit widen to int{8 * per} + view bytes (fate)", widen),
        (f"{bits}-bit torch.stack of shifted masks", stack),
        (f"{bits}-bit strided out= writes", strided_out),
        (f"{bits}-bit broadcast shift", broadcast),
    ]


def float_variants(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g: int):
    out_f, in_f = codes.shape
    q = codes.view(out_f, in_f // g, g)
    s = scale.float()[..., None]
    z = zero.float()[..., None]
    b = -z * s
    w = torch.empty(out_f, in_f // g, g)
    wb = torch.empty(out_f, in_f // g, g, dtype=torch.bfloat16)
    sb, bb = s.bfloat16(), b.bfloat16()

    def fate_f32():
        w.copy_(q)
        w.sub_(z)
        w.mul_(s)
        return w

    def mixed_out():
        torch.sub(q, z, out=w)
        w.mul_(s)
        return w

    def mixed_alloc():
        return (q - z) * s

    def mul_add():
        w.copy_(q)
        w.mul_(s).add_(b)
        return w

    def addcmul():
        w.copy_(q)
        torch.addcmul(b, w, s, out=w)
        return w

    def f32_then_bf16():
        fate_f32()
        wb.copy_(w)
        return wb

    def bf16_direct():
        torch.mul(q, sb, out=wb)
        wb.add_(bb)
        return wb

    return [
        ("copy_ + sub_ + mul_ into f32 buffer (fate)", fate_f32),
        ("mixed-dtype sub(q_u8, z, out=) + mul_", mixed_out),
        ("(q_u8 - z) * s, fresh tensors", mixed_alloc),
        ("copy_ + mul_ + add_(-z*s)", mul_add),
        ("copy_ + addcmul(-z*s, w, s)", addcmul),
        ("fate f32, then cast to bf16", f32_then_bf16),
        ("bf16 directly: mul(q_u8, s_bf16) + add_", bf16_direct),
    ]


def random_blob(layout, gen: torch.Generator) -> torch.Tensor:
    """A blob of ``layout`` with random codes and plausible fp16 scales/zeros."""
    blob = torch.zeros(layout.size, dtype=torch.uint8)
    spec = layout.spec
    for m in layout.matrices:
        if spec.is_quantized:
            blob[m.packed.offset : m.packed.end] = torch.randint(0, 256, (m.packed.nbytes,), dtype=torch.uint8, generator=gen)
            s = (torch.rand(m.scale.shape, generator=gen) * 0.01).half()
            z = (torch.rand(m.zero.shape, generator=gen) * (2**spec.bits - 1)).half()
            blob[m.scale.offset : m.scale.end] = s.view(-1).view(torch.uint8)
            blob[m.zero.offset : m.zero.end] = z.view(-1).view(torch.uint8)
        else:
            w = (torch.randn(m.shape, generator=gen) * 0.02).half()
            blob[m.packed.offset : m.packed.end] = w.view(-1).view(torch.uint8)
    return blob


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.dequant",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=1408)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    H, F, R = args.hidden, args.ffn, args.repeat
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, expert H={H} F={F}")

    for bits in (4, 2):
        codes = torch.randint(0, 2**bits, (F, H), dtype=torch.uint8, generator=gen)
        table(f"[1] unpack {bits}-bit codes of one [{F}, {H}] matrix", unpack_variants(pack_codes(codes, bits), bits), R)

    spec = QuantSpec.default("q4")
    g = spec.group_size
    codes = torch.randint(0, 16, (F, H), dtype=torch.uint8, generator=gen)
    scale = (torch.rand(F, H // g, generator=gen) * 0.01).half()
    zero = (torch.rand(F, H // g, generator=gen) * 15).half()
    table(f"[2] codes -> weights, one [{F}, {H}] matrix, q4 g{g}", float_variants(codes, scale, zero, g), R)

    x = torch.randn(1, H)
    rows = []
    dense = None
    for name in ("q4", "q2", "f16"):
        layout = expert_blob_layout(H, F, QuantSpec.default(name))
        blob = random_blob(layout, gen)
        outs = tuple(torch.empty(m.shape) for m in layout.matrices)
        outs_bf = tuple(torch.empty(m.shape, dtype=torch.bfloat16) for m in layout.matrices)
        rows.append((f"{name}: unpack_expert f32, out= buffers", lambda b=blob, l=layout, o=outs: unpack_expert(b, l, out=o)))
        rows.append((f"{name}: unpack_expert f32, fresh tensors", lambda b=blob, l=layout: unpack_expert(b, l)))
        rows.append((f"{name}: unpack_expert bf16, out= buffers", lambda b=blob, l=layout, o=outs_bf: unpack_expert(b, l, dtype=torch.bfloat16, out=o)))
        if dense is None:
            dense = unpack_expert(blob, layout)

    gate, up, down = dense
    gate_b, up_b, down_b = (t.bfloat16() for t in dense)
    lin = torch.nn.functional.linear

    def mlp_f32():
        h = torch.nn.functional.silu(lin(x, gate)) * lin(x, up)
        return lin(h, down)

    xb = x.bfloat16()

    def mlp_bf16():
        h = torch.nn.functional.silu(lin(xb, gate_b)) * lin(xb, up_b)
        return lin(h, down_b)

    rows.append(("expert MLP matmuls, 1 token, f32 weights", mlp_f32))
    rows.append(("expert MLP matmuls, 1 token, bf16 weights", mlp_bf16))
    table("[3] whole expert (gate, up, down)", rows, R)
    nbytes = {n: expert_blob_layout(H, F, QuantSpec.default(n)).size for n in ("q4", "q2", "f16")}
    print("\nblob bytes: " + ", ".join(f"{k} {v:,}" for k, v in nbytes.items()))


if __name__ == "__main__":
    np.random.seed(0)
    main()
