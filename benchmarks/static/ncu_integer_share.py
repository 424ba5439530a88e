"""Integer-instruction share of the convolution kernels from an Nsight Compute CSV.

usage: python benchmarks/static/ncu_integer_share.py NCU_RAW.csv

The CSV is `ncu --csv --page raw --metrics sass__inst_executed_per_opcode
--print-metric-instances details ...` (benchmarks/device_check.sh).  Integer opcodes: I*
(IMAD, IADD3, ISETP, ...), LEA, LOP3, SHF, SEL, PRMT, FLO, POPC, BMSK; math: HMMA, FFMA,
FMUL, FADD, DFMA, HFMA2.  Before issue 21 the gathers spent ~45-84 64-bit divisions per K
step per thread: the share of integer instructions is the measure that should fall.
"""

import csv
import re
import sys

INTEGER = re.compile(r"^(I[A-Z0-9]+|LEA|LOP3|LOP|SHF|SHL|SHR|SEL|PRMT|FLO|POPC|BMSK|BREV)$")
MATH = re.compile(r"^(HMMA|FFMA|FMUL|FADD|DFMA|DMUL|DADD|HFMA2|HMUL2|HADD2)$")


def main(path: str) -> int:
    rows = list(csv.reader(open(path, newline="")))
    header = next((r for r in rows if "Kernel Name" in r), None)
    if header is None:
        print(f"{path}: no Nsight Compute table (see ncu.log)")
        return 1
    name_col, metric_col = header.index("Kernel Name"), next(
        (i for i, h in enumerate(header) if h.startswith("sass__inst_executed_per_opcode")), None)
    if metric_col is None:
        print(f"{path}: no sass__inst_executed_per_opcode column")
        return 1
    for r in rows[rows.index(header) + 1:]:
        if len(r) <= metric_col or not r[metric_col]:
            continue
        pairs = re.findall(r"([A-Z][A-Z0-9_.]*)\W+([\d,.]+)", r[metric_col])
        counts = {}
        for op, value in pairs:
            base = op.split(".")[0]
            counts[base] = counts.get(base, 0) + float(value.replace(",", ""))
        total = sum(counts.values())
        if not total:
            continue
        integer = sum(v for k, v in counts.items() if INTEGER.match(k))
        math = sum(v for k, v in counts.items() if MATH.match(k))
        print(f"{r[name_col][:90]:90s} integer {100 * integer / total:5.1f}%  math {100 * math / total:5.1f}%  "
              f"of {total:.3g} instructions")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
