#!/usr/bin/env python3
"""FlashInfer as a peer of kvtile's paged decode, append and prefill (suites "decode", "append",
"prefill"), through its wrappers' plan / run:

  decode   BatchDecodeWithPagedKVCacheWrapper, use_tensor_cores off and on (backends fa2, fa3)
           (q_len > 1: BatchPrefillWithPagedKVCacheWrapper, causal)
  append   BatchPrefillWithPagedKVCacheWrapper, causal over the paged prefix, backends fa2 / fa3
  prefill  BatchPrefillWithRaggedKVCacheWrapper, backends fa2 / fa3
fa3 runs on compute capability 9.x only.
  decode fp8  the same decode wrapper over float8_e4m3fn pages (kv_data_type), one K and one V
           scale per call (impl "flashinfer_fp8", beside kvtile's "kvtile_fp8_head" rows: bytes
           counted as read, one per K/V element) Each variant's output is first checked against PyTorch
SDPA on a small case of the same configuration; the fastest correct variant is reported as
impl "flashinfer" (the key "variant" names it). Pages are shuffled over the pool, as kvtile's
benchmarks do, and small problems rotate over copies of their pages so runs read memory.

Where FlashInfer comes from: the folder $KVTILE_FLASHINFER_DIR holding its wheels (a trimmed
flashinfer_python and apache_tvm_ffi) and flashinfer_aot_*.tar.gz (precompiled modules). The
wheels are installed once into $KVTILE_FLASHINFER_SITE (default /tmp/site) and the modules
unpacked into the package's data/aot, so nothing compiles for the shapes they cover (bf16,
D 128 on sm_90a); others JIT-compile on first use. An importable flashinfer is used as is.
When FlashInfer, torch or a GPU is missing, one JSON line per suite says why ("skip") and the
script exits 0.

Without kvtile_bench's one-shape options (bench/peers/_common.py) it runs the grid of
bench/decode_bench.cu (decode, append) and bench/prefill_bench.cu (prefill, D 128), with the same
shape strings.
"""
import glob
import importlib
import os
import subprocess
import sys
import tarfile
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

SITE = os.environ.get("KVTILE_FLASHINFER_SITE", "/tmp/site")
WORKSPACE_BYTES = 128 << 20


def load_flashinfer():
    """The flashinfer module, installed from $KVTILE_FLASHINFER_DIR when needed; raises RuntimeError(why)."""
    try:
        import torch
    except ImportError:
        raise RuntimeError("PyTorch is not installed")
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device")
    os.environ.setdefault("FLASHINFER_WORKSPACE_BASE", "/tmp/fi-ws")
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    os.environ.setdefault("FLASHINFER_LOGDEST", "stderr")
    src = os.environ.get("KVTILE_FLASHINFER_DIR")
    if src:
        wheels = sorted(glob.glob(os.path.join(src, "*.whl")))
        if not wheels:
            raise RuntimeError(f"KVTILE_FLASHINFER_DIR={src} holds no wheels")
        if not os.path.isdir(os.path.join(SITE, "flashinfer")):
            _common.warn(f"flashinfer: installing {len(wheels)} wheels from {src} into {SITE}")
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                            "--no-cache-dir", "--upgrade", "--target", SITE, *wheels], check=True, stdout=sys.stderr)
        # The folder may have been looked up (and found missing) at start-up through PYTHONPATH:
        # forget that, or `import flashinfer` below finds this script's own flashinfer.py.
        sys.path_importer_cache.pop(SITE, None)
        importlib.invalidate_caches()
        sys.path.insert(0, SITE)
    try:
        import flashinfer
    except Exception as e:
        where = f"from {SITE}" if src else "(set KVTILE_FLASHINFER_DIR to a folder with its wheels)"
        raise RuntimeError(f"flashinfer is not importable {where}: {type(e).__name__}: {e}")
    for tarball in sorted(glob.glob(os.path.join(src, "*aot*.tar.gz"))) if src else []:
        dest = os.path.join(os.path.dirname(flashinfer.__file__), "data", "aot")
        marker = os.path.join(dest, "." + os.path.basename(tarball) + ".unpacked")
        if not os.path.exists(marker):
            os.makedirs(dest, exist_ok=True)
            with tarfile.open(tarball) as t:
                try:
                    t.extractall(dest, filter="data")  # plain files only (Python >= 3.12, backports)
                except TypeError:
                    t.extractall(dest)
            open(marker, "w").close()
            _common.warn(f"flashinfer: unpacked {os.path.basename(tarball)} into {dest}")
    return flashinfer


# ---- Inputs ---------------------------------------------------------------------------------

class paged_inputs:
    """q [B * q_len, HQ, D]; a pool of shuffled pages holding `copies` independent caches of the
    batch (NHD [pages, page, HKV, D] or HND [pages, HKV, page, D]); CSR tables per copy."""

    def __init__(self, a, copies, dense_k=None, dense_v=None):
        import torch
        dt = _common.torch_dtype(a.dtype)
        keys = _common.keys(a)
        per_seq = (keys + a.page - 1) // a.page
        self.per_seq, self.keys, self.copies = per_seq, keys, copies
        pages = a.batch * per_seq * copies
        shape = (pages, a.page, a.hkv, a.d) if a.layout == "nhd" else (pages, a.hkv, a.page, a.d)
        self.k = torch.randn(shape, device="cuda", dtype=dt)
        self.v = torch.randn(shape, device="cuda", dtype=dt)
        perm = torch.randperm(pages, generator=torch.Generator().manual_seed(42)).to(torch.int32).cuda()
        self.indices = [perm[c * a.batch * per_seq:(c + 1) * a.batch * per_seq].contiguous() for c in range(copies)]
        self.indptr = (torch.arange(a.batch + 1, dtype=torch.int32) * per_seq).cuda()
        self.last = torch.full((a.batch,), keys - (per_seq - 1) * a.page, dtype=torch.int32).cuda()
        self.qo_indptr = (torch.arange(a.batch + 1, dtype=torch.int32) * a.q_len).cuda()
        self.q = torch.randn(a.batch * a.q_len, a.hq, a.d, device="cuda", dtype=dt)
        if dense_k is not None:  # scatter the given dense K/V [B, keys, HKV, D] into copy 0's pages
            for b in range(a.batch):
                for t in range(keys):
                    page = int(self.indices[0][b * per_seq + t // a.page])
                    slot = t % a.page
                    if a.layout == "nhd":
                        self.k[page, slot], self.v[page, slot] = dense_k[b, t], dense_v[b, t]
                    else:
                        self.k[page, :, slot], self.v[page, :, slot] = dense_k[b, t], dense_v[b, t]


def reference(a, q, k, v):
    """SDPA in fp32: q [B, q_len, HQ, D], k / v [B, keys, HKV, D] -> [B * q_len, HQ, D]."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.bias import causal_lower_right
    qf, kf, vf = (x.float().transpose(1, 2) for x in (q, k, v))
    mask = causal_lower_right(q.shape[1], k.shape[1]) if a.causal and q.shape[1] > 1 else None
    o = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, enable_gqa=a.hq != a.hkv)
    return o.transpose(1, 2).reshape(-1, a.hq, a.d)


# ---- Variants: each returns (run(i) callable after planning, description) --------------------

def wrappers(fi, a, inputs, variant):
    """One planned wrapper per copy of the pages (a plan holds its page table)."""
    import torch
    kind, backend, tc = variant
    dt = _common.torch_dtype(a.dtype)
    layout = a.layout.upper()
    out = []
    for c in range(inputs.copies):
        ws = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device="cuda")
        if kind == "decode":
            w = fi.BatchDecodeWithPagedKVCacheWrapper(ws, layout, use_tensor_cores=tc, backend=backend)
            w.plan(inputs.indptr, inputs.indices[c], inputs.last, a.hq, a.hkv, a.d, a.page, q_data_type=dt,
                   kv_data_type=dt)
        else:
            w = fi.BatchPrefillWithPagedKVCacheWrapper(ws, layout, backend=backend)
            w.plan(inputs.qo_indptr, inputs.indptr, inputs.indices[c], inputs.last, a.hq, a.hkv, a.d, a.page,
                   causal=bool(a.causal), q_data_type=dt, kv_data_type=dt)
        out.append(w)
    return out


def paged_variants(a, hopper):
    if a.kernel == "decode" and a.q_len == 1:
        v = [("decode", "auto", False), ("decode", "fa2", True)]
        if hopper:
            v.append(("decode", "fa3", True))
        return v
    return [("prefill", "fa2", None)] + ([("prefill", "fa3", None)] if hopper else [])


def describe(variant):
    kind, backend, tc = variant
    if kind == "decode":
        return f"BatchDecodeWithPagedKVCacheWrapper use_tensor_cores={tc} backend={backend}"
    return f"BatchPrefillWithPagedKVCacheWrapper backend={backend}"


def check_paged(fi, a, variant):
    """The variant's output against SDPA on a small case of the same configuration (max abs error)."""
    import torch
    small = SimpleNamespace(**vars(a))
    small.batch, small.len = 2, min(a.len, 3 * a.page + 5)
    if small.kernel == "append":
        small.q_len = min(a.q_len, 37)
    dt = _common.torch_dtype(a.dtype)
    keys = _common.keys(small)
    dk = torch.randn(small.batch, keys, a.hkv, a.d, device="cuda", dtype=dt)
    dv = torch.randn(small.batch, keys, a.hkv, a.d, device="cuda", dtype=dt)
    inp = paged_inputs(small, 1, dk, dv)
    w = wrappers(fi, small, inp, variant)[0]
    q = inp.q if variant[0] != "decode" else inp.q.view(small.batch, a.hq, a.d)
    o = w.run(q, (inp.k, inp.v)).reshape(-1, a.hq, a.d).float()
    ref = reference(small, inp.q.view(small.batch, small.q_len, a.hq, a.d), dk, dv)
    return float((o - ref).abs().max())


def ragged_run(fi, a, backend, q, k, v):
    import torch
    dt = _common.torch_dtype(a.dtype)
    ws = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device="cuda")
    w = fi.BatchPrefillWithRaggedKVCacheWrapper(ws, a.layout.upper(), backend=backend)
    indptr = (torch.arange(a.batch + 1, dtype=torch.int32) * a.len).cuda()
    w.plan(indptr, indptr, a.hq, a.hkv, a.d, causal=bool(a.causal), q_data_type=dt, kv_data_type=dt)
    return lambda i: w.run(q, k, v)


def check_ragged(fi, a, backend):
    import torch
    small = SimpleNamespace(**vars(a))
    small.batch, small.len = 2, min(a.len, 77)
    small.q_len = small.len
    dt = _common.torch_dtype(a.dtype)
    q = torch.randn(2 * small.len, a.hq, a.d, device="cuda", dtype=dt)
    k = torch.randn(2 * small.len, a.hkv, a.d, device="cuda", dtype=dt)
    v = torch.randn(2 * small.len, a.hkv, a.d, device="cuda", dtype=dt)
    o = ragged_run(fi, small, backend, q, k, v)(0).float()
    ref = reference(small, q.view(2, small.len, a.hq, a.d), k.view(2, small.len, a.hkv, a.d),
                    v.view(2, small.len, a.hkv, a.d))
    return float((o - ref).abs().max())


TOLERANCE = 0.05  # bf16 / fp16 outputs of unit-variance inputs against fp32 SDPA


def measure(fi, a):
    """Emits one line for the fastest correct variant on the shape `a`, or a skip line."""
    import torch
    suite, shape = a.kernel, _common.label(a)
    if a.device != "cuda":
        return _common.skip(suite, shape, "flashinfer", "FlashInfer runs on CUDA devices only")
    if a.dtype == "fp32":
        return _common.skip(suite, shape, "flashinfer", "FlashInfer takes fp16 / bf16 inputs")
    hopper = torch.cuda.get_device_capability()[0] == 9
    best = None
    if a.kernel == "prefill":
        dt = _common.torch_dtype(a.dtype)
        q = torch.randn(a.batch * a.len, a.hq, a.d, device="cuda", dtype=dt)
        k = torch.randn(a.batch * a.len, a.hkv, a.d, device="cuda", dtype=dt)
        v = torch.randn(a.batch * a.len, a.hkv, a.d, device="cuda", dtype=dt)
        for backend in ["fa2"] + (["fa3"] if hopper else []):
            name = f"BatchPrefillWithRaggedKVCacheWrapper backend={backend}"
            try:
                err = check_ragged(fi, a, backend)
                if not err <= TOLERANCE:
                    _common.warn(f"flashinfer {name}: differs from SDPA by {err:.3g}; not timed")
                    continue
                t = _common.median_seconds(ragged_run(fi, a, backend, q, k, v))
                _common.warn(f"flashinfer {name} {shape}: {_common.rate(a, t):.3f} {_common.unit(a)} (check {err:.2g})")
                if best is None or t < best[0]:
                    best = (t, name)
            except Exception as e:
                _common.warn(f"flashinfer {name} {shape}: {type(e).__name__}: {e}")
    else:
        kv_one = 2.0 * a.batch * _common.keys(a) * a.hkv * a.d * _common.elem_bytes(a.dtype)
        copies = int(max(1, min(8, 512e6 // kv_one)))
        inputs = paged_inputs(a, copies)
        for variant in paged_variants(a, hopper):
            name = describe(variant)
            try:
                err = check_paged(fi, a, variant)
                if not err <= TOLERANCE:
                    _common.warn(f"flashinfer {name}: differs from SDPA by {err:.3g}; not timed")
                    continue
                ws = wrappers(fi, a, inputs, variant)
                q = inputs.q if variant[0] != "decode" else inputs.q.view(a.batch, a.hq, a.d)
                t = _common.median_seconds(lambda i: ws[i % copies].run(q, (inputs.k, inputs.v)))
                _common.warn(f"flashinfer {name} {shape}: {_common.rate(a, t):.3f} {_common.unit(a)} (check {err:.2g})")
                if best is None or t < best[0]:
                    best = (t, name)
                del ws
            except Exception as e:
                _common.warn(f"flashinfer {name} {shape}: {type(e).__name__}: {e}")
        del inputs
    torch.cuda.empty_cache()
    if best is None:
        return _common.skip(suite, shape, "flashinfer", "no variant ran correctly (see stderr)")
    import json
    print(json.dumps({"suite": suite, "shape": shape, "impl": "flashinfer", "unit": _common.unit(a),
                      "value": round(_common.rate(a, best[0]), 4), "variant": best[1]}), flush=True)


# ---- fp8 pages ---------------------------------------------------------------------------------

FP8_SCALE = 4.0 / 448.0  # randn values within about +-4 use the whole e4m3 range


def fp8_bytes(a):
    """Bytes a decode over fp8 pages reads and writes: one byte per K/V element, 2-byte Q and O."""
    return a.d * a.batch * (2.0 * _common.keys(a) * a.hkv + 4.0 * a.q_len * a.hq)


def fp8_inputs(a, copies, dense_k=None, dense_v=None):
    """paged_inputs with the pages quantised to e4m3 (value / FP8_SCALE, saturated)."""
    import torch
    inp = paged_inputs(a, copies, dense_k, dense_v)
    inp.k = (inp.k.float() / FP8_SCALE).clamp(-448, 448).to(torch.float8_e4m3fn)
    inp.v = (inp.v.float() / FP8_SCALE).clamp(-448, 448).to(torch.float8_e4m3fn)
    return inp


def fp8_wrappers(fi, a, inputs, variant):
    import torch
    _, backend, tc = variant
    dt = _common.torch_dtype(a.dtype)
    out = []
    for c in range(inputs.copies):
        ws = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device="cuda")
        w = fi.BatchDecodeWithPagedKVCacheWrapper(ws, a.layout.upper(), use_tensor_cores=tc, backend=backend)
        w.plan(inputs.indptr, inputs.indices[c], inputs.last, a.hq, a.hkv, a.d, a.page, q_data_type=dt,
               kv_data_type=torch.float8_e4m3fn)
        out.append(w)
    return out


def check_fp8(fi, a, variant):
    """The fp8 variant against SDPA over the dequantised pages of a small case (max abs error)."""
    import torch
    small = SimpleNamespace(**vars(a))
    small.batch, small.len = 2, min(a.len, 3 * a.page + 5)
    dt = _common.torch_dtype(a.dtype)
    keys = _common.keys(small)
    dk = torch.randn(small.batch, keys, a.hkv, a.d, device="cuda", dtype=dt)
    dv = torch.randn(small.batch, keys, a.hkv, a.d, device="cuda", dtype=dt)
    inp = fp8_inputs(small, 1, dk, dv)
    w = fp8_wrappers(fi, small, inp, variant)[0]
    o = w.run(inp.q.view(small.batch, a.hq, a.d), (inp.k, inp.v), k_scale=FP8_SCALE, v_scale=FP8_SCALE)
    deq = lambda x: ((x.float() / FP8_SCALE).clamp(-448, 448).to(torch.float8_e4m3fn).float() * FP8_SCALE)
    ref = reference(small, inp.q.view(small.batch, small.q_len, a.hq, a.d), deq(dk), deq(dv))
    return float((o.reshape(-1, a.hq, a.d).float() - ref).abs().max())


FP8_FAILED = set()  # fp8 variants that raised (a module that failed to compile): skipped for later shapes


def measure_fp8(fi, a):
    """One line for the fastest correct fp8 decode variant (impl "flashinfer_fp8"), or a skip line."""
    import torch
    suite, shape = a.kernel, _common.label(a)
    if a.device != "cuda" or a.kernel != "decode" or a.q_len != 1 or a.dtype == "fp32":
        return _common.skip(suite, shape, "flashinfer_fp8", "fp8 pages: decode (q_len 1, fp16 / bf16 queries) on CUDA only")
    hopper = torch.cuda.get_device_capability()[0] == 9
    kv_one = 2.0 * a.batch * _common.keys(a) * a.hkv * a.d
    copies = int(max(1, min(8, 512e6 // kv_one)))
    inputs = fp8_inputs(a, copies)
    best = None
    # Not the fa3 backend: its module for bf16 queries over e4m3 pages (FlashInfer 0.7.4, sm_90a)
    # fails to compile with nvcc 13 after minutes.
    for variant in [v for v in paged_variants(a, hopper) if v[1] != "fa3"]:
        name = describe(variant) + " kv float8_e4m3fn"
        if name in FP8_FAILED:
            continue
        try:
            err = check_fp8(fi, a, variant)
            if not err <= TOLERANCE:
                _common.warn(f"flashinfer {name}: differs from SDPA over the dequantised pages by {err:.3g}; not timed")
                continue
            ws = fp8_wrappers(fi, a, inputs, variant)
            q = inputs.q.view(a.batch, a.hq, a.d)
            t = _common.median_seconds(
                lambda i: ws[i % copies].run(q, (inputs.k, inputs.v), k_scale=FP8_SCALE, v_scale=FP8_SCALE))
            _common.warn(f"flashinfer {name} {shape}: {fp8_bytes(a) / t / 1e12:.3f} TB/s (check {err:.2g})")
            if best is None or t < best[0]:
                best = (t, name)
            del ws
        except Exception as e:
            _common.warn(f"flashinfer {name} {shape}: {type(e).__name__}: {e}; not tried again in this run")
            FP8_FAILED.add(name)
    del inputs
    torch.cuda.empty_cache()
    if best is None:
        return _common.skip(suite, shape, "flashinfer_fp8", "no fp8 variant ran correctly (see stderr)")
    import json
    print(json.dumps({"suite": suite, "shape": shape, "impl": "flashinfer_fp8", "unit": "TB/s",
                      "value": round(fp8_bytes(a) / best[0] / 1e12, 4), "variant": best[1]}), flush=True)


# The grids of bench/decode_bench.cu and bench/prefill_bench.cu (GQA 32 / 8 there; prefill:
# 16k tokens, hidden 2048, H = 2048 / D query and KV heads).
DECODE_GRID = [(1, 4096), (1, 32768), (16, 4096), (64, 2048), (64, 8192), (128, 4096), (32, 32768)]
APPEND_PREFIXES = [4096, 16384]
PREFILL_GRID = [(s, c) for s in (512, 1024, 2048, 4096, 8192, 16384) for c in (0, 1)]


def grid():
    base = dict(device="cuda", dtype="bf16", hq=32, hkv=8, d=128, page=16, causal=1, layout="nhd", shape_label=None)
    for b, l in DECODE_GRID:
        yield SimpleNamespace(**base, kernel="decode", batch=b, len=l, q_len=1)
    for prefix in APPEND_PREFIXES:
        yield SimpleNamespace(**base, kernel="append", batch=1, len=prefix, q_len=512)
    for s, causal in PREFILL_GRID:
        h = 2048 // 128
        yield SimpleNamespace(**{**base, "hq": h, "hkv": h, "causal": causal}, kernel="prefill", batch=16384 // s, len=s,
                              q_len=s)


def main():
    a = _common.parse_args("decode")
    shapes = [a] if a.len else list(grid())
    # KVTILE_FLASHINFER_SUITES=decode,append: only those suites of the grid.
    only = os.environ.get("KVTILE_FLASHINFER_SUITES")
    if only and not a.len:
        shapes = [s for s in shapes if s.kernel in only.split(",")]
    try:
        fi = load_flashinfer()
    except Exception as e:
        for suite in sorted({s.kernel for s in shapes}):
            _common.skip(suite, _common.label(a) if a.len else "*", "flashinfer", str(e)[:300])
        return 0
    for s in shapes:
        measure(fi, s)
        # KVTILE_FLASHINFER_FP8=0 leaves out the fp8 decode rows.
        if s.kernel == "decode" and s.q_len == 1 and os.environ.get("KVTILE_FLASHINFER_FP8", "1") != "0":
            measure_fp8(fi, s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
