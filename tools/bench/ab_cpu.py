#!/usr/bin/env python3
"""Runs two moed-bench-cpu binaries alternately (A, B, A, B, ...) and prints the median of each
figure for each, with B/A: the before/after comparison of a change, on the same machine in the
same minutes.

  tools/bench/ab_cpu.py OLD_BINARY NEW_BINARY [--runs 5]
"""
import argparse
import re
import statistics
import subprocess


def figures(output):
    out = {}
    section = None
    for line in output.splitlines():
        if line.startswith("== expert FFN GEMV"):
            section = "gemv"
        elif line.startswith("== decode"):
            section = "decode"
        fields = line.split()
        if not fields or not re.fullmatch(r"\d+", fields[0]):
            continue
        if section == "gemv" and len(fields) >= 6:
            out[f"sweep GB/s, {fields[0]} threads"] = float(fields[1])
            out[f"GEMV GB/s, {fields[0]} threads"] = float(fields[2])
            out[f"GEMV 4 tokens GB/s, {fields[0]} threads"] = float(fields[5])
        elif section == "decode" and len(fields) >= 2:
            out[f"decode tokens/s, {fields[0]} sequences"] = float(fields[1])
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    # Indexed by position, so that A and B may be the same binary (an A/A run measures the
    # machine's noise).
    runs = ([], [])
    for i in range(args.runs):
        for side, binary in enumerate((args.a, args.b)):
            result = subprocess.run([binary], capture_output=True, text=True, check=True)
            runs[side].append(figures(result.stdout))
            print(f"run {i + 1} {'AB'[side]} {binary}: {runs[side][-1]}", flush=True)
    print(f"\nmedians of {args.runs} alternating runs")
    print(f"{'figure':40} {'A':>10} {'B':>10} {'B/A':>8}")
    for key in runs[0][0]:
        a = statistics.median(r[key] for r in runs[0])
        b = statistics.median(r[key] for r in runs[1])
        print(f"{key:40} {a:10.1f} {b:10.1f} {b / a:8.3f}")


if __name__ == "__main__":
    main()
