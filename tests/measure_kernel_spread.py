"""How far the bf16 and int8 results move between CPU kernels (run by hand; its numbers are the
tolerances' justification in tests/test_release_bf16.py and tests/test_quantize.py).

    python tests/measure_kernel_spread.py            # every kernel choice this CPU offers
    python tests/measure_kernel_spread.py --json out/spread.json

PyTorch picks its CPU kernels at run time: oneDNN (bf16 matrix products) by the best ISA the CPU
has, capped by ONEDNN_MAX_CPU_ISA (AVX2, AVX512_CORE, AVX512_CORE_BF16, AVX512_CORE_AMX, ...);
ATen's own vectorised kernels (the int8 matrix-vector kernel, reductions, softmax) by
ATEN_CPU_CAPABILITY (avx2, avx512); and the split of every sum by the thread count. Each
setting runs in its own process, which reports:
  release v1/v2   max |first-token logits - the release's golden| in ulps of the golden's max
                  |logit| (the unit test_release_bf16.py's bound is written in), and how far the
                  golden's 12 greedy ids fall behind our top logit when fed to generate (ulps;
                  0: our greedy ids are the golden's)
  int8 row        max |one row through _weight_int8pack_mm - float64 of the same bf16-rounded
                  input|, relative to the size of the terms summed (test_quantize.py's bound: 2^-7)
  bf16 row        the same for the bf16 matrix-vector product (bound: 2^-7)
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ISA_CAPS = ["", "AVX512_CORE_AMX", "AVX512_CORE_BF16", "AVX512_CORE", "AVX2"]  # "": no cap


def worker():
    import tempfile

    import torch
    import torch.nn.functional as F
    sys.path[:0] = [str(HERE.parent), str(HERE)]
    from lib import stored
    from test_release_bf16 import first_token_ulps, greedy_ulps_behind, load_release
    out = {"threads": torch.get_num_threads(), "aten": torch.backends.cpu.get_cpu_capability()}
    with tempfile.TemporaryDirectory() as tmp:
        for version in ("v2", "v1"):
            release = load_release(version, Path(tmp))
            out[f"release {version} ulps"] = round(first_token_ulps(*release), 2)
            out[f"release {version} greedy ulps behind"] = round(max(greedy_ulps_behind(*release)), 2)
    torch.manual_seed(0)
    w = torch.randn(4096, 4096)
    x = torch.randn(1, 4096).bfloat16()
    q, s = stored.quantize_rows(w)
    wq = stored.dequantize(q, s).double()
    if stored.INT8PACK:
        got = torch.ops.aten._weight_int8pack_mm(x.clone(), q, s).double()
        exact = F.linear(x.double(), wq)
        out["int8 row rel"] = float(((got - exact).abs() / (x.double().abs() @ wq.abs().T)).max())
    wb = w.bfloat16()
    got = F.linear(x, wb).double()
    exact = F.linear(x.double(), wb.double())
    out["bf16 row rel"] = float(((got - exact).abs() / (x.double().abs() @ wb.double().abs().T)).max())
    print(json.dumps(out))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args()
    sys.path.insert(0, str(HERE.parent))
    from lib import devices
    cpu = devices.cpu_kind()  # the flags that decide the kernels, as bench.py names them
    print(f"CPU: {cpu}")
    settings = [(isa, aten, t) for isa in ISA_CAPS for aten in ("", "avx2") for t in ("2",)]
    settings += [("", "", "1"), ("AVX2", "avx2", "1")]
    rows, table = [], []  # rows: the settings that ran
    for isa, aten, threads in settings:
        env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")}
        env.update({"OMP_NUM_THREADS": threads, **({"ONEDNN_MAX_CPU_ISA": isa} if isa else {}),
                    **({"ATEN_CPU_CAPABILITY": aten} if aten else {})})
        r = subprocess.run([sys.executable, __file__, "--worker"], env=env, capture_output=True, text=True)
        row = {"ONEDNN_MAX_CPU_ISA": isa or "(none)", "ATEN_CPU_CAPABILITY": aten or "(none)", "threads": threads}
        if r.returncode:  # e.g. oneDNN's AMX with ATen capped at avx2: PyTorch's CPU attention refuses
            row["failed"] = r.stderr.strip().splitlines()[-1]
        else:
            row.update(json.loads(r.stdout))
            rows.append(row)
        print(json.dumps(row), flush=True)
        table.append(row)
    print("largest spread: " + ", ".join(f"{k} {max(r[k] for r in rows)}" for k in rows[0] if "ulps" in k or k.endswith("rel")))
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu, "rows": table}, indent=1))


if __name__ == "__main__":
    worker() if sys.argv[1:] == ["--worker"] else main()
