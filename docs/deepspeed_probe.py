"""DeepSpeed two-engine probe (generator G + fake-score F), CPU, 2 ranks over gloo.

Run (see docs/deepspeed_findings.md):
  DS_ACCELERATOR=cpu deepspeed --num_gpus 2 docs/deepspeed_probe.py --stage 2 --freeze toggle
  DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 docs/deepspeed_probe.py --stage 2 --freeze toggle

Each step: phase 1 trains F on x = G(z) (no grad), phase 2 trains G through the
frozen F forward: loss_G = mean((T(x) - F(x))^2) + 0.1 mean(x^2), T = teacher outside
any engine.  Rank 0 also runs a plain single-process torch reference (same init,
same global batch) and prints per-step losses and the max abs / rel difference.

--freeze func   : torch.func.functional_call(engine_F.module, detached params)
--freeze toggle : requires_grad_(False) on F params, call engine_F.module(x), restore
--freeze toggle_engine : same but call engine_F(x) (the engine's forward)
--freeze gather : GatheredParameters + functional_call on an un-hooked copy of F
Other flags: --gas 2 --clip 0.05 --bf16 --opt bnb8 --hidden 128 --zero-extra JSON,
checkpoint: --steps 3 --save DIR, then --steps 5 --load DIR (continues at step 3).
"""
import argparse, copy, json, os
import torch
import torch.nn as nn
import torch.nn.functional as Fn
import deepspeed
import deepspeed.comm as dist

p = argparse.ArgumentParser()
p.add_argument("--stage", type=int, default=0)
p.add_argument("--freeze", choices=["func", "toggle", "toggle_engine", "gather"], default="toggle")
p.add_argument("--steps", type=int, default=5)
p.add_argument("--gas", type=int, default=1)
p.add_argument("--clip", type=float, default=0.0)
p.add_argument("--bf16", action="store_true")
p.add_argument("--opt", choices=["adam", "bnb8"], default="adam")
p.add_argument("--save", default="", help="save both engines here after --steps")
p.add_argument("--load", default="", help="load both engines from here first")
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--hidden", type=int, default=64)
p.add_argument("--zero-extra", default="{}", help='JSON merged into zero_optimization')
p.add_argument("--local_rank", type=int, default=-1)  # passed by the deepspeed launcher
args = p.parse_args()

GLOBAL_BATCH, ZD, XD, H = 8, 8, 16, args.hidden


def mlp(i, o):
    return nn.Sequential(nn.Linear(i, H), nn.SiLU(), nn.Linear(H, H), nn.SiLU(), nn.Linear(H, o))


def build():
    torch.manual_seed(0)
    G, F, T = mlp(ZD, XD), mlp(XD, XD), mlp(XD, XD)
    T.requires_grad_(False)
    return G, F, T


def batch(step, micro, gas):
    """Deterministic global micro batch for (step, micro)."""
    g = torch.Generator().manual_seed(1000 * step + micro)
    n = GLOBAL_BATCH // gas
    return torch.randn(n, ZD, generator=g), torch.randn(n, XD, generator=g)


def make_opt(params):
    if args.opt == "bnb8":
        import bitsandbytes as bnb
        return bnb.optim.Adam8bit(params, lr=args.lr, betas=(0.0, 0.999), eps=1e-8)
    return torch.optim.Adam(params, lr=args.lr, betas=(0.0, 0.999), eps=1e-8)


def loss_g_fn(x, y, t):
    return (t.float() - y.float()).pow(2).mean() + 0.1 * x.float().pow(2).mean()


def reference(n_steps):
    """Plain single-process torch, full global batch, same accumulation/clipping."""
    G, F, T = build()
    dt = torch.bfloat16 if args.bf16 else torch.float32
    G, F, T = G.to(dt), F.to(dt), T.to(dt)
    oG, oF = make_opt(G.parameters()), make_opt(F.parameters())
    out = []
    for s in range(n_steps):
        lf = lg = 0.0
        for m in range(args.gas):
            z, noise = batch(s, m, args.gas)
            with torch.no_grad():
                x = G(z.to(dt))
            l = Fn.mse_loss(F(x + noise.to(dt)).float(), noise)
            (l / args.gas).backward(); lf += l.item() / args.gas
        if args.clip: nn.utils.clip_grad_norm_(F.parameters(), args.clip)
        oF.step(); oF.zero_grad()
        F.requires_grad_(False)
        for m in range(args.gas):
            z, _ = batch(s, m, args.gas)
            x = G(z.to(dt))
            l = loss_g_fn(x, F(x), T(x))
            (l / args.gas).backward(); lg += l.item() / args.gas
        F.requires_grad_(True)
        if args.clip: nn.utils.clip_grad_norm_(G.parameters(), args.clip)
        oG.step(); oG.zero_grad()
        out.append((lf, lg))
    return out


def ds_config(world):
    cfg = {
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // args.gas // world,
        "gradient_accumulation_steps": args.gas,
        "zero_optimization": {"stage": args.stage, **json.loads(args.zero_extra)},
        "steps_per_print": 10**9,
    }
    if args.clip:
        cfg["gradient_clipping"] = args.clip
    if args.bf16:
        cfg["bf16"] = {"enabled": True}
    if args.opt == "bnb8":  # client optimizer: ZeRO refuses it without this key
        cfg["zero_allow_untested_optimizer"] = True
    if args.opt == "adam":  # DS-built torch.optim.Adam (FusedAdam needs a JIT build)
        cfg["optimizer"] = {"type": "Adam", "params": {
            "lr": args.lr, "betas": [0.0, 0.999], "eps": 1e-8, "weight_decay": 0.0,
            "torch_adam": True, "adam_w_mode": False}}
    return cfg


def frozen_F(eF, F_shadow, x):
    """Forward through F with no gradient into F's weights (grad flows to x)."""
    mod = eF.module
    if args.freeze == "func":
        params = {k: v.detach() for k, v in mod.named_parameters()}
        return torch.func.functional_call(mod, params, (x,))
    if args.freeze == "gather":
        ps = list(mod.named_parameters())
        with deepspeed.zero.GatheredParameters([v for _, v in ps], modifier_rank=None):
            params = {k: v.detach().clone() for k, v in ps}
        return torch.func.functional_call(F_shadow, params, (x,))
    # toggle*: caller switched requires_grad off
    return eF(x) if args.freeze == "toggle_engine" else mod(x)


def main():
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    G, F, T = build()
    F_shadow = copy.deepcopy(F)  # plain module, used only by --freeze gather
    cfg = ds_config(world)
    kw = lambda m: ({"optimizer": make_opt(m.parameters())} if args.opt == "bnb8"
                    else {"model_parameters": m.parameters()})
    eG, _, _, _ = deepspeed.initialize(model=G, config=copy.deepcopy(cfg), **kw(G))
    eF, _, _, _ = deepspeed.initialize(model=F, config=copy.deepcopy(cfg), **kw(F))
    dt = torch.bfloat16 if args.bf16 else torch.float32
    T = T.to(dt)
    start = 0
    if args.load:
        _, cs = eG.load_checkpoint(os.path.join(args.load, "G"))  # tag from "latest"
        eF.load_checkpoint(os.path.join(args.load, "F"))
        start = cs["step"]
    n = GLOBAL_BATCH // args.gas // world
    sl = slice(rank * n, (rank + 1) * n)

    def avg(v):  # mean of a scalar over ranks
        t = torch.tensor([v], dtype=torch.float64)
        dist.all_reduce(t)
        return t.item() / world

    res = []
    for s in range(start, args.steps):
        lf = lg = 0.0
        for m in range(args.gas):  # phase 1: F update
            z, noise = batch(s, m, args.gas)
            z, noise = z[sl].to(dt), noise[sl].to(dt)
            with torch.no_grad():
                x = eG(z)
            l = Fn.mse_loss(eF(x + noise).float(), noise.float())
            eF.backward(l); eF.step(); lf += avg(l.item()) / args.gas
        if args.freeze.startswith("toggle"):
            for q in eF.module.parameters(): q.requires_grad_(False)
        for m in range(args.gas):  # phase 2: G update through frozen F
            z, _ = batch(s, m, args.gas)
            x = eG(z[sl].to(dt))
            l = loss_g_fn(x, frozen_F(eF, F_shadow, x), T(x))
            eG.backward(l); eG.step(); lg += avg(l.item()) / args.gas
        if args.freeze.startswith("toggle"):
            for q in eF.module.parameters(): q.requires_grad_(True)
        res.append((s, lf, lg))
        if rank == 0:
            print(f"step {s} loss_F {lf!r} loss_G {lg!r}", flush=True)
    if args.save:
        tag = f"step{args.steps}"
        eG.save_checkpoint(os.path.join(args.save, "G"), tag=tag, client_state={"step": args.steps})
        eF.save_checkpoint(os.path.join(args.save, "F"), tag=tag, client_state={"step": args.steps})
    if args.opt == "bnb8" and rank == 0:
        st = eF.optimizer.optimizer.state if hasattr(eF.optimizer, "optimizer") else eF.optimizer.state
        dts = sorted({f"{k}:{v.dtype}:{tuple(v.shape)}" for s_ in st.values()
                      for k, v in s_.items() if torch.is_tensor(v)})
        print("bnb state:", dts)
    if rank == 0:
        ref = reference(args.steps)
        da = dr = 0.0
        for s, lf, lg in res:
            for a, b in ((lf, ref[s][0]), (lg, ref[s][1])):
                da = max(da, abs(a - b)); dr = max(dr, abs(a - b) / max(abs(b), 1e-12))
            print(f"ref  {s} loss_F {ref[s][0]!r} loss_G {ref[s][1]!r}")
        print("RESULT " + json.dumps({"stage": args.stage, "freeze": args.freeze, "gas": args.gas,
              "clip": args.clip, "bf16": args.bf16, "opt": args.opt, "load": bool(args.load),
              "steps_run": len(res), "max_abs": da, "max_rel": dr,
              "ds_optimizer": type(eG.optimizer).__name__}), flush=True)
    dist.barrier()


if __name__ == "__main__":
    main()
