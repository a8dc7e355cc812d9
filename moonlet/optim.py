"""MuonClip: Muon for hidden matrices + AdamW for the rest as one optimizer, QK-Clip, and the aux-loss-free
router balancing of DeepSeek-V3 / K2 (K2_SPEC.md sections 1 and 3).

- `MuonAdamW`: one torch.optim.Optimizer whose param groups say which rule they use (`kind` "muon" or
  "adamw"). Muon runs Newton-Schulz batched over leading dims, so a stacked expert tensor [E, out, in] is
  orthogonalized per expert in one call, and scales the update by Moonlight's `0.2 * sqrt(max(out, in))`
  so its RMS matches AdamW's and the AdamW lr / weight decay carry over unchanged. Matrices of one shape
  across layers share one batched Newton-Schulz call; AdamW is torch's fused kernel. bf16 parameters
  (`moonlet train --precision bf16`) are updated through fp32 master copies kept in the optimizer state.
- `qk_clip`: after the step, heads whose max pre-softmax logit S_h exceeded tau get their q_nope and k_nope
  rows scaled by sqrt(tau / S_h) and their q_pe rows by tau / S_h (never the shared k_pe or the v rows).
  S_h was measured before the update, so the clip maps the pre-update weights to exactly tau; the next
  forward sees tau times that one update's logit growth (negligible at K2's lr, ~4% at 100x it) on a new
  batch, whose max differs by a few % more (docs/experiments/muonclip.md measures both).
- `RouterBalancer`: sums the tokens per expert over the step's micro-batches (and ranks) and moves each
  router's correction bias by `u * sign(mean_load - load)`; `seq_aux_loss` is the optional tiny aux loss.

Data parallel: every rank holds full gradients after the all-reduce, so Muon orthogonalizes full matrices
(the result Moonlight's distributed Muon computes); the max logits (MAX) and expert loads (SUM) are reduced
here so every rank applies the same clip and bias update and the replicas never drift.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# ------------------------------------------------------------------------------------------------------
# Muon


def newton_schulz(G: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximately orthogonalize the last two dims of G (batched over any leading dims): the quintic
    iteration of Muon on G / ||G||_F, transposed when tall so the Gram matrix is the small one."""
    a, b, c = NS_COEFFS
    X = G.to(dtype)
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.mT
    shape = X.shape
    X = X.reshape(-1, *shape[-2:])  # [batch, m, n], m <= n
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        # the polynomial's sums ride in the GEMM epilogues: over all 64 experts x 3 matrices x layers, separate
        # elementwise passes would move about as many bytes as the matmuls take time
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    X = X.reshape(shape)
    return X.mT if tall else X


def newton_schulz_flops(shape: torch.Size, steps: int = 5) -> int:
    """FLOPs of `newton_schulz` on a tensor of this shape: per step X X^T (2 m^2 n), A A (2 m^3), B X (2 m^2 n),
    with m <= n. Muon pays this every step whatever the batch size."""
    m, n = sorted(shape[-2:])
    return math.prod(shape[:-2]) * steps * (4 * m * m * n + 2 * m**3)


def muon_scale(shape: torch.Size) -> float:
    """Moonlight's update scaling 0.2 * sqrt(max(A, B)) of one [A, B] matrix: update RMS ~ AdamW's 0.2."""
    return 0.2 * math.sqrt(max(shape[-2], shape[-1]))


class MuonAdamW(torch.optim.Optimizer):
    """Muon (momentum 0.95, Nesterov, 5 Newton-Schulz steps) on groups with kind="muon", AdamW on groups with
    kind="adamw". Build it with `build_optimizer`; each group keeps its own lr / weight_decay and a `name`."""

    def __init__(self, groups: list[dict], lr: float = 2e-4, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, ns_dtype: torch.dtype = torch.bfloat16,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        betas=betas, eps=eps, kind="adamw", name="")
        self.ns_dtype = ns_dtype
        super().__init__(groups, defaults)
        for g in self.param_groups:
            if g["kind"] not in ("muon", "adamw"):
                raise ValueError(f"param group {g['name']!r}: kind={g['kind']!r}, expected 'muon' or 'adamw'")
            g.setdefault("base_lr", g["lr"])

    @torch.no_grad()
    def step(self, closure=None):
        """Each group's rule on fp32 weights: the parameters themselves, or for bf16 parameters (moonlet train
        --precision bf16) an fp32 master copy kept in the state, which the bf16 weights are then copied from."""
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            weights = [self.master(p) for p in params]
            grads = [p.grad.float() for p in params]
            if group["kind"] == "muon":
                self._muon(group, params, weights, grads)
            else:
                self._adamw(group, params, weights, grads)
            low = [(p, w) for p, w in zip(params, weights) if w is not p]
            if low:
                torch._foreach_copy_([p for p, _ in low], [w for _, w in low])
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """torch casts every saved state tensor to its parameter's dtype; the fp32 masters, momenta and moments of
        bf16 parameters must stay fp32, so each goes back in its saved dtype (on the parameter's device)."""
        super().load_state_dict(state_dict)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            for k, v in state_dict["state"].get(i, {}).items():
                if torch.is_tensor(v) and v.dtype != self.state[p][k].dtype:
                    self.state[p][k] = v.to(p.device, copy=True)

    def master(self, p: torch.Tensor) -> torch.Tensor:
        """The fp32 weights the update applies to: p itself when fp32, else its master copy (made on first use)."""
        if p.dtype == torch.float32:
            return p
        state = self.state[p]
        if "master" not in state:
            state["master"] = p.detach().float()
        return state["master"]

    def _muon(self, group: dict, params: list, weights: list, grads: list) -> None:
        """Momentum for the whole group in foreach launches, then Newton-Schulz batched over every matrix of the
        same shape (tall ones transposed): the 16 layers' q_proj, or all layers' experts, in one call each,
        instead of one small-GEMM chain per parameter."""
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(g)) for p, g in zip(params, grads)]
        torch._foreach_mul_(bufs, mu)
        torch._foreach_add_(bufs, grads)
        updates = torch._foreach_add(grads, bufs, alpha=mu) if group["nesterov"] else bufs
        torch._foreach_mul_(weights, 1 - lr * wd)
        for batch in _same_shape_batches(weights):
            mats = [(updates[i].mT if tall else updates[i]) for i, tall in batch]
            ortho = newton_schulz_many(mats, group["ns_steps"], self.ns_dtype)
            for (i, tall), o in zip(batch, ortho):
                # w (fp32) += bf16 update in one pass: the in-place add promotes, no fp32 copy of the update
                weights[i].add_(o.mT if tall else o, alpha=-lr * muon_scale(weights[i].shape))

    def _adamw(self, group: dict, params: list, weights: list, grads: list) -> None:
        """torch's fused AdamW kernel (torch.optim.AdamW(fused=True)'s update): one pass over w, g, m, v."""
        lr, wd, (b1, b2), eps = group["lr"], group["weight_decay"], group["betas"], group["eps"]
        states = [self.state[p] for p in params]
        for w, g, state in zip(weights, grads, states):
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=w.device)
                state["exp_avg"] = torch.zeros_like(g)
                state["exp_avg_sq"] = torch.zeros_like(g)
            elif not torch.is_tensor(state["step"]) or state["step"].device != w.device:
                # a checkpoint of an older moonlet (int steps) or one torch loaded onto the CPU
                state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(w.device)
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1)
        torch._fused_adamw_(weights, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
                            steps, lr=lr, beta1=b1, beta2=b2, weight_decay=wd, eps=eps, amsgrad=False,
                            maximize=False)


MUON_BATCH_BYTES = 2 << 30  # cap on one batched Newton-Schulz input (bf16), so big models stay within memory


def _same_shape_batches(params: list[torch.Tensor]) -> list[list[tuple[int, bool]]]:
    """Group parameter indices by the (short, long) shape of their last two dims, with a flag for tall ones
    (to be transposed), each batch under MUON_BATCH_BYTES of bf16 input: one Newton-Schulz call per batch."""
    batches: dict[tuple, list[tuple[int, bool]]] = {}
    bytes_in: dict[tuple, int] = {}
    done: list[list[tuple[int, bool]]] = []
    for i, p in enumerate(params):
        m, n = p.shape[-2:]
        key = (min(m, n), max(m, n), p.device)
        if key in batches and bytes_in[key] + 2 * p.numel() > MUON_BATCH_BYTES:
            done.append(batches.pop(key))
            bytes_in[key] = 0
        batches.setdefault(key, []).append((i, m > n))
        bytes_in[key] = bytes_in.get(key, 0) + 2 * p.numel()
    return done + list(batches.values())


def newton_schulz_many(mats: list[torch.Tensor], steps: int = 5,
                       dtype: torch.dtype = torch.bfloat16) -> list[torch.Tensor]:
    """`newton_schulz` of each of several tensors whose last two dims share one shape, in one batched call:
    they are copied (and cast) into one stacked input; the outputs are views of one result."""
    if len(mats) == 1:
        return [newton_schulz(mats[0], steps, dtype)]
    m, n = mats[0].shape[-2:]
    sizes = [math.prod(t.shape[:-2]) for t in mats]
    stacked = torch.empty(sum(sizes), m, n, dtype=dtype, device=mats[0].device)
    torch._foreach_copy_(list(stacked.split(sizes)), [t.reshape(-1, m, n) for t in mats])
    out = newton_schulz(stacked, steps, dtype)
    return [o.view(t.shape) for o, t in zip(out.split(sizes), mats)]


def param_groups(model: nn.Module, optimizer: str = "muon") -> dict[str, list[nn.Parameter]]:
    """Split parameters by rule. muon: every hidden matrix (attention projections, dense and shared MLPs,
    stacked experts, routers). adamw: embeddings and head. adamw_no_decay: norms and biases.
    With optimizer="adamw" the hidden matrices go to AdamW too (the baseline)."""
    groups: dict[str, list[nn.Parameter]] = {"muon": [], "adamw": [], "adamw_no_decay": []}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.ndim < 2 or name.endswith(".bias"):
            groups["adamw_no_decay"].append(p)
        elif name.startswith(("embed_tokens", "lm_head")) or ".embed_tokens." in name or ".lm_head." in name:
            groups["adamw"].append(p)
        else:
            groups["muon" if optimizer == "muon" else "adamw"].append(p)
    return groups


def build_optimizer(model: nn.Module, optimizer: str = "muon", lr: float = 2e-4, weight_decay: float = 0.1,
                    ns_dtype: torch.dtype = torch.bfloat16, **kw) -> MuonAdamW:
    """The one optimizer of a training run: optimizer="muon" (MuonClip's Muon + AdamW) or "adamw" (all AdamW)."""
    if optimizer not in ("muon", "adamw"):
        raise ValueError(f"--optimizer {optimizer!r}: choose 'muon' or 'adamw'")
    groups = param_groups(model, optimizer)
    spec = [dict(name="muon", kind="muon", params=groups["muon"]),
            dict(name="adamw", kind="adamw", params=groups["adamw"]),
            dict(name="adamw_no_decay", kind="adamw", params=groups["adamw_no_decay"], weight_decay=0.0)]
    return MuonAdamW([g for g in spec if g["params"]], lr=lr, weight_decay=weight_decay, ns_dtype=ns_dtype, **kw)


def set_lr(opt: torch.optim.Optimizer, factor: float) -> None:
    """Scale every group's base lr by the schedule factor."""
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * factor


# ------------------------------------------------------------------------------------------------------
# QK-Clip


def track_max_logits(model: nn.Module, on: bool = True) -> None:
    """Make every attention layer record its per-head max pre-softmax logit (accumulated until reset)."""
    for attn in model.attention_layers():
        attn.track_max_logits = on
        attn.max_logits = None


def reduce_max_logits(model: nn.Module) -> list[torch.Tensor | None]:
    """The step's per-head max logits of each layer, MAX-reduced over ranks (all-or-none layers tracked)."""
    out = [attn.max_logits for attn in model.attention_layers()]
    if _dist() and all(s is not None for s in out):
        flat = torch.stack(out)
        dist.all_reduce(flat, op=dist.ReduceOp.MAX)
        out = list(flat.unbind(0))
    return out


@torch.no_grad()
def qk_clip(model: nn.Module, tau: float | None = 100.0, opt: MuonAdamW | None = None) -> dict:
    """Apply QK-Clip with the max logits recorded since the last call, then reset them. Returns metrics:
    max logit per layer (before the clip) and heads clipped. tau=None only measures (vanilla Muon).
    opt: the run's optimizer, whose fp32 master weights of bf16 parameters are clipped too."""
    cfg = model.cfg
    nope, rope, v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    layers = [(attn, S) for attn, S in zip(model.attention_layers(), reduce_max_logits(model)) if S is not None]
    for attn in model.attention_layers():
        attn.max_logits = None
    if not layers:
        return {"heads_clipped": 0}
    S_all = torch.stack([S for _, S in layers]).float()  # [layers, H]
    over = S_all > (tau if tau is not None else float("inf"))
    if tau is not None:
        # every head is scaled, by exactly 1 where S_h <= tau (x * 1.0 == x): no host sync to decide which
        gamma = torch.where(over, tau / S_all, torch.ones_like(S_all))
        for (attn, _), g in zip(layers, gamma):
            H, root = attn.n_heads, g.sqrt()
            q_param = attn.q_proj.weight if cfg.q_lora_rank is None else attn.q_b_proj.weight
            for param in (q_param, attn.kv_b_proj.weight):
                # bf16 weights: clip the fp32 master and copy it in (else the next step's copy would undo it)
                w = opt.master(param) if opt is not None else param
                if param is q_param:
                    wq = w.view(H, nope + rope, -1)  # a view: the scaling lands in the weights
                    wq[:, :nope] *= root.to(w.dtype)[:, None, None]
                    wq[:, nope:] *= g.to(w.dtype)[:, None, None]
                else:  # kv_b_proj: k_nope rows only; v rows untouched
                    w.view(H, nope + v, -1)[:, :nope] *= root.to(w.dtype)[:, None, None]
                if w is not param:
                    param.copy_(w)
    *per_layer, clipped = torch.cat([S_all.amax(-1), over.sum().reshape(1)]).tolist()  # one device->host copy
    return {"heads_clipped": int(clipped), "max_logit": max(per_layer), "max_logit_per_layer": per_layer}


# ------------------------------------------------------------------------------------------------------
# aux-loss-free load balancing


class RouterBalancer:
    """Tokens per expert summed over a step's micro-batches; `step` moves the correction biases by
    `u * sign(mean_load - load)` (DeepSeek-V3's u = 0.001) and returns load metrics. u=0 only measures."""

    def __init__(self, model: nn.Module, u: float = 1e-3):
        self.moes = model.moe_layers()
        self.u = u
        self.loads: list[torch.Tensor | None] = [None] * len(self.moes)

    def accumulate(self) -> None:
        """Call after each training forward."""
        for i, moe in enumerate(self.moes):
            c = moe.last_expert_counts
            if c is not None:
                c = c.float()
                self.loads[i] = c if self.loads[i] is None else self.loads[i] + c

    @torch.no_grad()
    def step(self) -> dict:
        if not self.moes or any(x is None for x in self.loads):
            return {}
        loads = torch.stack(self.loads)  # [layers, E]
        if _dist():
            dist.all_reduce(loads)
        mean = loads.mean(-1, keepdim=True)
        if self.u:
            for moe, load, m in zip(self.moes, loads, mean):
                moe.gate.e_score_correction_bias.add_(self.u * torch.sign(m - load))
        self.loads = [None] * len(self.moes)
        ratio = (loads.max(-1).values / mean.squeeze(-1).clamp(min=1e-9))
        return {"expert_load_max_over_mean": [round(r, 4) for r in ratio.tolist()],  # one device->host copy each
                "experts_without_tokens": (loads == 0).sum(-1).tolist()}


def seq_aux_loss(model: nn.Module, batch_size: int, alpha: float = 1e-4) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss alpha * sum_i f_i P_i per sequence, averaged over sequences and
    MoE layers: f_i = E/(K T) * tokens routed to i, P_i = mean over the sequence of the normalized scores."""
    total = None
    moes = model.moe_layers()
    for moe in moes:
        scores, ids = moe.last_scores, moe.last_ids
        E, K = scores.shape[-1], ids.shape[-1]
        scores = scores.view(batch_size, -1, E)
        T = scores.shape[1]
        hits = torch.zeros_like(scores).scatter_(2, ids.view(batch_size, T, K), 1.0)
        f = hits.sum(1) * (E / (K * T))
        P = (scores / scores.sum(-1, keepdim=True)).mean(1)
        loss = (f * P).sum(-1).mean()
        total = loss if total is None else total + loss
    if total is None:
        return torch.zeros(())
    return alpha * total / len(moes)


def grad_norm(params: Iterable[torch.Tensor]) -> float:
    grads = [p.grad.float().norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0
