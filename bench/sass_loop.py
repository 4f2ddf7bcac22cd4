"""The instruction mix of a compiled kernel's main loop, from its SASS.

    python -m bench.sass_loop kernels/cuda/_ginjax_cuda.so --kernel 'weight_gradient_d2.*ILi64ELi4ELb1ELi1ELb1ELb0E'

For each kernel whose mangled name matches `--kernel` (a regular expression): its SASS length,
its largest loop (the longest backward branch: the row loop of the CUDA ConvContract kernels)
and that loop's opcodes by count, moves (MOV, IMAD.MOV) in a column of their own.

Why SASS: PTX counts misled (bench/NOTES.md, session 42). Equal PTX rows took 855 and 1,348
executed instructions, because ptxas added register moves to build mma operands. The
disassembler is `cuobjdump` with `nvdisasm`: the CUDA toolkit's on PATH, else the
`nvidia-cuda-cuobjdump` and `nvidia-cuda-nvdisasm` wheels', else `--cuobjdump PATH`.
`--sass FILE` reads a saved `cuobjdump -sass` listing instead.
"""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

_INSTRUCTION = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_TARGET = re.compile(r"\bBRA\b.*?0x([0-9a-f]+)")
_PREDICATE = re.compile(r"^@!?U?P[T0-9]+\s+")
MOVES = ("MOV", "IMAD.MOV.U32", "IMAD.MOV")


@dataclass(frozen=True)
class Loop:
    """The largest loop of one kernel: its instructions, and where it sits in the function."""

    kernel: str
    total: int
    start: int
    instructions: tuple[str, ...]

    def opcodes(self) -> collections.Counter:
        """Opcode (the mnemonic without its modifiers) -> count."""
        return collections.Counter(_mnemonic(t).split(".")[0] for t in self.instructions)

    def moves(self) -> int:
        return sum(1 for t in self.instructions if _mnemonic(t) in MOVES)


def _mnemonic(instruction: str) -> str:
    """The instruction's mnemonic with its modifiers, its predicate dropped: `IMAD.MOV.U32`."""
    return _PREDICATE.sub("", instruction).split()[0]


def functions(sass: str) -> dict[str, list[tuple[int, str]]]:
    """Mangled name -> [(address, instruction)] of every function in a `cuobjdump -sass` listing."""
    out: dict[str, list[tuple[int, str]]] = {}
    current = None
    for line in sass.splitlines():
        if "Function : " in line:
            current = out.setdefault(line.split("Function : ", 1)[1].strip(), [])
        elif current is not None and (m := _INSTRUCTION.match(line)):
            current.append((int(m.group(1), 16), m.group(2)))
    return out


def largest_loop(kernel: str, instructions: list[tuple[int, str]]) -> Loop | None:
    """The longest span from a backward branch's target to the branch; None without one."""
    at = {address: i for i, (address, _) in enumerate(instructions)}
    best = None
    for i, (address, text) in enumerate(instructions):
        m = _TARGET.search(text)
        if m and (target := int(m.group(1), 16)) <= address and target in at:
            if best is None or i - at[target] > best[1] - best[0]:
                best = (at[target], i)
    if best is None:
        return None
    return Loop(kernel, len(instructions), best[0], tuple(t for _, t in instructions[best[0]:best[1] + 1]))


def _tool(name: str) -> str | None:
    """`name` on PATH, else the NVIDIA wheel's (nvidia/cu*/bin/ in site-packages, not on PATH)."""
    found = shutil.which(name)
    if found:
        return found
    for entry in sys.path:
        for candidate in sorted(pathlib.Path(entry or ".").glob(f"nvidia/cu*/bin/{name}"), reverse=True):
            if os.access(candidate, os.X_OK):
                return str(candidate)
    return None


def find_cuobjdump() -> tuple[str | None, str]:
    """(cuobjdump's path, or None and why not). `cuobjdump -sass` runs `nvdisasm`, which must be
    found too: the CUDA toolkit has both on PATH, the wheels `nvidia-cuda-cuobjdump` and
    `nvidia-cuda-nvdisasm` put them in site-packages."""
    cuobjdump, nvdisasm = _tool("cuobjdump"), _tool("nvdisasm")
    if cuobjdump is None or nvdisasm is None:
        missing = " and ".join(n for n, t in (("cuobjdump", cuobjdump), ("nvdisasm", nvdisasm)) if t is None)
        return None, (f"{missing} not found: install the CUDA toolkit or the wheels nvidia-cuda-cuobjdump and "
                      "nvidia-cuda-nvdisasm")
    return cuobjdump, ""


def disassemble(library, cuobjdump: str | None = None) -> str:
    """`cuobjdump -sass` of a library or object file."""
    if cuobjdump is None:
        cuobjdump, why = find_cuobjdump()
        if cuobjdump is None:
            raise FileNotFoundError(why + ", or pass --cuobjdump PATH")
    env = dict(os.environ)
    nvdisasm = _tool("nvdisasm")
    if nvdisasm is not None:  # cuobjdump looks for it on PATH
        env["PATH"] = os.path.dirname(nvdisasm) + os.pathsep + env.get("PATH", "")
    return subprocess.run([cuobjdump, "-sass", str(library)], check=True, capture_output=True, text=True, env=env).stdout


def report(loop: Loop, top: int = 12) -> str:
    mix = ", ".join(f"{op} {n}" for op, n in loop.opcodes().most_common(top))
    return (f"{loop.kernel}\n  {loop.total} instructions; largest loop {len(loop.instructions)} "
            f"(from #{loop.start}), moves {loop.moves()}\n  {mix}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sass_loop", description=__doc__.split("\n\n")[0])
    p.add_argument("library", nargs="?", help="a compiled library (e.g. kernels/cuda/_ginjax_cuda.so)")
    p.add_argument("--kernel", default=".", help="regular expression on the mangled kernel names")
    p.add_argument("--sass", help="a saved `cuobjdump -sass` listing, instead of LIBRARY")
    p.add_argument("--cuobjdump", help="the disassembler's path")
    args = p.parse_args(argv)
    if (args.library is None) == (args.sass is None):
        p.error("give either LIBRARY or --sass FILE")
    try:
        pattern = re.compile(args.kernel)
    except re.error as err:
        p.error(f"`--kernel` (={args.kernel!r}) is not a regular expression: {err}")
    sass = open(args.sass).read() if args.sass else disassemble(args.library, args.cuobjdump)
    loops = [largest_loop(name, ins) for name, ins in functions(sass).items() if pattern.search(name)]
    loops = [loop for loop in loops if loop is not None]
    if not loops:
        print(f"no kernel with a loop matches `--kernel` (={args.kernel!r})", file=sys.stderr)
        return 1
    for loop in loops:
        print(report(loop))
    return 0


if __name__ == "__main__":
    sys.exit(main())
