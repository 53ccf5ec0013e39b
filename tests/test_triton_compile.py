"""Every kernel of ssd_triton.py compiled for the A100 (sm_80) and the H100 (sm_90) on the CPU, down
to a cubin, as the launcher would launch it: float32 and bfloat16 inputs, at the interpreter tests'
shape and at HoVLE's (b=1, H=16, Hx=G=8, P=N=128, Q=64), with the tiles and warps of TILES.

The interpreter (tests/test_ssd_triton.py) is blind to shared memory, registers and tensor cores;
a first GPU launch is not. Asserts per build: dynamic shared memory within the GPU's per-block
limit (SMEM_LIMIT; the sm_80 builds also serve the 8.6/8.9 GPUs, 99 KB), no register spills for
16-bit inputs, and every dot on tensor cores (mma.sync; wgmma on sm_90 at HoVLE's shape; float32
inputs too, as 3xTF32). Registers and spills come from ptxas's log (TRITON_DUMP_PTXAS_LOG=1),
shared memory from the compiled kernel's metadata. The interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py) turns every @triton.jit function, Triton's own included, into Python, so the
builds run in a child process without it: `python tests/test_triton_compile.py [--json FILE]`
prints the table. About 30 s on one CPU core (56 builds).

Run: python -m pytest -q -s tests/test_triton_compile.py      # -s prints the table
"""
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = (80, 90)
# Per-block dynamic shared memory (opt-in), CUDA C Programming Guide, compute capabilities: 8.0
# (A100) 163 KB, 9.0 (H100) 227 KB; 8.6 and 8.9 (RTX 30/40, A10, L4), with sm_80's tiles, 99 KB.
SMEM_LIMIT = {80: 99 * 1024, 90: 227 * 1024}
SHAPES = {"test": dict(b=2, L=37, H=4, Hx=2, G=2, Gc=4, P=20, N=17, Q=16),
          "hovle": dict(b=1, L=128, H=16, Hx=8, G=8, Gc=16, P=128, N=128, Q=64)}
DTYPES = ("float32", "bfloat16")
COLUMNS = ("shape", "kernel", "dtype", "target", "smem", "regs", "spills", "mma", "warps", "tiles",
           "s")


def launches(shape: dict, dtype: str, arch: int) -> list:
    """The kernel launches of ssd_triton's forward and backward at shape, for a GPU of generation
    arch // 10, recorded instead of run (CPU tensors: nothing is computed)."""
    import torch

    import ssd_triton
    from ssd_inputs import random_inputs
    calls = []
    ssd_triton._launch = lambda kernel, grid, *args, **meta: calls.append((kernel, args, meta))
    ssd_triton._check_device = lambda x: None
    ssd_triton._capability = lambda device: arch // 10
    sizes = {k: v for k, v in shape.items() if k != "Q"}
    args = random_inputs(dtype=getattr(torch, dtype), **sizes)
    args = [t.requires_grad_() for t in args]
    y, h = ssd_triton.ssd_triton(*args, chunk_size=shape["Q"])
    (y.float().sum() + h.sum()).backward()
    return calls


def compile_one(kernel, args, meta, arch: int) -> dict:
    """Compile one recorded launch for sm_<arch> as the JIT would (its specialization of the
    arguments) and read shared memory, registers, spills and the tensor-core instruction."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **meta)
    packed = kernel._pack_args(backend, meta, bound, specialization, options)
    options, signature, constexprs, attrs = packed
    log = io.StringIO()
    start = time.time()
    source = ASTSource(kernel, signature, constexprs, attrs)
    with contextlib.redirect_stdout(log):                   # ptxas's log, TRITON_DUMP_PTXAS_LOG=1
        compiled = triton.compile(source, target=target, options=options.__dict__)
    ptxas = log.getvalue()
    regs = re.search(r"Used (\d+) registers", ptxas)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas)
    ptx = compiled.asm["ptx"]
    mma = "-"
    if "mma.sync" in ptx:
        mma = "mma"
    if "wgmma.mma_async" in ptx:
        mma = "wgmma"
    names = {kernel.arg_names[path[0]]: value for path, value in constexprs.items()}
    variant = [name for name in ("TRANSPOSE", "REVERSE") if names.get(name)]
    tiles = "x".join(str(names[k]) for k in ("BLOCK_P", "BLOCK_N", "BLOCK") if k in names)
    return {"kernel": " ".join([kernel.fn.__name__] + variant), "target": f"sm_{arch}",
            "smem": compiled.metadata.shared, "regs": regs and int(regs.group(1)),
            "spills": spills and sum(map(int, spills.groups())), "mma": mma,
            "has_dot": "_dot(" in kernel.src, "warps": options.num_warps, "tiles": tiles,
            "s": round(time.time() - start, 1)}


def compile_all() -> list:
    """Every distinct launch of every shape, dtype and target, compiled (without the interpreter)."""
    rows = []
    for shape_name, shape in SHAPES.items():
        for dtype in DTYPES:
            for arch in TARGETS:
                seen = set()
                for kernel, args, meta in launches(shape, dtype, arch):
                    key = (kernel.fn.__name__, meta.get("TRANSPOSE"), meta.get("REVERSE"))
                    if key not in seen:
                        seen.add(key)
                        row = compile_one(kernel, args, meta, arch)
                        rows.append({"shape": shape_name, "dtype": dtype, **row})
    return rows


def table(rows: list) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    pytest.importorskip("triton.backends.nvidia", reason="no NVIDIA backend (ptxas) in Triton")
    out = tmp_path_factory.mktemp("compile") / "builds.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_DUMP_PTXAS_LOG="1", TRITON_ALWAYS_COMPILE="1")
    env["TRITON_CACHE_DIR"] = str(out.parent)
    command = [sys.executable, os.path.abspath(__file__), "--json", str(out)]
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    print("\n" + run.stdout)
    return json.loads(out.read_text())


def test_every_kernel_compiles_for_every_target(builds):
    kernels = {"_chunk_states_kernel", "_chunk_states_kernel TRANSPOSE", "_pass_states_kernel",
               "_pass_states_kernel REVERSE", "_chunk_outputs_kernel", "_chunk_bwd_kernel",
               "_chunk_bwd_dBdC_kernel"}
    built = {}
    for r in builds:
        built.setdefault((r["shape"], r["dtype"], r["target"]), set()).add(r["kernel"])
    assert len(built) == len(SHAPES) * len(DTYPES) * len(TARGETS)
    for key, names in built.items():
        assert names == kernels, key


def test_shared_memory_within_the_gpu_limit(builds):
    for r in builds:
        assert r["smem"] <= SMEM_LIMIT[int(r["target"][3:])], r


def test_no_register_spills_for_16bit_inputs(builds):
    for r in builds:
        assert r["regs"] is not None and r["spills"] is not None, r
        if r["dtype"] != "float32":
            assert r["spills"] == 0, r


def test_dots_run_on_tensor_cores(builds):
    """mma.sync, or on sm_90 at HoVLE's shape wgmma (the test shape's 16-row chunks are too small
    for it)."""
    for r in builds:
        if r["has_dot"]:
            hopper = r["target"] == "sm_90" and r["shape"] == "hovle"
            assert r["mma"] == ("wgmma" if hopper else "mma"), r


if __name__ == "__main__":
    sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("error: TRITON_INTERPRET=1: the builds need Triton's compiler; unset it")
    os.environ.setdefault("TRITON_DUMP_PTXAS_LOG", "1")
    os.environ.setdefault("TRITON_ALWAYS_COMPILE", "1")     # a cached build has no ptxas log
    started = time.time()
    result = compile_all()
    print(table(result))
    version = __import__("triton").__version__
    print(f"{len(result)} builds in {time.time() - started:.0f} s, triton {version}")
    if "--json" in sys.argv:
        with open(sys.argv[sys.argv.index("--json") + 1], "w") as f:
            json.dump(result, f, indent=1)
