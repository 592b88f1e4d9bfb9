"""Compile the kernels for sm_90 on a machine without a GPU and report what ptxas says.

For each (kernel, dtype, shape) the dispatcher's config is compiled to PTX with
Triton's NVIDIA backend, then assembled with ptxas: registers per thread, spill
bytes, shared memory, and the MMA instructions used (mma.sync vs wgmma). A GPU
run says how fast; this says what the compiler made of the code, in seconds.

    python3 perf/sm90_report.py [--shapes 8x512 128x1024] [--dtypes bf16 fp32]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
from unittest import mock

os.environ.pop("TRITON_INTERPRET", None)   # the real compiler, not the interpreter
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402

from triton_lstm import tuning  # noqa: E402
from triton_lstm.dispatch import KernelConfig, heuristic_config, padded, state_dtype  # noqa: E402
from triton_lstm.kernels.backward import lstm_backward_kernel  # noqa: E402
from triton_lstm.kernels import gemm  # noqa: E402
from triton_lstm.kernels.forward import lstm_forward_kernel  # noqa: E402
from triton_lstm.kernels.step import lstm_step_kernel, step_config  # noqa: E402
from triton_lstm.kernels.wavefront import (lstm_wavefront_backward_kernel,  # noqa: E402
                                           lstm_wavefront_kernel, wavefront_config)

DTYPES = {"fp32": ("fp32", torch.float32), "bf16": ("bf16", torch.bfloat16),
          "fp16": ("fp16", torch.float16), "fp64": ("fp64", torch.float64)}


def state_type(dtype) -> str:
    """The Triton type of the kernels' cell state and gate math for inputs of `dtype`."""
    return {torch.float32: "fp32", torch.float64: "fp64"}[state_dtype(dtype)]
NUM_SMS = 132
ELEMENT_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "f64": 8}


def signature(kernel, tensor_types: dict, constexprs: dict) -> dict:
    """Triton types for every argument: tensors from tensor_types, sizes i32, the rest constexpr."""
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in tensor_types:
            sig[name] = "*" + tensor_types[name]
        else:
            sig[name] = "i32"
    return sig


def compile_one(kernel, tensor_types, constexprs, num_warps, num_stages=1):
    sig = signature(kernel, tensor_types, constexprs)
    pointers = [i for i, name in enumerate(kernel.arg_names) if sig[name].startswith("*")]
    attrs = {(i,): [["tt.divisibility", 16]] for i in pointers}
    if kernel.is_gluon():
        from triton.experimental.gluon._runtime import GluonASTSource
        source = GluonASTSource(kernel, sig, constexprs, attrs)
    else:
        source = ASTSource(kernel, sig, constexprs, attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def compiled_row(compiled, **fields) -> dict:
    """ptxas's registers and spills, shared memory, the MMA kind, the width of the
    shared-state loads and the pair mark checks of a compiled kernel."""
    ptx = compiled.asm["ptx"]
    row = ptxas_report(ptx)
    row.update(fields, shared=compiled.metadata.shared, bar_sync=ptx.count("bar.sync"),
               # polls that check a pair of 16-bit marks at once (barrier.marks)
               pair_checks=ptx.count("0xFFFEFFFE"),
               # clock reads of a step's timeline (kernels/timeline.py)
               stamps=ptx.count("%globaltimer"),
               state_load=state_load_bytes(ptx, compiled.asm["ttgir"]), barrier=barrier_kind(ptx),
               mma="wgmma" if "wgmma" in ptx else ("mma.sync" if "mma.sync" in ptx else "fma"))
    return row


def barrier_kind(ptx: str) -> str:
    """How the programs wait for each other: "dsmem" (h pushed into their shared memory,
    kernels/dsmem.py), "cluster" (the hardware cluster barrier), "counter" (atomics on a
    counter in global memory) or "none" (dataflow waits)."""
    if "st.async" in ptx:
        return "dsmem"
    if "barrier.cluster" in ptx:
        return "cluster"
    return "counter" if re.search(r"\batom\.", ptx) else "none"


def state_load_bytes(ptx: str, ttgir: str):
    """Bytes per instruction of the narrowest load of state other programs write (h, dG: the
    .cg or volatile loads of barrier.load_written; in a pipelined loop, their asynchronous
    copies), or None if there is none. 16 is a vectorised load; 2 or 4 means the tile is
    read one element at a time."""
    widths = [int(vec or 1) * int(bits) // 8 for vec, bits in
              re.findall(r"ld(?:\.volatile\.global|\.global\.cg)[.a-z]*?(?:\.v(\d))?\.[bfsu](\d+)", ptx)]
    widths += [int(contiguity) * ELEMENT_BYTES[elem] for contiguity, elem in re.findall(
        r"async_copy_global_to_local .*cache_?[mM]odifier = cg.*contiguity = (\d+).*"
        r"x!tt\.ptr<(\w+)>", ttgir)]
    if re.search(r"async_copy_global_to_local .*cache_?[mM]odifier = cg", ttgir) and not widths:
        # A Gluon kernel's own copies (no contiguity in its IR): the cp.async they became.
        widths += [int(size, 0) for size in re.findall(
            r"cp\.async\.cg\.shared\.global \[[^]]*\], \[[^]]*\], (0x[0-9a-f]+|\d+)", ptx)]
    return min(widths, default=None)


def ptxas_report(ptx: str) -> dict:
    # The ptxas Triton itself runs for sm_90, so the numbers are the ones a GPU run gets.
    ptxas = get_ptxas(90).path
    ptx = re.sub(r"\.version \d+\.\d+", ".version 8.1", ptx)   # accepted by older ptxas too
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "k.ptx"
        path.write_text(ptx)
        out = subprocess.run([ptxas, "-arch=sm_90a", "-v", str(path), "-o", str(path) + ".o"],
                             capture_output=True, text=True)
    text = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.findall(r"(\d+) bytes spill (stores|loads)", text)
    return {"regs": int(regs.group(1)) if regs else None,
            "spill": max((int(n) for n, _ in spill), default=0), "ptxas_ok": out.returncode == 0}


def report(kernel_name, dtype_name, batch, hidden, directions=1, proj=0, restarts=False,
           ckpt_every=0, config=None, resumed=False, stepped=False, bias_sums=False,
           stamps=False):
    """One persistent kernel with the dispatcher's config (or `config`), I = H; `resumed`: the
    forward's launch that starts at a later step (the forward in chunks, overlap.py);
    `stepped`: the kernel of a launch per step instead (the fallback); `bias_sums`: the
    backward sums dG for the bias gradient as it goes (TRITON_LSTM_BIAS_SUMS=kernel);
    `stamps`: the kernel records each step's timeline (kernels/timeline.py)."""
    tname, dtype = DTYPES[dtype_name]
    cfg = config or heuristic_config(batch, hidden, dtype, max(1, NUM_SMS // directions),
                                     kernel_name, bool(proj))
    R = proj or hidden
    num_h = cfg.num_h_blocks(hidden)
    block_r = max(16, triton.next_power_of_2(triton.cdiv(R, num_h)))
    common = dict(H=hidden, HP=padded(hidden), R=R, RP=padded(R), D=directions, PROJ=bool(proj),
                  BLOCK_B=cfg.block_b, BLOCK_H=cfg.block_h, BLOCK_R=block_r, BLOCK_K=cfg.block_k,
                  SPLIT_K=min(cfg.split_k, padded(min(hidden, R)) // 16), RESIDENT=cfg.resident,
                  HAS_H0=True, HAS_LENGTHS=False, PERSISTENT=not stepped,
                  DOT_PRECISION="tf32" if dtype == torch.float32 else "ieee", REVERSE=True,
                  HAS_RESTARTS=restarts, RESTART_FROM_STATE=restarts,
                  INNER_STAGES=cfg.inner_stages if cfg.inner_stages > 1 else None,
                  PREFETCH_AFTER_ARRIVE=cfg.prefetch_after_arrive,
                  CHUNKED=cfg.resident and cfg.chunked, DATAFLOW=cfg.dataflow,
                  CLUSTER=cfg.cluster)
    acc = state_type(dtype)
    if kernel_name == "forward":
        kernel = lstm_forward_kernel
        types = dict(gx=tname, w_hh=tname, w_hr=tname, h0=tname, c0=tname, lengths="i32",
                     y=tname, h_n=tname, r_all=tname, c_state=acc, gates=acc, c_all=acc,
                     restarts="i8", hw_restart=acc, c_restart=tname, h_ckpt=tname, c_ckpt=acc,
                     stamps="i64", counters="i32")
        constexprs = dict(common, SAVE=not ckpt_every, CKPT_EVERY=ckpt_every,
                          DSMEM=cfg.dsmem and not proj and not resumed, RESUMED=resumed,
                          STAMPS=stamps)
    else:
        kernel = lstm_backward_kernel
        types = dict(dy=tname, dh_n=tname, dc_state=acc, gates=acc, c_all=acc, c0=tname,
                     lengths="i32", w_hh=tname, w_hr=tname, dgates=tname, dh_all=tname,
                     dh_parts=acc, dh0=tname, restarts="i8", c_restart=tname, dh_restart=acc,
                     dc_restart=acc, bias_sums=acc, stamps="i64", counters="i32")
        constexprs = dict(common, HAS_DY=True, HAS_DHN=True, GATE_SPLIT=cfg.gate_split,
                          DSMEM=cfg.dsmem and not proj, BIAS_SUMS=bias_sums, STAMPS=stamps)
    compiled = compile_one(kernel, types, constexprs, cfg.num_warps)
    return compiled_row(compiled, kernel=kernel_name, dtype=dtype_name, B=batch, H=hidden,
                        D=directions, proj=proj, tile=f"{cfg.block_b}x{cfg.block_h}",
                        resident=cfg.resident, split_k=cfg.split_k, warps=cfg.num_warps,
                        gate_split=kernel_name == "backward" and cfg.gate_split)


def report_wavefront(dtype_name, batch, hidden, layers, config=None, kernel_name="wavefront",
                     dropout=False):
    """A stacked-layer wavefront (kernels/wavefront.py), the forward ("wavefront") or the
    backward ("wavefront-backward"), with its heuristic tiles (or `config`), with or
    without dropout between layers."""
    tname, dtype = DTYPES[dtype_name]
    backward = kernel_name == "wavefront-backward"
    cfg = config or wavefront_config(batch, hidden, layers, dtype, NUM_SMS,
                                     "backward" if backward else "forward")
    constexprs = dict(H=hidden, HP=padded(hidden), BLOCK_B=cfg.block_b, BLOCK_H=cfg.block_h,
                      BLOCK_R=16, BLOCK_K=cfg.block_k,
                      SPLIT_K=min(cfg.split_k, padded(hidden) // 16), RESIDENT=cfg.resident,
                      HAS_LENGTHS=False, HAS_DROPOUT=dropout, PERSISTENT=True,
                      DOT_PRECISION="tf32" if dtype == torch.float32 else "ieee",
                      INNER_STAGES=cfg.inner_stages if cfg.inner_stages > 1 else None,
                      PREFETCH_AFTER_ARRIVE=cfg.prefetch_after_arrive, CHUNKED=False,
                      DATAFLOW=cfg.dataflow, CLUSTER=False)
    if backward:
        kernel = lstm_wavefront_backward_kernel
        acc = state_type(dtype)
        types = dict(dy=tname, dh_n=tname, dc_state=acc, gates=acc, c_all=acc,
                     c0=tname, lengths="i32", w_ih=tname, w_hh=tname, keep=tname, dgates=tname,
                     dh0=tname, counters="i32")
        constexprs.update(HAS_DY=True, HAS_DHN=True, HAS_H0=True)
    else:
        kernel = lstm_wavefront_kernel
        acc = state_type(dtype)
        types = dict(gx=tname, w_ih=tname, bias=acc, w_hh=tname, h_all=tname, keep=tname,
                     x_all=tname, h_n=tname, c_state=acc, lengths="i32", gates=acc,
                     c_all=acc, counters="i32")
        constexprs.update(SAVE=True)
    compiled = compile_one(kernel, types, constexprs, cfg.num_warps)
    return compiled_row(compiled, kernel=kernel_name, dtype=dtype_name, B=batch, H=hidden,
                        D=layers, proj=0, tile=f"{cfg.block_b}x{cfg.block_h}",
                        resident=cfg.resident, split_k=cfg.split_k, warps=cfg.num_warps)


def report_registers(dtype_name, batch, hidden, directions=1, poll_backoff_ns=0, state=True,
                     stamps=False, exchange=False, push_bytes=4):
    """The small-batch forward with its weights in registers (kernels/forward_registers.py),
    with the saved gates, and h0 and lengths where ``state``, recording its timeline where
    ``stamps``; its tile is its own (one warp, 4 units, 8 rows), or with ``exchange`` the
    programs of several warps that push h through their cluster (``exchange_shape``),
    ``push_bytes`` a lane in one st.async."""
    from triton_lstm.kernels import forward_registers as fr   # Gluon, imported where asked for
    fr.PUSH_BYTES = push_bytes
    tname, dtype = DTYPES[dtype_name]
    types = dict(gx=tname, w_hh=tname, h0=tname, c0=tname, lengths="i32", y=tname, h_n=tname,
                 c_state="fp32", gates="fp32", c_all="fp32", stamps="i64")
    warps = fr.exchange_shape(hidden)[0] if exchange else 1
    constexprs = dict(fr.kernel_constants(hidden, directions, dtype,
                                          "tf32" if dtype == torch.float32 else "ieee",
                                          has_h0=state, has_lengths=state, save=True,
                                          reverse=True, stamps=stamps, warps=warps,
                                          exchange=exchange),
                      POLL_BACKOFF_NS=poll_backoff_ns)
    compiled = compile_one(fr.lstm_forward_registers_kernel, types, constexprs, warps)
    row = compiled_row(compiled, kernel="registers-exchange" if exchange else "registers",
                       dtype=dtype_name, B=batch, H=hidden, D=directions, proj=0,
                       tile=f"{fr.ROWS}x{fr.UNITS * warps}", resident=True,
                       split_k=fr.chunks(hidden, dtype), warps=warps)
    if exchange:
        row.update(exchange_fields(compiled, fr.exchange_pushes(fr.exchange_shape(hidden)[1],
                                                                dtype)))
    return row


def exchange_fields(compiled, launch_pushes: int) -> dict:
    """A registers kernel that pushes its state through the cluster: its st.async and the
    count its launch asks for, its launch parameters (dispatch.launch_in_clusters rewrites
    them), the bytes of its pushes and of its loads from the exchange slot (16: vectorised)
    and the shared
    memory it declares apart from that (the ld.shared / st.shared of its own buffers count
    too)."""
    ptx = compiled.asm["ptx"]
    return dict(pushes=ptx.count("st.async"), launch_pushes=launch_pushes,
                push_bytes=sorted({4 * int(vec or 1) for vec in re.findall(
                    r"st\.async\.\S*?(?:\.v(\d))?\.b32", ptx)}),
                launch_parameters=list(compiled.packed_metadata),
                shared_load_bytes=sorted({int(vec or 1) * 4 for vec in re.findall(
                    r"ld\.shared(?:\.v(\d))?\.b32", ptx)}))


def report_registers_backward(dtype_name, batch, hidden, directions=1, poll_backoff_ns=0,
                              state=True, stamps=False, exchange=False, push_bytes=4):
    """The small-batch backward with its weights in registers (kernels/backward_registers.py),
    with dy and dh_n, and c0 and lengths where ``state``; its tile is its own (16 units, 8
    rows; 4 warps, 8 where a gate's reduction is split in two); with ``exchange``, dG pushed
    through the cluster of a batch block's programs (32 units, 8 warps past H = 256),
    ``push_bytes`` a lane in one st.async."""
    from triton_lstm.kernels import backward_registers as br   # Gluon, imported where asked for
    br.PUSH_BYTES = push_bytes
    tname, dtype = DTYPES[dtype_name]
    types = dict(dy=tname, dh_n=tname, dc_state="fp32", gates="fp32", c_all="fp32", c0=tname,
                 lengths="i32", w_hh=tname, dgates=tname, dh0=tname, stamps="i64")
    constexprs = dict(br.kernel_constants(hidden, directions, dtype,
                                          "tf32" if dtype == torch.float32 else "ieee",
                                          has_dy=True, has_dhn=True, has_h0=state,
                                          has_lengths=state, reverse=True, stamps=stamps,
                                          exchange=exchange),
                      POLL_BACKOFF_NS=poll_backoff_ns)
    # a part a warp (four gates of SPLITS parts), UNIT_WARPS side by side
    num_warps = 4 * constexprs["SPLITS"] * constexprs["UNIT_WARPS"]
    compiled = compile_one(br.lstm_backward_registers_kernel, types, constexprs, num_warps)
    row = compiled_row(compiled, kernel="registers-backward-exchange" if exchange
                       else "registers-backward", dtype=dtype_name, B=batch, H=hidden,
                       D=directions, proj=0, tile=f"{br.ROWS}x{constexprs['UNITS']}", resident=True,
                       split_k=constexprs["CHUNKS"], warps=num_warps)
    if exchange:
        row.update(exchange_fields(compiled, br.exchange_pushes(
            br.exchange_programs(hidden, dtype), dtype)))
    return row


def report_ring(dtype_name, batch, hidden, directions=1, config=None, state=True, stamps=False):
    """The mid-batch forward with its weights in shared memory and h in a ring of cp.async
    stages (kernels/forward_ring.py), with the saved gates, and h0 and lengths where
    ``state``, recording its timeline where ``stamps``; ``config``: its tile (default 64x16,
    5 stages)."""
    from triton_lstm.kernels import forward_ring as fr       # Gluon, imported where asked for
    tname, dtype = DTYPES[dtype_name]
    config = config or KernelConfig(block_b=fr.ROWS, block_h=16, resident=False,
                                    num_warps=fr.WARPS, inner_stages=5, ring=True)
    types = dict(gx=tname, w_hh=tname, h0=tname, c0=tname, lengths="i32", y=tname, h_n=tname,
                 c_state="fp32", gates="fp32", c_all="fp32", stamps="i64", counters="i32")
    constexprs = fr.kernel_constants(hidden, directions, config, has_h0=state,
                                     has_lengths=state, save=True, reverse=True, stamps=stamps)
    compiled = compile_one(fr.lstm_forward_ring_kernel, types, constexprs, fr.WARPS)
    return compiled_row(compiled, kernel="ring", dtype=dtype_name, B=batch, H=hidden,
                        D=directions, proj=0, tile=f"{fr.ROWS.value}x{config.block_h}",
                        resident=True, split_k=config.inner_stages, warps=fr.WARPS)


@gluon.jit
def _operand_layouts_probe(KC: gl.constexpr, K_WIDTH: gl.constexpr):
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1],
                                                  instr_shape=[16, 8])
    gl.static_print("operand 0", gl.to_linear_layout(
        gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=K_WIDTH), [16, KC]))
    gl.static_print("operand 1", gl.to_linear_layout(
        gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=K_WIDTH), [KC, 8]))


def report_registers_operands(dtype_name, hidden):
    """Whether the registers kernels' MMA operand tiles ([16, KC] weights, [KC, 8] h or dG, at
    their k_width) are broadcast: a register or lane basis of zero in the layout Triton
    gives them, where a chunk of the reduction is shorter than the layout's own."""
    from triton_lstm.kernels import forward_registers as fr
    _, dtype = DTYPES[dtype_name]
    constexprs = fr.kernel_constants(hidden, 1, dtype, "ieee", has_h0=False, has_lengths=False,
                                     save=False, reverse=False)
    kc, k_width = constexprs["HP"] // constexprs["CHUNKS"], constexprs["K_WIDTH"]
    printed = io.StringIO()
    # The layouts print while it compiles; the kernels compiled after it keep the cache.
    with mock.patch.dict(os.environ, TRITON_ALWAYS_COMPILE="1"), \
            contextlib.redirect_stdout(printed):
        compile_one(_operand_layouts_probe, {}, dict(KC=kc, K_WIDTH=k_width), 1)
    layouts = re.findall(r"operand \d.*", printed.getvalue())
    bases = [re.search(r"reg_bases=(\[.*?\]\]).*lane_bases=(\[.*?\]\])", line).groups()
             for line in layouts]
    return dict(kernel="registers-operands", dtype=dtype_name, H=hidden, KC=kc,
                k_width=k_width, layouts=len(layouts),
                broadcast=any("[0, 0]" in regs + lanes for regs, lanes in bases))


# The layer's GEMMs (ops.layer_matmul) in their three operand layouts, as the strides of 1 a
# launch specialises: gx = x W_ih^T ("nt"), dx = dG W_ih ("nn"), dW = dG^T x or h ("tn").
GEMM_LAYOUTS = {"nt": dict(stride_ak=1, stride_bk=1, stride_cn=1),
                "nn": dict(stride_ak=1, stride_bn=1, stride_cn=1),
                "tn": dict(stride_am=1, stride_bn=1, stride_cn=1)}


def report_gemm(dtype_name, layout):
    """kernels/gemm.py's GEMM in one of the layer's layouts (the projection's with its bias),
    tf32 for fp32; its 'dot' column is wgmma's operand type."""
    tname, dtype = DTYPES[dtype_name]
    constexprs = dict(GEMM_LAYOUTS[layout], HAS_BIAS=layout == "nt",
                      DOT_PRECISION="tf32" if dtype == torch.float32 else "ieee",
                      BLOCK_M=gemm.BLOCK_M, BLOCK_N=gemm.BLOCK_N, BLOCK_K=gemm.BLOCK_K,
                      GROUP_M=gemm.GROUP_M)
    compiled = compile_one(gemm.matmul_kernel, dict.fromkeys(("a", "b", "c", "bias"), tname),
                           constexprs, gemm.NUM_WARPS, gemm.NUM_STAGES)
    operand = re.search(r"wgmma\.mma_async\.\S*?\.f32\.(\w+)\.", compiled.asm["ptx"])
    return compiled_row(compiled, kernel=f"gemm-{layout}", dtype=dtype_name, B=0, H=0, D=1,
                        proj=0, tile=f"{gemm.BLOCK_M}x{gemm.BLOCK_N}", resident=False,
                        split_k=gemm.BLOCK_K, warps=gemm.NUM_WARPS,
                        dot=operand.group(1) if operand else None)


def report_step(dtype_name, batch, hidden):
    """The one-step kernel (kernels/step.py) with its heuristic tiles, I = R = H, state and bias."""
    tname, dtype = DTYPES[dtype_name]
    cfg = step_config(batch, hidden, hidden, dtype, NUM_SMS)
    types = dict(x=tname, h=tname, c=tname, w_ih=tname, w_hh=tname, b_ih=tname, b_hh=tname,
                 r_out=tname, c_out=state_type(dtype), gates=state_type(dtype))
    constexprs = dict(I=hidden, H=hidden, R=hidden, BLOCK_B=cfg.block_b, BLOCK_H=cfg.block_h,
                      BLOCK_K=cfg.block_k, HAS_STATE=True, HAS_BIAS=True, SAVE=False,
                      DOT_PRECISION="tf32" if dtype == torch.float32 else "ieee")
    compiled = compile_one(lstm_step_kernel, types, constexprs, cfg.num_warps, cfg.num_stages)
    return compiled_row(compiled, kernel="step", dtype=dtype_name, B=batch, H=hidden, D=1, proj=0,
                        tile=f"{cfg.block_b}x{cfg.block_h}", resident=False, split_k=cfg.block_k,
                        warps=cfg.num_warps)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["8x512", "64x512", "128x1024", "512x1024"],
                        help="BxH")
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    parser.add_argument("--step", action="store_true",
                        help="the one-step kernel (its 'split' column is BLOCK_K)")
    parser.add_argument("--gemm", action="store_true",
                        help="the layer's GEMM kernel in its three layouts (--shapes unused)")
    parser.add_argument("--directions", type=int, default=1, choices=(1, 2))
    parser.add_argument("--proj", type=int, default=0, help="proj_size (0: none)")
    parser.add_argument("--restarts", action="store_true", help="with reset= (restarts)")
    parser.add_argument("--ckpt", type=int, default=0, help="recompute interval (forward)")
    parser.add_argument("--resumed", action="store_true",
                        help="the forward's launch from a later step (the forward in chunks)")
    parser.add_argument("--stepped", action="store_true",
                        help="the kernel of a launch per step (the fallback), not persistent")
    parser.add_argument("--config", help="a config label instead of the heuristic's, e.g. "
                                         "bb128-bh32-str-bk64-sk1-w16-st3 (tuning.config_label)")
    parser.add_argument("--kernels", nargs="+", default=["forward", "backward"],
                        choices=["forward", "backward", "wavefront", "wavefront-backward",
                                 "registers", "registers-exchange", "registers-backward",
                                 "registers-backward-exchange", "registers-operands",
                                 "ring"])
    parser.add_argument("--layers", type=int, default=2,
                        help="layers of the wavefront kernels (reported in column D)")
    parser.add_argument("--dropout", action="store_true",
                        help="the wavefront kernels with dropout between layers")
    parser.add_argument("--poll-backoff", type=int, default=0,
                        help="the registers kernels' pause between polls, ns (0: none)")
    parser.add_argument("--push-bytes", type=int, default=4, choices=(4, 8),
                        help="bytes a lane pushes in one st.async in the registers kernels "
                             "that push 16-bit h and dG (their PUSH_BYTES)")
    parser.add_argument("--no-state", action="store_true",
                        help="the registers kernels without h0 / c0 and lengths")
    parser.add_argument("--bias-sums", action="store_true",
                        help="the backward sums dG for the bias gradient as it goes")
    parser.add_argument("--stamps", action="store_true",
                        help="the kernels record each step's timeline (kernels/timeline.py)")
    parser.add_argument("--json", action="store_true", help="one JSON object per kernel")
    args = parser.parse_args()
    config = tuning.config_from_label(args.config) if args.config else None
    if not args.json:
        print(f"triton {triton.__version__}, {get_ptxas(90).path}")
        print("kernel   dtype     B     H  D  tile     res split warps  regs spill  shared  hload"
              "  mma")
    for r in reports(args, config):
        if args.json or r["kernel"] == "registers-operands":
            print(json.dumps(dict(r, triton=triton.__version__)), flush=True)
            continue
        print(f"{r['kernel']:8} {r['dtype']:5} {r['B']:5} {r['H']:5} {r['D']:2}  "
              f"{r['tile']:8} {str(r['resident'])[0]:>3} {r['split_k']:5} {r['warps']:5} "
              f"{r['regs']!s:>5} {r['spill']:5} {r['shared']:7}  {r['state_load']!s:>5}  "
              f"{r['mma']}{' ' + r['dot'] if r.get('dot') else ''}"
              + ("" if r["ptxas_ok"] else "  (ptxas failed)"), flush=True)


def reports(args, config):
    """Every kernel the arguments ask for, compiled and reported, one row at a time."""
    for dtype_name in args.dtypes:
        if args.gemm:
            for layout in GEMM_LAYOUTS:
                yield report_gemm(dtype_name, layout)
            continue
        for shape in args.shapes:
            batch, hidden = (int(v) for v in shape.split("x"))
            for kernel_name in (("step",) if args.step else args.kernels):
                if kernel_name == "step":
                    yield report_step(dtype_name, batch, hidden)
                elif kernel_name == "registers":
                    yield report_registers(dtype_name, batch, hidden, args.directions,
                                           args.poll_backoff, not args.no_state, args.stamps)
                elif kernel_name == "registers-exchange":
                    yield report_registers(dtype_name, batch, hidden, args.directions, 0,
                                           not args.no_state, args.stamps, exchange=True,
                                           push_bytes=args.push_bytes)
                elif kernel_name == "registers-operands":
                    yield report_registers_operands(dtype_name, hidden)
                elif kernel_name == "ring":
                    yield report_ring(dtype_name, batch, hidden, args.directions, config,
                                      not args.no_state, args.stamps)
                elif kernel_name.startswith("registers-backward"):
                    yield report_registers_backward(dtype_name, batch, hidden, args.directions,
                                                    args.poll_backoff, not args.no_state,
                                                    args.stamps,
                                                    kernel_name.endswith("-exchange"),
                                                    args.push_bytes)
                elif kernel_name.startswith("wavefront"):
                    yield report_wavefront(dtype_name, batch, hidden, args.layers, config,
                                           kernel_name, args.dropout)
                else:
                    yield report(kernel_name, dtype_name, batch, hidden, args.directions,
                                 args.proj, args.restarts, args.ckpt, config, args.resumed,
                                 args.stepped, args.bias_sums, args.stamps)


if __name__ == "__main__":
    main()
