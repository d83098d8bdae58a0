#!/usr/bin/env python3
"""The request path's code footprint, from a callgrind profile made with --dump-instr=yes.

    code_footprint.py PROFILE BINARY REQUESTS

PROFILE is the dump of a steady run (counters zeroed after a warm-up) of BINARY that
served REQUESTS requests. An instruction of BINARY counts as the request path's when it
ran at least once every other request. Prints three figures, tab-separated:

- the 64-byte lines of code those instructions lie in (what the instruction cache must
  hold for a request to run without missing),
- the bytes of those instructions,
- the share of the lines' bytes they fill (the rest is code that did not run, laid out
  between the code that did).

Instruction lengths come from `objdump -d` of BINARY. Used by `PROFILE=callgrind
PROFILE_CACHE=1 bash benches/wrk_vs_nginx.sh`; BENCHMARKS.md says what it showed.
"""

import re
import subprocess
import sys
from collections import Counter


def executed(profile, binary_name):
    """Instruction address -> times run, for the instructions of the object binary_name."""
    counts = Counter()
    objects = {}
    in_binary = False
    address = 0
    after_calls = False
    with open(profile) as lines:
        for line in lines:
            if line.startswith(("ob=", "cob=")):
                m = re.match(r"(c?ob)=\((\d+)\)(?: (.*))?", line.strip())
                if m:
                    if m.group(3):
                        objects[m.group(2)] = m.group(3)
                    if m.group(1) == "ob":
                        in_binary = objects.get(m.group(2), "").endswith("/" + binary_name)
                continue
            if line.startswith("calls="):
                # The next cost line is the call's inclusive cost, not the instruction's own.
                after_calls = True
                continue
            if not line or line[0] not in "0+-*":
                continue
            parts = line.split()
            position = parts[0]
            if position.startswith("0x"):
                address = int(position, 16)
            elif position.startswith("+"):
                address += int(position[1:])
            elif position.startswith("-"):
                address -= int(position[1:])
            if after_calls:
                after_calls = False
                continue
            if in_binary and len(parts) >= 3:
                counts[address] += int(parts[2])
    return counts


def lengths(binary):
    """Instruction address -> length in bytes, from the disassembly."""
    out = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", binary], capture_output=True, text=True, check=True
    ).stdout
    result = {}
    previous = None
    for line in out.splitlines():
        m = re.match(r"\s+([0-9a-f]+):", line)
        if not m:
            previous = None
            continue
        address = int(m.group(1), 16)
        if previous is not None and 0 < address - previous <= 15:
            result[previous] = address - previous
        previous = address
    return result


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    profile, binary, requests = sys.argv[1], sys.argv[2], float(sys.argv[3])
    if requests <= 0:
        sys.exit("REQUESTS must be positive")
    counts = executed(profile, binary.rsplit("/", 1)[-1])
    size = lengths(binary)
    hot = [a for a, n in counts.items() if n >= requests * 0.5]
    if not hot:
        sys.exit(f"no instruction of {binary} in {profile} ran every other request")
    lines = set()
    code = 0
    for a in hot:
        n = size.get(a, 4)  # the last instruction of a function: about the average
        code += n
        lines.update(range(a >> 6, ((a + n - 1) >> 6) + 1))
    print(f"{len(lines)}\t{code}\t{code / (len(lines) * 64):.2f}")


if __name__ == "__main__":
    main()
