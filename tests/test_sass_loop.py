"""bench.sass_loop on a small `cuobjdump -sass` listing: the functions, the largest loop found from
its backward branch, the opcode mix and the move count, and the command's errors."""

from __future__ import annotations

import pytest

from bench import sass_loop

LISTING = """
        code for sm_90a
                Function : _Z6kernelv
        .headerflags    @"EF_CUDA_ACCELERATORS EF_CUDA_SM90"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                      /* 0x00000a00ff017b82 */
        /*0010*/                   MOV R2, RZ ;                                /* 0x000000ff00027202 */
        /*0020*/                   LDS.64 R4, [R3+0x10] ;                      /* 0x0000100003047984 */
        /*0030*/                   IMAD.MOV.U32 R8, RZ, RZ, R4 ;               /* 0x000000ffff087224 */
        /*0040*/                   HMMA.1688.F32.TF32 R12, R8, R6, R12 ;       /* 0x000000060c0c723c */
        /*0050*/               @P0 BRA 0x20 ;                                  /* 0xfffffffc00000947 */
        /*0060*/                   ISETP.GE.AND P1, PT, R2, 0x4, PT ;          /* 0x000000040200780c */
        /*0070*/              @!P1 BRA 0x60 ;                                  /* 0xfffffffc00000947 */
        /*0080*/                   BRA 0x90 ;                                  /* 0xfffffffc00000947 */
        /*0090*/                   EXIT ;                                      /* 0x000000000000794d */
                Function : _Z5otherv
        /*0000*/                   EXIT ;                                      /* 0x000000000000794d */
"""


def test_the_largest_loop_and_its_mix():
    funcs = sass_loop.functions(LISTING)
    assert list(funcs) == ["_Z6kernelv", "_Z5otherv"] and len(funcs["_Z6kernelv"]) == 10
    loop = sass_loop.largest_loop("_Z6kernelv", funcs["_Z6kernelv"])
    # 0x20 .. 0x50 (four instructions) beats 0x60 .. 0x70 (two); a forward branch is no loop
    assert loop.start == 2 and loop.total == 10
    assert loop.instructions[0].startswith("LDS.64") and loop.instructions[-1] == "@P0 BRA 0x20"
    assert loop.opcodes() == {"LDS": 1, "IMAD": 1, "HMMA": 1, "BRA": 1}
    assert loop.moves() == 1  # the IMAD.MOV; the MOV at 0x10 is before the loop
    assert sass_loop.largest_loop("_Z5otherv", funcs["_Z5otherv"]) is None


def test_the_command(tmp_path, capsys):
    listing = tmp_path / "k.sass"
    listing.write_text(LISTING)
    assert sass_loop.main(["--sass", str(listing), "--kernel", "kernel"]) == 0
    out = capsys.readouterr().out
    assert "largest loop 4 (from #2), moves 1" in out and "_Z5otherv" not in out
    assert sass_loop.main(["--sass", str(listing), "--kernel", "nothing"]) == 1
    assert "`--kernel` (='nothing')" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sass_loop.main(["--sass", str(listing), "--kernel", "("])
    assert "`--kernel` (='(') is not a regular expression" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sass_loop.main([])


def test_without_the_disassembler_it_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(sass_loop.shutil, "which", lambda name: None)
    monkeypatch.setattr(sass_loop.sys, "path", [str(tmp_path)])
    tool, why = sass_loop.find_cuobjdump()
    assert tool is None and "cuobjdump and nvdisasm not found" in why and "nvidia-cuda-nvdisasm" in why
    with pytest.raises(FileNotFoundError, match="--cuobjdump PATH"):
        sass_loop.disassemble(tmp_path / "x.so")
