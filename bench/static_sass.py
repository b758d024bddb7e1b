"""Reading compiled GPU code without a GPU: ptxas -v logs, cuobjdump SASS, occupancy, a predicted bandwidth.

Pure text processing and arithmetic (no compiler, no triton import), so every rule here is unit-tested on
fixed inputs in tests/kernels/test_static_sass.py. bench/static.py runs the tools and feeds them in.

The bandwidth figures are PREDICTED from the instruction counts with the issue-15 model, never measured:
an SM issues 4 warp-instructions (128 thread-instructions) per clock, and the special-function unit that
runs exp2/log2 (MUFU) delivers 16 results per clock per SM; a kernel streaming `b` HBM bytes per element
reaches at most min(1, issue rate / (BW / b), MUFU rate / (BW / b)) of the HBM bandwidth BW, and no more
than the bytes its resident warps keep in flight cover (Little's law with an assumed loaded DRAM latency).

The fused LM head's kernels are matmul tiles (tl.dot), not streams, and are read differently (matmul_tiles,
predict_matmul): per logit of the recomputed [BLOCK_N, BLOCK_V] tile, the SASS of the dot loops (one trip per
BLOCK_H slice of the hidden size H) times the trips, plus the rest of the tile loop, over the logits one thread
holds; the MMA instructions per trip, with the multiply-adds they perform checked against the tile's; and a
PREDICTED fraction of the compute peak (tensor cores for 16-bit inputs, the FP32 pipe for fp32 ones), limited by
issue and MUFU, beside the HBM bound when no operand tile is ever reused from L2 (the worst case).
"""
import math
import re
from dataclasses import asdict, dataclass

# Datasheet figures; the sustained clock under a memory-bound load is the issue's ~1.75 GHz, not the boost.
# tensor_flops: dense bf16/fp16 tensor-core peak (datasheet, no sparsity; H200 has H100's compute);
# fp32_lanes: FP32 FMA lanes per SM (A100 64, Hopper 128), which run the fp32 head's "ieee" dots.
GPUS = {
    "A100-SXM4-80GB": dict(arch=80, hbm_bytes_per_s=2.039e12, sms=108, clock_hz=1.41e9, tensor_flops=312e12,
                           fp32_lanes=64),
    "H100-SXM5": dict(arch=90, hbm_bytes_per_s=3.35e12, sms=132, clock_hz=1.755e9, tensor_flops=989e12,
                      fp32_lanes=128),
    "H200-SXM": dict(arch=90, hbm_bytes_per_s=4.8e12, sms=132, clock_hz=1.755e9, tensor_flops=989e12,
                     fp32_lanes=128),
}
ISSUE_PER_CLOCK_PER_SM = 128  # 4 schedulers x 32 lanes
MUFU_PER_CLOCK_PER_SM = 16  # ex2/lg2/rcp: 16 results per clock per SM on sm_80 and sm_90
ASSUMED_DRAM_LATENCY_S = 600e-9  # loaded HBM latency assumed for the Little's-law bound (not measured)

# Per SM (CUDA occupancy calculator figures for compute capability 8.0 and 9.0).
SM_LIMITS = {
    80: dict(regs=65536, max_warps=64, max_blocks=32, smem=167936, smem_reserved_per_block=1024),
    90: dict(regs=65536, max_warps=64, max_blocks=32, smem=233472, smem_reserved_per_block=1024),
}
REG_ALLOC_UNIT_PER_WARP = 256


# ---------------------------------------------------------------- ptxas -v

@dataclass
class PtxasFunction:
    name: str
    registers: int = 0
    spill_store_bytes: int = 0
    spill_load_bytes: int = 0
    stack_bytes: int = 0

    @property
    def spills(self) -> bool:
        return self.spill_store_bytes > 0 or self.spill_load_bytes > 0


_FN = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas_log(log: str) -> dict[str, PtxasFunction]:
    """Per entry function: registers, spill stores/loads and stack frame, as `ptxas -v` prints them.

    A log without any "Used N registers" line raises: a check that reads nothing must not pass."""
    functions: dict[str, PtxasFunction] = {}
    current = None
    for line in log.splitlines():
        if m := _FN.search(line):
            current = functions.setdefault(m.group(1), PtxasFunction(m.group(1)))
        elif m := _PROPS.search(line):
            current = functions.setdefault(m.group(1), PtxasFunction(m.group(1)))
        elif (m := _SPILL.search(line)) and current is not None:
            current.stack_bytes = int(m.group(1))
            current.spill_store_bytes = int(m.group(2))
            current.spill_load_bytes = int(m.group(3))
        elif (m := _REGS.search(line)) and current is not None:
            current.registers = int(m.group(1))
    if not functions or not any(f.registers for f in functions.values()):
        raise ValueError("no 'Used N registers' line in the ptxas log (was ptxas run with -v?):\n" + log[-2000:])
    return functions


# ---------------------------------------------------------------- SASS

@dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # with modifiers, e.g. LDG.E.128
    operands: str
    predicated: bool = False

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


_SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[0-9T]\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_SASS_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)")


def parse_sass(text: str) -> dict[str, list[Instruction]]:
    """`cuobjdump -sass` output -> instructions per function (the encoding comment lines are skipped)."""
    functions: dict[str, list[Instruction]] = {}
    current = None
    for line in text.splitlines():
        if m := _SASS_FUNCTION.match(line):
            current = functions.setdefault(m.group(1), [])
        elif current is not None and (m := _SASS_LINE.match(line)):
            predicated = bool(m.group(2)) and "PT" not in m.group(2).replace("!", "")
            current.append(Instruction(int(m.group(1), 16), m.group(3), m.group(4).strip(), predicated))
    return functions


_BRANCH_TARGET = re.compile(r"^(?:`\()?(0x[0-9a-f]+)")


def loops(instructions: list[Instruction]) -> list[tuple[int, int]]:
    """(first, last) index of every loop body: a branch back to an earlier address closes a loop."""
    index = {ins.address: i for i, ins in enumerate(instructions)}
    found = []
    for i, ins in enumerate(instructions):
        if ins.base != "BRA":
            continue
        m = _BRANCH_TARGET.match(ins.operands)
        if m and int(m.group(1), 16) < ins.address and int(m.group(1), 16) in index:
            found.append((index[int(m.group(1), 16)], i))
    return found


_LOAD_WIDTH = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def global_bytes(instruction: Instruction) -> int:
    """Bytes one thread moves with an LDG/STG (32-bit when no width modifier)."""
    for part in instruction.opcode.split(".")[1:]:
        if part in _LOAD_WIDTH:
            return _LOAD_WIDTH[part]
    return 4


@dataclass
class LoopStats:
    instructions: int  # SASS instructions on the steady-state path of the loop (see steady_state_path)
    vector_load_bytes: int  # bytes per thread loaded by 8/16-byte LDGs in one trip of the body
    mufu: int  # MUFU (exp2/log2/rcp) instructions in the body
    load_bytes: int  # bytes per thread loaded by all LDGs in one trip (what the trip keeps in flight)
    opcodes: dict  # opcode base -> count on that path, for the report
    body_instructions: int = 0  # every instruction between the loop's head and its back-branch


def steady_state_path(body: list[Instruction], min_mufu: int = 0) -> list[Instruction] | None:
    """The fewest instructions from the loop head to its back-branch that execute at least `min_mufu` MUFU
    instructions, where a conditional branch may be taken or not and an unconditional one must be taken.
    A region the code jumps over when nothing changes (the fused forward's rebase, run only when a block
    raises the row max) is not part of the steady state; straight-line loops are their whole body.
    `min_mufu` keeps the path on the work: without it, a branch that skips the elements' exponentials (the
    CUDA forward's early exit while no finite logit has been seen, a masked element) would be the
    "fewest instructions". None when no path has that many MUFU."""
    index = {ins.address: i for i, ins in enumerate(body)}
    inf = float("inf")
    # cost[i][k]: fewest instructions from i to the end of the body, inclusive, with k more MUFU still needed.
    cost = [[inf] * (min_mufu + 1) for _ in body]
    step = [[None] * (min_mufu + 1) for _ in body]
    for i in range(len(body) - 1, -1, -1):
        ins = body[i]
        successors = []
        if i + 1 < len(body):
            successors = [i + 1]
            if ins.base == "BRA":
                m = _BRANCH_TARGET.match(ins.operands)
                target = index.get(int(m.group(1), 16)) if m else None
                if target is not None and target > i:
                    successors = [target] + ([i + 1] if ins.predicated else [])
        own = 0 if ins.base == "NOP" else 1
        for k in range(min_mufu + 1):
            left = max(k - (ins.base == "MUFU"), 0)
            if not successors:
                cost[i][k], step[i][k] = (own, None) if left == 0 else (inf, None)
                continue
            best = min((cost[j][left], j) for j in successors)
            cost[i][k], step[i][k] = own + best[0], best[1]
    if not body or cost[0][min_mufu] == inf:
        return None
    path, i, k = [], 0, min_mufu
    while i is not None:
        path.append(body[i])
        i, k = step[i][k], max(k - (body[i].base == "MUFU"), 0)
    return path


def steady_state_loop(instructions: list[Instruction], mufu_per_vector_byte: float = 0.0) -> LoopStats | None:
    """The loop that streams the row: the innermost loops holding vector LDGs are the candidates (an outer
    loop over rows contains the inner one); of those, the one loading the most bytes (ties: the longest).
    Counted along its steady-state path, which must run `mufu_per_vector_byte` MUFU per byte the trip loads
    with vector LDGs (1 / element size for erpo's row kernels: one exponential per element). None when the
    function has no loop (flat kernels); ValueError when no path through the loop runs that many MUFU."""
    found = loops(instructions)
    stats = {span: body_stats(instructions[span[0]:span[1] + 1]) for span in found}
    streaming = [span for span in found if stats[span].vector_load_bytes]
    innermost = [outer for outer in streaming
                 if not any(inner != outer and outer[0] <= inner[0] and inner[1] <= outer[1] for inner in streaming)]
    candidates = innermost or found
    if not candidates:
        return None
    first, last = max(candidates, key=lambda span: (stats[span].vector_load_bytes, stats[span].instructions))
    needed = int(stats[(first, last)].vector_load_bytes * mufu_per_vector_byte)
    path = steady_state_path(instructions[first:last + 1], needed)
    if path is None:
        raise ValueError(f"no path through the streaming loop runs {needed} MUFU (one per loaded element)")
    path_stats = body_stats(path)
    path_stats.body_instructions = stats[(first, last)].instructions
    return path_stats


def body_stats(body: list[Instruction]) -> LoopStats:
    counted = [ins for ins in body if ins.base != "NOP"]
    opcodes: dict[str, int] = {}
    for ins in counted:
        opcodes[ins.base] = opcodes.get(ins.base, 0) + 1
    vector = sum(global_bytes(ins) for ins in counted if ins.base == "LDG" and global_bytes(ins) >= 8)
    loaded = sum(global_bytes(ins) for ins in counted if ins.base == "LDG")
    return LoopStats(len(counted), vector, opcodes.get("MUFU", 0), loaded,
                     dict(sorted(opcodes.items(), key=lambda kv: -kv[1])), len(counted))


# ---------------------------------------------------------------- occupancy and the prediction

def occupancy(arch: int, registers: int, threads: int, shared_bytes: int) -> dict:
    """Resident blocks and warps per SM, and what limits them (CUDA occupancy-calculator rules)."""
    limits = SM_LIMITS[arch]
    warps = math.ceil(threads / 32)
    regs_per_warp = math.ceil(max(registers, 1) * 32 / REG_ALLOC_UNIT_PER_WARP) * REG_ALLOC_UNIT_PER_WARP
    by = {
        "blocks": limits["max_blocks"],
        "warps": limits["max_warps"] // warps,
        "registers": limits["regs"] // (regs_per_warp * warps),
        "shared": limits["smem"] // (shared_bytes + limits["smem_reserved_per_block"]),
    }
    blocks = min(by.values())
    return {
        "blocks_per_sm": blocks,
        "warps_per_sm": blocks * warps,
        "occupancy": blocks * warps / limits["max_warps"],
        "limited_by": min(by, key=lambda k: by[k]),
    }


def predict_bandwidth_fraction(gpu: str, instructions_per_element: float, mufu_per_element: float,
                               hbm_bytes_per_element: float, bytes_in_flight_per_sm: float) -> dict:
    """PREDICTED fraction of HBM bandwidth and which bound sets it (see the module doc)."""
    spec = GPUS[gpu]
    hbm_rate = spec["hbm_bytes_per_s"] / hbm_bytes_per_element  # elements/s the memory can feed
    issue_rate = spec["sms"] * ISSUE_PER_CLOCK_PER_SM * spec["clock_hz"] / max(instructions_per_element, 1e-9)
    mufu_rate = (spec["sms"] * MUFU_PER_CLOCK_PER_SM * spec["clock_hz"] / mufu_per_element
                 if mufu_per_element else math.inf)
    latency_fraction = bytes_in_flight_per_sm * spec["sms"] / (spec["hbm_bytes_per_s"] * ASSUMED_DRAM_LATENCY_S)
    bounds = {
        "issue": issue_rate / hbm_rate,
        "mufu": mufu_rate / hbm_rate,
        "latency": latency_fraction,
        "hbm": 1.0,
    }
    bound = min(bounds, key=lambda k: bounds[k])
    return {
        "predicted_fraction": min(1.0, bounds[bound]),
        "predicted_bound": bound,
        "instruction_budget_per_element": spec["sms"] * ISSUE_PER_CLOCK_PER_SM * spec["clock_hz"] / hbm_rate,
        "predicted_bounds": bounds,
    }


# ---------------------------------------------------------------- matmul tiles (the fused LM head)

MMA_OPCODES = ("HMMA", "HGMMA")  # sm_80 warp MMA, sm_90 warpgroup MMA (HFMA2.MMA is an FMA, not one of them)
_HMMA_SHAPE = re.compile(r"^HMMA\.(\d\d)(\d)(\d+)\.")  # HMMA.16816: m16 n8 k16
_HGMMA_SHAPE = re.compile(r"^HGMMA\.(\d+)\s*x(\d+)x(\d+)")  # HGMMA.64x64x16 (cuobjdump: opcode "HGMMA.64")


def mma_macs(instruction: Instruction) -> tuple[int, int]:
    """(multiply-adds one instruction performs, threads that issue it together): an HMMA is one warp's
    m x n x k; an HGMMA is one warpgroup's (4 warps each issue the same instruction)."""
    text = f"{instruction.opcode} {instruction.operands}"
    if instruction.base == "HMMA" and (m := _HMMA_SHAPE.match(text)):
        return int(m.group(1)) * int(m.group(2)) * int(m.group(3)), 32
    if instruction.base == "HGMMA" and (m := _HGMMA_SHAPE.match(text)):
        return int(m.group(1)) * int(m.group(2)) * int(m.group(3)), 128
    raise ValueError(f"not a recognised MMA instruction: {text}")


@dataclass
class DotLoop:
    instructions: int  # every instruction of one trip (one BLOCK_H slice), no path analysis
    mma: int  # MMA instructions per trip, per warp
    macs_per_thread: float  # multiply-adds per trip, per thread of the block (MMA shapes / issuing threads)
    ffma: int
    mufu: int


@dataclass
class TileStats:
    dot_loops: list  # DotLoop per tl.dot loop over H inside the tile loop
    outside_instructions: int  # the rest of the tile loop's body: softmax/gradient epilogue, pipeline prologue
    outside_mufu: int
    outside_ffma: int
    mma_opcodes: list  # distinct MMA opcodes with their shapes, for the report


def matmul_tiles(instructions: list[Instruction], dots: int) -> TileStats:
    """The tile loop (the outermost loop holding other loops: one trip per recomputed logits tile) and the
    `dots` innermost loops in it (the tl.dot loops over H). ValueError when the SASS is not shaped like that."""
    found = loops(instructions)

    def inside(inner, outer):
        return inner != outer and outer[0] <= inner[0] and inner[1] <= outer[1]

    tile_loops = [span for span in found if any(inside(other, span) for other in found)]
    if not tile_loops:
        raise ValueError("no tile loop (a loop holding the dot loops) in the SASS")
    tile = max(tile_loops, key=lambda span: span[1] - span[0])
    innermost = [span for span in found if inside(span, tile) and not any(inside(o, span) for o in found)]
    if len(innermost) != dots:
        raise ValueError(f"expected {dots} dot loop(s) inside the tile loop, found {len(innermost)}")
    in_dots = set()
    dot_loops = []
    for first, last in sorted(innermost):
        body = [ins for ins in instructions[first:last + 1] if ins.base != "NOP"]
        in_dots.update(range(first, last + 1))
        macs = sum(m / threads for m, threads in (mma_macs(ins) for ins in body if ins.base in MMA_OPCODES))
        dot_loops.append(DotLoop(len(body), sum(ins.base in MMA_OPCODES for ins in body), macs,
                                 sum(ins.base == "FFMA" for ins in body), sum(ins.base == "MUFU" for ins in body)))
    outside = [ins for i, ins in enumerate(instructions[tile[0]:tile[1] + 1], tile[0])
               if i not in in_dots and ins.base != "NOP"]
    opcodes = sorted({f"{ins.opcode}{ins.operands.split()[0] if ins.base == 'HGMMA' else ''}"
                      for ins in instructions if ins.base in MMA_OPCODES})
    return TileStats(dot_loops, len(outside), sum(ins.base == "MUFU" for ins in outside),
                     sum(ins.base == "FFMA" for ins in outside), opcodes)


def per_logit(tiles: TileStats, hidden_size: int, block_h: int, logits_per_thread: float) -> dict:
    """Per logit of the recomputed tile, at hidden size H: each dot loop runs ceil(H / BLOCK_H) trips per tile."""
    trips = math.ceil(hidden_size / block_h)
    per_tile = lambda field, outside: (sum(getattr(d, field) for d in tiles.dot_loops) * trips + outside)
    return {
        "sass": per_tile("instructions", tiles.outside_instructions) / logits_per_thread,
        "mufu": per_tile("mufu", tiles.outside_mufu) / logits_per_thread,
        "ffma": per_tile("ffma", tiles.outside_ffma) / logits_per_thread,
        "epilogue_sass": tiles.outside_instructions / logits_per_thread,
        "dot_sass_per_trip": sum(d.instructions for d in tiles.dot_loops) / logits_per_thread,
    }


def predict_matmul(gpu: str, sass_per_logit: float, mufu_per_logit: float, ffma_per_logit: float,
                   flops_per_logit: float, tensor_cores: bool, hbm_bytes_per_logit: float) -> dict:
    """PREDICTED fraction of the compute peak (tensor cores, or the FP32 pipe for fp32 dots) and what limits
    it: min(1, issue, MUFU, FP32-pipe rate over the peak rate, in logits/s). The HBM bound with no operand reuse
    from L2 is reported beside it, as a fraction of the same peak, not folded in (L2 reuse is not modelled)."""
    spec = GPUS[gpu]
    rate = spec["sms"] * spec["clock_hz"]  # SM-clocks per second
    peak_flops = spec["tensor_flops"] if tensor_cores else 2 * spec["fp32_lanes"] * rate
    peak_rate = peak_flops / flops_per_logit  # logits/s at the compute peak
    bounds = {"issue": rate * ISSUE_PER_CLOCK_PER_SM / max(sass_per_logit, 1e-9) / peak_rate,
              "mufu": rate * MUFU_PER_CLOCK_PER_SM / mufu_per_logit / peak_rate if mufu_per_logit else math.inf}
    if not tensor_cores:
        bounds["fp32-pipe"] = rate * spec["fp32_lanes"] / max(ffma_per_logit, 1e-9) / peak_rate
    bounds["peak"] = 1.0
    bound = min(bounds, key=lambda k: bounds[k])
    return {
        "peak": "tensor" if tensor_cores else "fp32",
        "peak_flops": peak_flops,
        "predicted_fraction_of_peak": min(1.0, bounds[bound]),
        "predicted_bound": bound,
        "predicted_bounds": bounds,
        "hbm_no_reuse_fraction_of_peak": spec["hbm_bytes_per_s"] / hbm_bytes_per_logit / peak_rate,
    }


def as_dict(obj):
    return asdict(obj)
