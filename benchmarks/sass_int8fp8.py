"""What the int8fp8 attention kernel costs per key block, read from its SASS: no GPU needed.

    python benchmarks/sass_int8fp8.py [--out FILE.json]

Compiles pipeline/kernels/attention_int8fp8.py's kernel for Hopper (sm_90) with the installed Triton
and the ptxas it ships, disassembles it, and counts the instructions of the main loop (one BLOCK_M x
BLOCK_N block of logits per iteration). From the counts it prints the loop's cost per logit in SM clocks
against the tensor cores' and the SFUs', at the H100's rates:
  tensor cores  4,096 dense 8-bit MACs per SM per clock; a logit costs 2 x HEAD_DIM MACs (Q.K^T, P.V)
  SFU (MUFU)    16 exp2 per SM per clock; one per logit
  issue         4 warp instructions per SM per clock (one per scheduler)
benchmarks/RESULTS.md ("Why 12 s on one H100 is out of reach") reads these numbers.
"""

import argparse
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import triton
import triton.backends.nvidia
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.kernels import attention_int8fp8 as kernel  # noqa: E402

HEAD_DIM = 128
TENSOR_MACS_PER_CLOCK = 4096  # dense 8-bit, per SM (H100: 1,979 TFLOP/s = 132 SMs x 1.83 GHz x 2 x 4,096)
SFU_PER_CLOCK = 16  # MUFU.EX2 per SM per clock (compute capability 9.0)
ISSUE_PER_CLOCK = 4  # warp instructions per SM per clock


def compile_sm90():
    signature = {
        "q_desc": f"tensordesc<i8[{kernel.BLOCK_M},{HEAD_DIM}]>", "QS": "*fp32",
        "k_desc": f"tensordesc<i8[{kernel.BLOCK_N},{HEAD_DIM}]>", "KS": "*fp32",
        "v_desc": f"tensordesc<fp8e4nv[{HEAD_DIM},{kernel.BLOCK_N}]>", "VS": "*fp32", "VM": "*fp32",
        "O": "*bf16", "query_len": "i32", "key_len": "i32", "full_blocks": "i32", "padded_key_len": "i32",
        "heads": "i32", "HEAD_DIM": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
        "PARTIAL_BLOCK": "constexpr",
    }
    constants = {"HEAD_DIM": HEAD_DIM, "BLOCK_M": kernel.BLOCK_M, "BLOCK_N": kernel.BLOCK_N, "PARTIAL_BLOCK": True}
    names = list(signature)
    source = ASTSource(fn=kernel._int8fp8_attention_kernel, signature=signature,
                       constexprs={(names.index(k),): v for k, v in constants.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": kernel.NUM_WARPS, "num_stages": kernel.NUM_STAGES})


def tool(name: str, *args: str) -> str:
    path = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", name)
    return subprocess.run([path, *args], capture_output=True, text=True, check=True).stdout


def main_loop(sass: str) -> list[str]:
    """Opcodes of the loop over the full key blocks: the one conditional backward branch around MMAs
    (the others are the barrier waits' retry loops, out of line at the end)."""
    lines = sass.splitlines()
    opcode = re.compile(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")
    labels = {m[1]: i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
    loops = []
    for end, line in enumerate(lines):
        m = re.search(r"@!?P\d+\s+BRA `\((\.L_x_\d+)\)", line)
        if m and labels.get(m[1], end) < end:
            body = [m[1] for text in lines[labels[m[1]] : end + 1] if (m := opcode.match(text))]
            if any(op.endswith("GMMA") for op in body):
                loops.append(body)
    if len(loops) != 1:
        raise RuntimeError(f"expected one loop with MMAs in the kernel's SASS, found {len(loops)}")
    return loops[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the counts here as JSON")
    args = parser.parse_args()

    compiled = compile_sm90()
    cubin = Path("/tmp") / f"int8fp8_sm90_{os.getpid()}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    usage = tool("cuobjdump", "--dump-resource-usage", str(cubin)).strip().splitlines()[-1].strip()
    ops = Counter(main_loop(tool("nvdisasm", "-c", str(cubin))))
    cubin.unlink()

    threads = 32 * kernel.NUM_WARPS
    logits_per_thread = kernel.BLOCK_M * kernel.BLOCK_N / threads
    per_warp = sum(ops.values())
    clocks = {  # SM clocks per logit
        "tensor_cores": 2 * HEAD_DIM / TENSOR_MACS_PER_CLOCK,
        "sfu": ops["MUFU"] / logits_per_thread / SFU_PER_CLOCK,
        "issue": per_warp / logits_per_thread / (32 * ISSUE_PER_CLOCK),
    }
    result = {
        "triton": triton.__version__, "block": [kernel.BLOCK_M, kernel.BLOCK_N], "num_warps": kernel.NUM_WARPS,
        "num_stages": kernel.NUM_STAGES, "resource_usage": usage, "loop_instructions_per_warp": per_warp,
        "instructions_per_logit": per_warp / logits_per_thread, "opcodes": dict(ops.most_common()),
        "clocks_per_logit": clocks, "issue_bound_fraction_of_peak": clocks["tensor_cores"] / clocks["issue"],
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
