"""The rules of the static report (bench/static_sass.py) on fixed inputs: ptxas logs, SASS loops, occupancy,
the predicted-bandwidth model. Pure text and arithmetic: no compiler runs here (tests/kernels/
test_static_report.py runs the real tools, including a kernel made to spill for real)."""
import pytest

from bench import static_sass as sass

NO_SPILL_LOG = """\
ptxas info    : 11 bytes gmem
ptxas info    : Compiling entry function 'logprobs_entropy_fwd_kernel' for 'sm_90a'
ptxas info    : Function properties for logprobs_entropy_fwd_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers
ptxas info    : Compile time = 169.231 ms
"""
# nvcc -Xptxas -v on a file with two kernels, the second one spilling (format of ptxas 13).
TWO_KERNEL_LOG = """\
ptxas info    : Compiling entry function '_ZN4erpo3fwdEv' for 'sm_80'
ptxas info    : Function properties for _ZN4erpo3fwdEv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 192 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function '_ZN4erpo3bwdEv' for 'sm_80'
ptxas info    : Function properties for _ZN4erpo3bwdEv
    408 bytes stack frame, 636 bytes spill stores, 644 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 408 bytes cumulative stack size
"""

# A loop shaped like the fused forward's: a rare region (rebase) jumped over when the max does not move,
# 2 x 16-byte loads of bf16 per trip; then an outer loop over rows around it.
SASS = """\
\tcode for sm_90a
\t\tFunction : demo_kernel
        /*0000*/                   LDC R1, c[0x0][0x28] ;                 /* 0x00000a00ff017b82 */
                                                                          /* 0x000e300000000800 */
        /*0010*/                   MOV R2, RZ ;                           /* 0x0 */
        /*0020*/                   LDG.E.128 R4, desc[UR14][R12.64] ;     /* 0x0 */
        /*0030*/                   LDG.E.128 R8, desc[UR14][R12.64+0x1000] ; /* 0x0 */
        /*0040*/                   FMNMX R3, R4, R5, !PT ;                /* 0x0 */
        /*0050*/               @!P3 BRA 0x80 ;                            /* 0x0 */
        /*0060*/                   FMUL R20, R20, R3 ;                    /* 0x0 */
        /*0070*/                   FMUL R21, R21, R3 ;                    /* 0x0 */
        /*0080*/                   MUFU.EX2 R6, R6 ;                      /* 0x0 */
        /*0090*/                   FADD R20, R20, R6 ;                    /* 0x0 */
        /*00a0*/                   NOP ;                                  /* 0x0 */
        /*00b0*/               @!P2 BRA 0x20 ;                            /* 0x0 */
        /*00c0*/                   LDG.E R7, desc[UR14][R14.64] ;         /* 0x0 */
        /*00d0*/               @P1 BRA 0x10 ;                             /* 0x0 */
        /*00e0*/                   EXIT ;                                 /* 0x0 */
        /*00f0*/                   BRA 0xf0;                              /* 0x0 */
"""


def test_ptxas_log_without_spills():
    fn = sass.parse_ptxas_log(NO_SPILL_LOG)["logprobs_entropy_fwd_kernel"]
    assert (fn.registers, fn.spill_store_bytes, fn.spill_load_bytes, fn.spills) == (64, 0, 0, False)


def test_ptxas_log_spills_are_seen_per_function():
    functions = sass.parse_ptxas_log(TWO_KERNEL_LOG)
    assert not functions["_ZN4erpo3fwdEv"].spills and functions["_ZN4erpo3fwdEv"].registers == 40
    bwd = functions["_ZN4erpo3bwdEv"]
    assert bwd.spills and (bwd.spill_store_bytes, bwd.spill_load_bytes, bwd.stack_bytes, bwd.registers) == (
        636, 644, 408, 32)


@pytest.mark.parametrize("log", ["", "ptxas info    : 11 bytes gmem\n", "ptxas fatal   : Unresolved extern function\n"])
def test_a_log_without_register_counts_is_an_error_not_a_pass(log):
    with pytest.raises(ValueError, match="no 'Used N registers'"):
        sass.parse_ptxas_log(log)


def test_sass_parsing_loops_and_steady_state():
    instructions = sass.parse_sass(SASS)["demo_kernel"]
    assert len(instructions) == 16 and instructions[5].predicated and not instructions[1].predicated
    assert instructions[2].opcode == "LDG.E.128" and sass.global_bytes(instructions[2]) == 16
    assert sass.global_bytes(instructions[12]) == 4
    # Inner loop 0x20..0xb0, outer loop 0x10..0xd0; the BRA to itself at 0xf0 is not a backward branch.
    first_last = {(instructions[a].address, instructions[b].address) for a, b in sass.loops(instructions)}
    assert first_last == {(0x20, 0xB0), (0x10, 0xD0)}
    loop = sass.steady_state_loop(instructions)
    # Innermost streaming loop; the steady path jumps over the two FMULs; NOP not counted.
    assert loop.body_instructions == 9 and loop.instructions == 7
    assert loop.vector_load_bytes == 32 and loop.mufu == 1 and "FMUL" not in loop.opcodes


def test_occupancy_rules():
    # 117 registers x 256 threads: 3840 registers per warp after rounding, 2 blocks of 8 warps.
    assert sass.occupancy(90, 117, 256, 32) == {"blocks_per_sm": 2, "warps_per_sm": 16, "occupancy": 0.25,
                                                "limited_by": "registers"}
    assert sass.occupancy(90, 32, 256, 0)["occupancy"] == 1.0
    assert sass.occupancy(80, 32, 128, 100_000)["limited_by"] == "shared"


def test_prediction_reproduces_the_issue_budget():
    # Issue 15: bf16 forward on an H100 must take 1.68e12 logits/s; 132 SMs x 128 lanes x 1.75 GHz leave
    # ~17.5 instructions per element at full issue.
    fwd = sass.predict_bandwidth_fraction("H100-SXM5", 20.0, 1.0, 2, 1e9)
    assert fwd["instruction_budget_per_element"] == pytest.approx(17.7, abs=0.1)
    assert fwd["predicted_bound"] == "issue" and fwd["predicted_fraction"] == pytest.approx(17.7 / 20, abs=0.01)
    h200 = sass.predict_bandwidth_fraction("H200-SXM", 10.0, 1.0, 2, 1e9)
    assert h200["predicted_fraction"] == pytest.approx(1.0)
    # Few bytes in flight: the latency bound takes over.
    starved = sass.predict_bandwidth_fraction("H100-SXM5", 5.0, 1.0, 2, 4096)
    assert starved["predicted_bound"] == "latency" and starved["predicted_fraction"] < 0.5


# A loop shaped like the CUDA forward's: one 16-byte load of 4 fp32 per trip, then an early exit to the
# back-branch (taken only while no finite logit has been seen) that skips the four exponentials.
EARLY_EXIT_SASS = """\
\tcode for sm_90a
\t\tFunction : early_exit_kernel
        /*0000*/                   MOV R2, RZ ;                           /* 0x0 */
        /*0010*/                   LDG.E.128 R4, desc[UR14][R12.64] ;     /* 0x0 */
        /*0020*/                   FSETP.NEU.AND P0, PT, R3, -INF , PT ; /* 0x0 */
        /*0030*/               @!P0 BRA 0xa0 ;                            /* 0x0 */
        /*0040*/                   MUFU.EX2 R4, R4 ;                      /* 0x0 */
        /*0050*/                   MUFU.EX2 R5, R5 ;                      /* 0x0 */
        /*0060*/                   MUFU.EX2 R6, R6 ;                      /* 0x0 */
        /*0070*/                   MUFU.EX2 R7, R7 ;                      /* 0x0 */
        /*0080*/                   FADD R20, R4, R5 ;                     /* 0x0 */
        /*0090*/                   FADD R21, R6, R7 ;                     /* 0x0 */
        /*00a0*/               @P1 BRA 0x10 ;                             /* 0x0 */
        /*00b0*/                   EXIT ;                                 /* 0x0 */
"""


def test_steady_state_runs_one_exponential_per_loaded_element():
    instructions = sass.parse_sass(EARLY_EXIT_SASS)["early_exit_kernel"]
    # Without the requirement, the early exit is the "fewest instructions": 4 per trip, no exponential.
    assert sass.steady_state_loop(instructions).mufu == 0
    loop = sass.steady_state_loop(instructions, 1 / 4)  # fp32: 16 loaded bytes = 4 elements = 4 MUFU
    assert loop.mufu == 4 and loop.instructions == 10 and loop.body_instructions == 10
    # The bf16 fused-forward demo above keeps its path (one MUFU for its rebase-free trip).
    demo = sass.parse_sass(SASS)["demo_kernel"]
    assert sass.steady_state_loop(demo, 1 / 32).instructions == 7
    with pytest.raises(ValueError, match="no path through the streaming loop runs 2 MUFU"):
        sass.steady_state_loop(demo, 1 / 16)


# A matmul tile kernel shaped like the fused head's forward: a tile loop (0x20-0xd0) holding one dot loop over H
# (0x30-0x80, two MMAs per trip) and an epilogue with one exponential.
TILE_SASS = """\
\tcode for sm_90a
\t\tFunction : tile_kernel
        /*0000*/                   MOV R2, RZ ;                           /* 0x0 */
        /*0010*/                   MOV R3, RZ ;                           /* 0x0 */
        /*0020*/                   MOV R4, RZ ;                           /* 0x0 */
        /*0030*/                   LDGSTS.E.BYPASS.128 [R5], desc[UR4][R6.64] ; /* 0x0 */
        /*0040*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR12], R24 ; /* 0x0 */
        /*0050*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR12], R24, gsb0 ; /* 0x0 */
        /*0060*/                   IADD3 R4, R4, 0x40, RZ ;               /* 0x0 */
        /*0070*/                   NOP ;                                  /* 0x0 */
        /*0080*/               @P0 BRA 0x30 ;                             /* 0x0 */
        /*0090*/                   FFMA R8, R24, R9, -R10 ;               /* 0x0 */
        /*00a0*/                   MUFU.EX2 R8, R8 ;                      /* 0x0 */
        /*00b0*/                   FADD R11, R11, R8 ;                    /* 0x0 */
        /*00c0*/                   IADD3 R3, R3, 0x40, RZ ;               /* 0x0 */
        /*00d0*/               @P1 BRA 0x20 ;                             /* 0x0 */
        /*00e0*/                   EXIT ;                                 /* 0x0 */
"""


def test_mma_shapes():
    hmma = sass.Instruction(0, "HMMA.16816.F32.BF16", "R1, R2, R3, R4")
    assert sass.mma_macs(hmma) == (16 * 8 * 16, 32)
    assert sass.mma_macs(sass.Instruction(0, "HMMA.1688.F32.TF32", "R1, R2, R3, R4")) == (16 * 8 * 8, 32)
    # cuobjdump's HGMMA opcode stops at the first lower-case letter: the shape continues in the operands.
    hgmma = sass.parse_sass(TILE_SASS)["tile_kernel"][4]
    assert (hgmma.opcode, sass.mma_macs(hgmma)) == ("HGMMA.64", (64 * 64 * 16, 128))
    with pytest.raises(ValueError, match="not a recognised MMA"):
        sass.mma_macs(sass.Instruction(0, "HFMA2.MMA", "R1, -RZ, RZ, 0, 0"))


def test_matmul_tile_stats_and_per_logit():
    instructions = sass.parse_sass(TILE_SASS)["tile_kernel"]
    tiles = sass.matmul_tiles(instructions, dots=1)
    (dot,) = tiles.dot_loops
    assert (dot.instructions, dot.mma, dot.mufu) == (5, 2, 0)  # the NOP is not counted
    assert dot.macs_per_thread == 2 * 64 * 64 * 16 / 128
    assert (tiles.outside_instructions, tiles.outside_mufu, tiles.outside_ffma) == (6, 1, 1)
    assert tiles.mma_opcodes == ["HGMMA.64x64x16.F32.BF16"]
    # H = 256 in slices of 64: 4 trips of the dot loop per tile; 32 logits per thread.
    figures = sass.per_logit(tiles, 256, 64, 32)
    assert figures["sass"] == (5 * 4 + 6) / 32 and figures["mufu"] == 1 / 32 and figures["epilogue_sass"] == 6 / 32
    assert sass.per_logit(tiles, 257, 64, 32)["sass"] == (5 * 5 + 6) / 32  # a partial slice is one more trip
    with pytest.raises(ValueError, match="expected 2 dot loop"):
        sass.matmul_tiles(instructions, dots=2)
    with pytest.raises(ValueError, match="no tile loop"):
        sass.matmul_tiles(sass.parse_sass(EARLY_EXIT_SASS)["early_exit_kernel"], dots=1)


def test_matmul_prediction():
    h100 = sass.GPUS["H100-SXM5"]
    clocks = h100["sms"] * h100["clock_hz"]
    flops = 2 * 4096
    peak_rate = h100["tensor_flops"] / flops
    # Few instructions per logit: the tensor cores are the limit.
    fast = sass.predict_matmul("H100-SXM5", 10.0, 0.5, 0.0, flops, True, 100.0)
    assert fast["predicted_bound"] == "peak" and fast["predicted_fraction_of_peak"] == 1.0
    assert fast["hbm_no_reuse_fraction_of_peak"] == pytest.approx(h100["hbm_bytes_per_s"] / 100.0 / peak_rate)
    # Twice the instructions the issue rate allows at the peak: half the peak, issue-bound.
    sass_at_peak = clocks * sass.ISSUE_PER_CLOCK_PER_SM / peak_rate
    slow = sass.predict_matmul("H100-SXM5", 2 * sass_at_peak, 0.5, 0.0, flops, True, 100.0)
    assert slow["predicted_bound"] == "issue" and slow["predicted_fraction_of_peak"] == pytest.approx(0.5)
    # fp32 dots: the FP32 pipe is the peak; FFMAs beyond one per multiply-add lower it.
    fp32 = sass.predict_matmul("H100-SXM5", 1.0, 0.0, 2 * 4096, flops, False, 100.0)
    assert fp32["peak"] == "fp32" and fp32["peak_flops"] == 2 * h100["fp32_lanes"] * clocks
    assert fp32["predicted_bound"] == "fp32-pipe" and fp32["predicted_fraction_of_peak"] == pytest.approx(0.5)
