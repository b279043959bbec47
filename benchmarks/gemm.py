"""How close one CPU thread runs to its peak at the matrix shapes of a ROME v* step (default model:
576 -> 1,536, the MLP's up projection; rows = template rows x suffix positions, ~66 per request).

If these are near the largest shapes' rate, batching several requests (more rows) cannot make the
same FLOPs much faster on this CPU: what is left is fewer FLOPs.

    OMP_NUM_THREADS=1 python benchmarks/gemm.py
"""
import time

import torch


def rate(rows: int, d_in: int = 576, d_out: int = 1536, repeat: int = 200) -> tuple[float, float]:
    x, w = torch.randn(rows, d_in), torch.randn(d_out, d_in)
    for _ in range(3):
        torch.nn.functional.linear(x, w)
    start = time.perf_counter()
    for _ in range(repeat):
        torch.nn.functional.linear(x, w)
    dt = (time.perf_counter() - start) / repeat
    return dt, 2 * rows * d_in * d_out / dt / 1e9


if __name__ == "__main__":
    torch.set_num_threads(1)
    print("| rows | ms per product | GFLOP/s |\n|---|---|---|")
    for rows in (22, 66, 132, 400, 1000):
        dt, gflops = rate(rows)
        print(f"| {rows} | {dt * 1e3:.3f} | {gflops:.1f} |")
