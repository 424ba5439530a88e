"""Static GPU evidence without a GPU: per-kernel registers, stack frame, spills and static
shared memory (ptxas -v) and integer divisions (div/rem in the PTX), in the whole kernel and
inside loops.

usage: python benchmarks/static/ptx_report.py KERNEL.ptx PTXAS_LOG [--filter SUBSTRING]

A loop is a PTX label with a later branch back to it; an instruction lies inside a loop when
it sits between such a label and its backward branch.  64-bit divisions (div/rem .s64/.u64)
become ~70-instruction subroutines in SASS; 32-bit ones ~20 instructions.
"""

from __future__ import annotations

import argparse
import re
import subprocess

DIV = re.compile(r"^\s*(?:@!?%p\d+\s+)?(div|rem)\.(s64|u64|s32|u32)\b")


def demangle(names):
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
    return dict(zip(names, out))


def short(name: str) -> str:
    name = re.sub(r"pyratok::(\(anonymous namespace\)::)?", "", name)
    name = name.replace("Format<(DType)0>", "f16").replace("Format<(DType)1>", "bf16")
    name = name.replace("Format<(DType)2>", "f32").replace("Format<(DType)3>", "f64")
    return re.sub(r"\(.*\)$", "", name)


def ptx_divisions(path):
    kernels, name, body = {}, None, []
    for line in open(path):
        m = re.match(r"^\s*(?:\.visible\s+)?\.entry\s+([\w$]+)", line)
        if m:
            if name:
                kernels[name] = body
            name, body = m.group(1), []
        elif name:
            body.append(line)
    if name:
        kernels[name] = body
    result = {}
    for name, lines in kernels.items():
        labels = {}
        for i, line in enumerate(lines):
            m = re.match(r"^(\$L__\w+):", line)
            if m:
                labels[m.group(1)] = i
        loops = []
        for i, line in enumerate(lines):
            m = re.search(r"\bbra(?:\.uni)?\s+(\$L__\w+);", line)
            if m and m.group(1) in labels and labels[m.group(1)] < i:
                loops.append((labels[m.group(1)], i))
        total = {"64": 0, "32": 0}
        in_loop = {"64": 0, "32": 0}
        for i, line in enumerate(lines):
            m = DIV.match(line)
            if not m:
                continue
            width = "64" if m.group(2).endswith("64") else "32"
            total[width] += 1
            if any(a <= i <= b for a, b in loops):
                in_loop[width] += 1
        result[name] = (total, in_loop)
    return result


def ptxas_info(path):
    info, name = {}, None
    for line in open(path):
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            name = m.group(1)
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and name:
            info.setdefault(name, {}).update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            name = m.group(1)
        m = re.search(r"Used (\d+) registers", line)
        if m and name:
            info.setdefault(name, {})["regs"] = int(m.group(1))
            m = re.search(r"(\d+) bytes smem", line)
            info[name]["smem"] = int(m.group(1)) if m else 0
    return info


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ptx")
    ap.add_argument("ptxas_log")
    ap.add_argument("--filter", default="")
    args = ap.parse_args()
    divs = ptx_divisions(args.ptx)
    info = ptxas_info(args.ptxas_log)
    # the anonymous namespace's mangled hash differs between two nvcc runs: key by the short name
    pretty = demangle(sorted(set(divs) | set(info)))
    divs = {short(pretty[n]): v for n, v in divs.items()}
    info = {short(pretty[n]): v for n, v in info.items()}
    names = sorted(set(divs) | set(info))
    pretty = {n: n for n in names}
    print("| kernel | regs | stack B | spill st/ld B | smem B | div+rem 64-bit (in loops) | div+rem 32-bit (in loops) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for n in names:
        if args.filter not in pretty[n]:
            continue
        i = info.get(n, {})
        total, loop = divs.get(n, ({"64": 0, "32": 0}, {"64": 0, "32": 0}))
        print(f"| {n} | {i.get('regs', '?')} | {i.get('stack', '?')} | "
              f"{i.get('spill_st', '?')}/{i.get('spill_ld', '?')} | {i.get('smem', '?')} | {total['64']} ({loop['64']}) | "
              f"{total['32']} ({loop['32']}) |")


if __name__ == "__main__":
    main()
