"""Self-test on the GPU machine AFTER install.sh unpacked vLLM into /tmp/site.

  source scripts/peer/vllm/env.sh && python3 scripts/peer/vllm/selftest.py [--no-gpu-kernels]

Checks, in order, and prints PASS/FAIL per line (exit 1 if any FAIL):
  1. vllm imports from /tmp/site and reports 0.24.0;
  2. every native extension that is shipped loads (FA2, the MoE extension and the
     Blackwell kernels were left out on purpose and must NOT be expected);
  3. vLLM sees a CUDA platform with capability 9.x and picks FLASH_ATTN with FA3 for
     the three configs;
  4. a few _C kernels and the FA3 paged-attention kernel run on the GPU and agree
     with PyTorch references (this is what validates the sm_90-pruned _C);
  5. the server module and the offline LLM class import.
"""
import itertools
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = [os.path.join(HERE, "configs", n) for n in ("smollm2-135m", "llama-3.2-1b", "llama-3.1-8b")]
failed = []


def check(name, fn, critical=True):
    t = time.time()
    try:
        detail = fn()
        print(f"[PASS] {name}{': ' + str(detail) if detail else ''} ({time.time() - t:.1f}s)", flush=True)
        return True
    except Exception as e:
        print(f"[{'FAIL' if critical else 'WARN'}] {name}: {e!r}", flush=True)
        traceback.print_exc(limit=6)
        if critical:
            failed.append(name)
        return False


def t_version():
    import vllm
    assert vllm.__file__.startswith("/tmp/site/"), vllm.__file__
    assert vllm.__version__.startswith("0.24.0"), vllm.__version__
    return f"{vllm.__version__} from {os.path.dirname(vllm.__file__)}"


def t_extensions():
    import importlib
    import torch  # noqa: F401  (the extensions need libtorch loaded first)
    got = []
    for m in ("vllm._C_stable_libtorch", "vllm._qutlass_C", "vllm._flashmla_C",
              "vllm._flashmla_extension_C", "vllm.cumem_allocator", "vllm.spinloop",
              "vllm._rust_tool_parser", "vllm.vllm_flash_attn._vllm_fa3_C"):
        importlib.import_module(m)
        got.append(m.split(".")[-1])
    from vllm.vllm_flash_attn import flash_attn_interface as fai
    assert fai.FA3_AVAILABLE, fai.FA3_UNAVAILABLE_REASON
    moe = "present" if importlib.util.find_spec("vllm._moe_C_stable_libtorch") else "absent (expected)"
    return f"{', '.join(got)}; FA2 available={fai.FA2_AVAILABLE} (expected False); MoE ext {moe}"


def t_platform():
    from vllm.platforms import current_platform
    cap = current_platform.get_device_capability()
    assert current_platform.is_cuda(), type(current_platform).__name__
    assert cap is not None and cap.major == 9, cap
    return f"{type(current_platform).__name__}, {current_platform.get_device_name()}, sm_{cap.major}{cap.minor}"


def t_backends():
    from vllm.config import set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.attention.backends.fa_utils import get_flash_attn_version
    from vllm.v1.attention.selector import get_attn_backend
    out = []
    for cfgdir in CONFIGS:
        cfg = EngineArgs(model=cfgdir, load_format="dummy", skip_tokenizer_init=True).create_engine_config()
        mc = cfg.model_config
        with set_current_vllm_config(cfg):
            hs = mc.get_head_size()
            b = get_attn_backend(hs, mc.dtype, "auto", num_heads=mc.get_num_attention_heads(cfg.parallel_config))
            fav = get_flash_attn_version(head_size=hs)
        assert b.get_name() == "FLASH_ATTN" and fav == 3, (b.get_name(), fav)
        out.append(f"{os.path.basename(cfgdir)}: {b.get_name()} FA{fav} head={hs} dtype={mc.dtype} max_len={mc.max_model_len}")
    return "; ".join(out)


def t_kernels():
    import torch
    import vllm._C_stable_libtorch  # noqa: F401  (registers torch.ops._C / _C_cache_ops)
    import torch.nn.functional as F
    from vllm.vllm_flash_attn import flash_attn_varlen_func
    dev = torch.device("cuda:0")
    bf = torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    rep = []

    def close(a, b, tol, what, rtol=0.03):
        # |a - b| <= tol + rtol * |b| everywhere (bf16 keeps ~3 significant digits);
        # a kernel that loaded the wrong code is off by O(1), far outside this.
        a, b = a.float(), b.float()
        excess = ((a - b).abs() - rtol * b.abs()).max().item()
        err = (a - b).abs().max().item()
        assert excess <= tol, f"{what}: max abs err {err:.4f}, excess over tolerance {excess:.4f}"
        rep.append(f"{what} maxerr={err:.3g}")

    # rms_norm
    x = torch.randn(37, 576, device=dev, dtype=bf, generator=g)
    w = torch.randn(576, device=dev, dtype=bf, generator=g)
    out = torch.empty_like(x)
    torch.ops._C.rms_norm(out, x, w, 1e-5)
    xf = x.float()
    ref = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(bf).float() * w.float()
    close(out, ref, 0.03, "rms_norm")
    # fused_add_rms_norm (in place)
    x2, r2 = x.clone(), torch.randn_like(x)
    s = (x2.float() + r2.float())
    torch.ops._C.fused_add_rms_norm(x2, r2, w, 1e-5)
    ref = (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5)).to(bf).float() * w.float()
    close(x2, ref, 0.05, "fused_add_rms_norm", rtol=0.05)
    # silu_and_mul
    gu = torch.randn(37, 2 * 1536, device=dev, dtype=bf, generator=g)
    o = torch.empty(37, 1536, device=dev, dtype=bf)
    torch.ops._C.silu_and_mul(o, gu)
    close(o, F.silu(gu[:, :1536].float()) * gu[:, 1536:].float(), 0.03, "silu_and_mul")
    # rotary_embedding (neox, head 64)
    T, nh, nkv, hd = 37, 9, 3, 64
    pos = torch.randint(0, 8192, (T,), device=dev, generator=g)
    inv = 1.0 / (100000.0 ** (torch.arange(0, hd, 2, device=dev, dtype=torch.float32) / hd))
    fr = torch.outer(torch.arange(8192, device=dev, dtype=torch.float32), inv)
    cache = torch.cat([fr.cos(), fr.sin()], dim=-1).to(bf)
    q = torch.randn(T, nh * hd, device=dev, dtype=bf, generator=g)
    k = torch.randn(T, nkv * hd, device=dev, dtype=bf, generator=g)
    q0, k0 = q.clone(), k.clone()
    torch.ops._C.rotary_embedding(pos, q, k, hd, cache, True)

    def rope(t, n):
        t = t.view(T, n, hd).float()
        c, s_ = cache[pos].float().chunk(2, dim=-1)
        c, s_ = c[:, None, :], s_[:, None, :]
        a, b = t[..., : hd // 2], t[..., hd // 2:]
        return torch.cat([a * c - b * s_, b * c + a * s_], dim=-1).view(T, n * hd)
    close(q, rope(q0, nh), 0.05, "rotary q", rtol=0.05)
    close(k, rope(k0, nkv), 0.05, "rotary k", rtol=0.05)
    # paged KV write + FA3 paged varlen attention vs SDPA (GQA 9/3, head 64, block 16)
    for nh, nkv, hd in ((9, 3, 64), (32, 8, 128)):
        seqlens = [5, 33, 17, 64]
        bs, nblk = 16, 32
        kc = torch.zeros(nblk, bs, nkv, hd, device=dev, dtype=bf)
        vc = torch.zeros_like(kc)
        tot = sum(seqlens)
        qq = torch.randn(tot, nh, hd, device=dev, dtype=bf, generator=g)
        kk = torch.randn(tot, nkv, hd, device=dev, dtype=bf, generator=g)
        vv = torch.randn(tot, nkv, hd, device=dev, dtype=bf, generator=g)
        maxb = max((s_ + bs - 1) // bs for s_ in seqlens)
        bt = torch.zeros(len(seqlens), maxb, dtype=torch.int32)
        slots, nxt = [], 1
        for i, s_ in enumerate(seqlens):
            for j in range((s_ + bs - 1) // bs):
                bt[i, j] = nxt
                nxt += 1
            slots += [int(bt[i, t // bs]) * bs + t % bs for t in range(s_)]
        bt = bt.to(dev)
        slot = torch.tensor(slots, device=dev, dtype=torch.int64)
        one = torch.ones(1, device=dev, dtype=torch.float32)
        torch.ops._C_cache_ops.reshape_and_cache_flash(kk, vv, kc, vc, slot, "auto", one, one)
        assert torch.equal(kc.view(-1, nkv, hd)[slot], kk), "reshape_and_cache_flash wrote wrong slots"
        cu = torch.tensor([0] + list(itertools.accumulate(seqlens)), device=dev, dtype=torch.int32)
        used = torch.tensor(seqlens, device=dev, dtype=torch.int32)
        o = flash_attn_varlen_func(qq, kc, vc, max(seqlens), cu, max(seqlens), seqused_k=used,
                                   block_table=bt, causal=True, fa_version=3)
        refs = []
        for i, s_ in enumerate(seqlens):
            a, b = int(cu[i]), int(cu[i + 1])
            qi = qq[a:b].transpose(0, 1)[None].float()
            ki = kk[a:b].repeat_interleave(nh // nkv, dim=1).transpose(0, 1)[None].float()
            vi = vv[a:b].repeat_interleave(nh // nkv, dim=1).transpose(0, 1)[None].float()
            refs.append(F.scaled_dot_product_attention(qi, ki, vi, is_causal=True)[0].transpose(0, 1))
        close(o, torch.cat(refs), 0.06, f"FA3 paged h{nh}/{nkv} d{hd}", rtol=0.05)
    torch.cuda.synchronize()
    return "; ".join(rep)


def t_server_import():
    import vllm.entrypoints.openai.api_server  # noqa: F401
    from vllm.entrypoints.openai.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    p = make_arg_parser(FlexibleArgumentParser())
    a = p.parse_args(["--model", CONFIGS[0], "--load-format", "dummy", "--skip-tokenizer-init"])
    from vllm.entrypoints.openai.api_server import build_app
    app = build_app(a, ("generate",))
    paths = {getattr(r, "path", "") for r in app.routes}
    for need in ("/health", "/v1/completions", "/metrics", "/v1/models"):
        assert need in paths, need
    return f"{len(paths)} routes"


def t_llm_import():
    from vllm import LLM, SamplingParams  # noqa: F401
    from vllm.inputs import TokensPrompt  # noqa: F401
    return "ok"


if __name__ == "__main__":
    check("vllm version and location", t_version)
    check("native extensions", t_extensions)
    check("CUDA platform", t_platform)
    check("attention backend per config", t_backends)
    if "--no-gpu-kernels" not in sys.argv:
        check("GPU kernels (_C pruned to sm_90, FA3)", t_kernels, critical=False)
    check("OpenAI server imports and builds its app", t_server_import)
    check("offline LLM class imports", t_llm_import)
    print(f"selftest: {len(failed)} failed" + (": " + "; ".join(failed) if failed else ""), flush=True)
    sys.exit(1 if failed else 0)
