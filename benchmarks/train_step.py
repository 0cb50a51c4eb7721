"""One optimizer step of MPOBERT against dense BERT, ALBERT and a naive MPOBERT, side by side.

Contenders (same hidden size, layers, heads and intermediate size; dropout off everywhere):

``mpobert``
    :class:`mpobert.MPOBertModel` (shared centrals, per-layer auxiliaries, adapters), the
    model users train, as the Trainer steps it: with ``k > 1`` the micro-batches inside
    :func:`mpo_core.accumulate.weight_cache` (each ``W`` rebuilt once per optimizer step); with
    ``k = 1`` (one process) the plain path below.
``mpobert_plain``
    The same model in a plain loop, ``model(x)`` + ``loss.backward()`` per micro-batch with no
    context to remember: the encoder builds every ``W`` once per forward, batched per shared
    central (:func:`mpo_core.accumulate.forward_weights`), and autograd carries the gradient.
``bert``
    ``transformers.BertModel``: every layer its own dense matrices.
``albert``
    ``transformers.AlbertModel``: one set of dense matrices shared by every layer.
    Both dense baselines run MPOBERT's activation through torch's fused op
    (:data:`DENSE_ACT`: ``gelu_pytorch_tanh`` for tanh-GELU, ``gelu`` for erf-GELU), never
    transformers' Python-level ``gelu_new``, and transformers' SDPA attention.
``naive``
    MPOBERT written the way the public MPOBERT code runs it: every forward rebuilds each
    dense ``W`` from its cores in float32 with plain ``torch.tensordot`` left to right,
    ``nn.LayerNorm`` and ``nn.GELU`` unfused, no caching. Attention is
    ``F.scaled_dot_product_attention`` like every other contender, so the difference is the
    MPO path alone. It holds a copy of the ``mpobert`` model's tensors, so both compute the same
    function: checked at start-up, a difference above :data:`NAIVE_TOL` stops the run.

One optimizer step is ``k`` micro-batches of forward + backward (loss: mean square of the
last hidden state and the pooled output, divided by ``k``), then gradient clipping and the
optimizer (``torch.optim.AdamW`` or :class:`mpobert.optim.LAMB`). Every contender is timed by
the one timer of :mod:`mpo_core.gpu.timing` (CUDA events on a GPU, ``perf_counter`` or
``process_time`` on a CPU) after one warm-up step each, repeats interleaved (contender A, B,
C, D, then again), and each row reports the median step time, its ratio to
``bert`` in the same run, tokens/s, the peak memory of the step (CPU: resident-set growth
allocated-heap growth sampled every 2 ms; CUDA: ``max_memory_allocated``), the unique parameters and the bytes a
data-parallel step all-reduces (the gradients of every trainable parameter, a shared one
once). ``--inference`` adds forward-only rows under ``torch.no_grad``.

Run ``python benchmarks/train_step.py`` (CPU default: MPOBERT-12 shape, 512 tokens per
micro-batch, k = 1 and 4, AdamW; about 4 minutes on 2 cores), ``--full`` for both presets,
k in {1, 4, 8}, 1024-16384 tokens and both optimizers (the GPU default adds bf16 autocast);
``--profile`` sorts one profiled step of every contender into time shares (GEMMs, rebuild, adapters,
attention, norms, copies, optimizer, Python; ``_profile.py``) side by side, with the rebuild's FLOPs
against their floor; ``--profile-rows N`` adds the profiler's top ``N`` operators of each.
The naive contender is in ``_naive.py``, the peak-memory probe in ``_memory.py``.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import statistics
import sys
from dataclasses import dataclass

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks._common import device_description, format_table, write_json  # noqa: E402
from benchmarks._memory import peak_memory  # noqa: E402
from benchmarks._naive import NaiveMPOBert  # noqa: E402
from benchmarks._profile import CATEGORIES, OPTIMIZER_SCOPE, profile_shares, rebuild_floor_flops  # noqa: E402
from mpo_core.accumulate import weight_cache  # noqa: E402
from mpo_core.gpu.timing import CLOCKS, time_calls  # noqa: E402
from mpobert import MPOBertConfig, MPOBertModel  # noqa: E402
from mpobert.optim import LAMB  # noqa: E402

PRESETS = {"mpobert12": MPOBertConfig.mpobert12, "mpobert24": MPOBertConfig.mpobert24, "tiny": MPOBertConfig.tiny}
VARIANTS = ("mpobert", "mpobert_plain", "bert", "albert", "naive")
OPTIMIZERS = ("adamw", "lamb")
DENSE_ACT = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}
"""transformers' ``hidden_act`` of the dense baselines per MPOBERT activation: torch's fused GELU
(``F.gelu(approximate="tanh")`` / ``F.gelu``), the function MPOBERT computes, as fast as torch runs it."""
NAIVE_TOL = 1e-4
"""Largest max |difference| of the last hidden states (LayerNorm outputs, order 1) of ``naive`` and
``mpobert`` at start-up, float32: the two rebuild ``W`` in different orders (measured ~1e-6)."""


# ---------------------------------------------------------------- contenders
def build_variant(name: str, cfg: MPOBertConfig, mpobert: MPOBertModel) -> nn.Module:
    """The model for contender ``name`` at ``cfg``'s shape (``mpobert`` is reused by ``naive``)."""
    if name in ("mpobert", "mpobert_plain"):
        return mpobert
    if name == "naive":
        return NaiveMPOBert(mpobert)
    import transformers

    shape = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                 num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
                 hidden_act=DENSE_ACT[cfg.activation], max_position_embeddings=cfg.max_position_embeddings,
                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=cfg.layer_norm_eps)
    if name == "bert":
        return transformers.BertModel(transformers.BertConfig(**shape))
    if name == "albert":
        return transformers.AlbertModel(transformers.AlbertConfig(embedding_size=cfg.embedding_size, **shape))
    raise ValueError(f"unknown variant {name!r}; expected one of {VARIANTS}")


def encode(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(last hidden state, pooled output)`` of any contender."""
    if isinstance(model, NaiveMPOBert):
        return model(ids)
    out = model(input_ids=ids)
    return out.last_hidden_state, out.pooler_output


def loss_of(hidden: torch.Tensor, pooled: torch.Tensor, k: int) -> torch.Tensor:
    return (hidden.float().square().mean() + pooled.float().square().mean()) / k


def unique_params(model: nn.Module) -> list[nn.Parameter]:
    """Parameters, each shared one once (``model.parameters()`` already deduplicates)."""
    return [p for p in model.parameters() if p.numel() > 0]


def allreduce_bytes(model: nn.Module) -> int:
    """Bytes of the gradients a data-parallel step all-reduces: every trainable parameter once."""
    return sum(p.numel() * p.element_size() for p in unique_params(model) if p.requires_grad)


def make_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in unique_params(model) if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01)
    if name == "lamb":
        return LAMB(params, lr=1e-5, weight_decay=0.01)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")


@dataclass
class Setting:
    """One row group: ``k`` micro-batches of ``batch x seq`` tokens, an optimizer and a precision."""

    k: int
    batch: int
    seq: int
    optimizer: str
    precision: str
    inference: bool = False

    @property
    def tokens(self) -> int:
        return self.k * self.batch * self.seq

    def label(self) -> str:
        if self.inference:
            return f"infer {self.batch}x{self.seq} {self.precision}"
        return f"k={self.k} x {self.batch}x{self.seq} {self.optimizer} {self.precision}"


class Contender:
    """A model with its optimizer and inputs, ready to run one step of a :class:`Setting`."""

    def __init__(self, name: str, model: nn.Module, setting: Setting, device: torch.device, vocab: int, seed: int) -> None:
        self.name, self.model, self.setting, self.device = name, model, setting, device
        gen = torch.Generator().manual_seed(seed)
        self.batches = [torch.randint(1, vocab, (setting.batch, setting.seq), generator=gen).to(device)
                        for _ in range(setting.k)]
        self.optimizer = None if setting.inference else make_optimizer(setting.optimizer, model)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.setting.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def step(self) -> None:
        """One optimizer step (or one inference forward)."""
        if self.setting.inference:
            self.model.eval()
            with torch.no_grad(), self._autocast():
                encode(self.model, self.batches[0])
            return
        self.model.train()
        k = self.setting.k
        trainer_cache = self.name == "mpobert" and k > 1  # as mpobert.train.Trainer decides (one process)
        amp = None if self.setting.precision == "fp32" else torch.bfloat16
        with weight_cache(self.model, dtype=amp) if trainer_cache else contextlib.nullcontext():
            for ids in self.batches:
                with self._autocast():
                    loss = loss_of(*encode(self.model, ids), k)
                loss.backward()
        with torch.profiler.record_function(OPTIMIZER_SCOPE):
            params = [p for p in self.model.parameters() if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


def check_naive(mpobert: MPOBertModel, naive: NaiveMPOBert, vocab: int, tol: float = NAIVE_TOL) -> float:
    """Max abs difference of the two models' last hidden states on a small batch (float32);
    a ``RuntimeError`` when it exceeds ``tol`` (the two would not compute the same function)."""
    ids = torch.randint(1, vocab, (2, 16))
    with torch.no_grad():
        a = mpobert(input_ids=ids).last_hidden_state
        b = naive(ids)[0]
    diff = float((a - b).abs().max())
    if not diff <= tol:
        raise RuntimeError(f"naive and mpobert differ by {diff:.3e} > {tol:.0e} on the same input: "
                           "the naive model does not compute MPOBERT's function")
    return diff


def profile_step(contender: Contender, rows: int = 15) -> str:
    """The torch profiler's top operators (by self CPU time) of one step of ``contender``."""
    from torch.profiler import ProfilerActivity, profile

    contender.step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if contender.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        contender.step()
    key = "self_cuda_time_total" if contender.device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def rebuild_floor(model: MPOBertModel) -> int:
    """Forward FLOPs of the cheapest rebuild of every MPO weight of ``model`` (``_profile.rebuild_floor_flops``)."""
    from mpo_core.nn import MPOLinear

    groups: dict[int, list[MPOLinear]] = {}  # the layers sharing each central core
    for m in model.modules():
        if isinstance(m, MPOLinear):
            groups.setdefault(id(m.cores[m.central_index]), []).append(m)
    layers = list(groups.values())
    return rebuild_floor_flops([[m.mpo.ranks for m in g] for g in layers], [g[0].mpo.in_shape for g in layers],
                               [g[0].mpo.out_shape for g in layers], [g[0].central_index for g in layers])


def profile_rows(contenders: list[Contender], setting: Setting, floor: int | None) -> list[dict]:
    """One row per category of :data:`_profile.CATEGORIES`: each contender's seconds in one profiled step
    (after a warm-up step), and what it adds over ``bert`` as a share of ``bert``'s step."""
    shares = {}
    for c in contenders:
        c.step()
        shares[c.name] = profile_shares(c.step)
    rows = []
    ref = shares.get("bert")
    for cat in (*CATEGORIES, "total"):
        row = {"category": cat}
        for name, sh in shares.items():
            sec = sh["total"] if cat == "total" else sh["seconds"][cat]
            row[name] = sec
            if ref is not None and name != "bert":
                row[f"{name} over bert"] = (sec - (ref["total"] if cat == "total" else ref["seconds"][cat])) / ref["total"]
        rows.append(row)
    for name, sh in shares.items():
        fl = sh["rebuild_flops"]
        if fl["rebuild fwd"] and floor:
            print(f"{name}: the step's rebuild products {fl['rebuild fwd'] / 1e9:.2f} GFLOP forward "
                  f"({fl['rebuild fwd'] / floor:.2f}x the floor of one rebuild of every W, {floor / 1e9:.2f} GFLOP), "
                  f"{fl['rebuild bwd'] / 1e9:.2f} GFLOP backward")
    return rows


def rebuild_rows(model: MPOBertModel, tokens: int, device: torch.device, clock: str, repeats: int) -> list[dict]:
    """Rebuilding every MPO weight of ``model`` (batched over the layers sharing a central, and one
    chain per layer) against the dense GEMMs of the same matrices on ``tokens`` tokens, forward and
    forward + backward, measured (interleaved, median)."""
    from mpo_core.accumulate import build_weight_blocks
    from mpo_core.nn import MPOLinear
    from mpo_core.rebuild import dense_matrix

    layers = [m for m in model.modules() if isinstance(m, MPOLinear)]
    xs = {(m.in_features, m.out_features): torch.randn(tokens, m.in_features, device=device) for m in layers}
    dense = [torch.randn(m.in_features, m.out_features, device=device, requires_grad=True) for m in layers]

    def batched():
        return [block for block, _ in build_weight_blocks(layers)]

    def chain():
        return [dense_matrix(list(m.cores)).T.contiguous() for m in layers]

    def gemms():
        return [xs[(m.in_features, m.out_features)] @ w for m, w in zip(layers, dense)]

    def with_backward(fn):
        def go():
            outs = fn()
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
            model.zero_grad(set_to_none=True)
            for w in dense:
                w.grad = None
        return go

    def no_grad(fn):
        def go():
            with torch.no_grad():
                fn()
        return go

    cases = {"rebuild batched": batched, "rebuild per layer": chain, f"dense GEMMs ({tokens} tokens)": gemms}
    fns = {f"{name}|{mode}": run_ for name, fn in cases.items()
           for mode, run_ in (("fwd", no_grad(fn)), ("fwd+bwd", with_backward(fn)))}
    med = {key: statistics.median(ts) for key, ts in time_calls(fns, device, warmup=1, repeat=repeats, clock=clock).items()}
    ref = {mode: med[f"dense GEMMs ({tokens} tokens)|{mode}"] for mode in ("fwd", "fwd+bwd")}
    return [{"what": name, "mode": mode, "seconds": med[f"{name}|{mode}"],
             "vs_dense_gemms": med[f"{name}|{mode}"] / ref[mode]} for name in cases for mode in ("fwd", "fwd+bwd")]


def settings_from(args: argparse.Namespace, device: torch.device) -> list[Setting]:
    precisions = args.precision or (["fp32", "bf16"] if device.type == "cuda" else ["fp32"])
    pairs = args.pairs or [(k, tokens) for tokens in args.tokens for k in args.k]
    out = []
    for k, tokens in pairs:
        seq = min(args.seq, tokens)
        if tokens % seq:
            raise SystemExit(f"{tokens} tokens per micro-batch is not a multiple of --seq {seq}")
        for precision in precisions:
            out.extend(Setting(k, tokens // seq, seq, opt, precision) for opt in args.optimizers)
    if args.inference:
        for tokens in sorted({t for _, t in pairs}):
            seq = min(args.seq, tokens)
            out.extend(Setting(1, tokens // seq, seq, "none", p, inference=True) for p in precisions)
    return out


def parse_pair(text: str) -> tuple[int, int]:
    """``"4x1024"`` -> ``(4, 1024)``: k micro-batches of that many tokens."""
    try:
        k, tokens = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected KxTOKENS such as 4x1024, got {text!r}") from None
    if k < 1 or tokens < 1:
        raise argparse.ArgumentTypeError(f"k and tokens must be >= 1, got {text!r}")
    return k, tokens


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device: {device_description(device)}; timings measured ({args.clock} clock), interleaved, "
          f"median of {args.repeats}")
    rows, checks, rebuilds, profiles = [], {}, {}, {}
    for preset in args.presets:
        cfg = PRESETS[preset](hidden_dropout=0.0, attention_dropout=0.0)
        mpobert = MPOBertModel(cfg)
        models = {name: build_variant(name, cfg, mpobert).to(device) for name in args.variants}
        mpobert.to(device)
        if "naive" in models:
            checks[preset] = check_naive(mpobert.cpu(), models["naive"].cpu(), cfg.vocab_size)
            print(f"{preset}: naive vs mpobert max |diff| of the last hidden state: {checks[preset]:.2e}")
            for m in models.values():
                m.to(device)
        info = {name: (sum(p.numel() for p in unique_params(m)), allreduce_bytes(m)) for name, m in models.items()}
        if args.rebuild:
            for tokens in sorted({t for _, t in (args.pairs or [(1, t) for t in args.tokens])}):
                rrows = rebuild_rows(mpobert, tokens, device, args.clock, args.repeats)
                print(f"\n{preset}: rebuilding every W vs the dense GEMMs of the same matrices, {tokens} tokens (measured)")
                print(format_table(rrows, ["what", "mode", "seconds", "vs_dense_gemms"]), flush=True)
                rebuilds[f"{preset} {tokens} tokens"] = rrows
            continue
        for setting in settings_from(args, device):
            contenders = [Contender(name, m, setting, device, cfg.vocab_size, args.seed) for name, m in models.items()]
            if args.profile:
                print(f"\nprofile of one step (seconds per category; over bert: share of bert's step): "
                      f"{preset} {setting.label()}")
                prows = profile_rows(contenders, setting, rebuild_floor(mpobert))
                print(format_table(prows, list(prows[0])), flush=True)
                profiles[f"{preset} {setting.label()}"] = prows
                for c in contenders[:len(contenders) if args.profile_rows else 0]:
                    print(f"\ntop operators of one step: {preset} {c.name} {setting.label()}")
                    print(profile_step(c, args.profile_rows))
                continue
            mems: dict[str, list[int]] = {c.name: [] for c in contenders}
            # one warm-up step each (allocator, plans, optimizer state), then interleaved timed steps
            times = time_calls({c.name: c.step for c in contenders}, device, warmup=1, repeat=args.repeats,
                               clock=args.clock, around=lambda name: peak_memory(device, mems[name]))
            ref = statistics.median(times["bert"]) if "bert" in times else None
            for c in contenders:
                med = statistics.median(times[c.name])
                params, ar = info[c.name]
                row = {
                    "preset": preset, "setting": setting.label(), "variant": c.name, "k": setting.k,
                    "tokens_per_step": setting.tokens if not setting.inference else setting.batch * setting.seq,
                    "optimizer": setting.optimizer, "precision": setting.precision, "inference": setting.inference,
                    "seconds": med, "seconds_all": times[c.name],
                    "vs_bert": med / ref if ref else float("nan"),
                    "tokens_per_s": (setting.tokens if not setting.inference else setting.batch * setting.seq) / med,
                    "peak_mb": max(mems[c.name]) / 2**20, "params_m": params / 1e6,
                    "allreduce_mb": ar / 2**20 if not setting.inference else 0.0,
                }
                if "bert" in info and not setting.inference:
                    row["allreduce_vs_bert"] = info["bert"][1] / ar
                rows.append(row)
            print()
            print(f"{preset}  {setting.label()}  ({'forward, no_grad' if setting.inference else 'forward+backward+optimizer'})")
            print(format_table([r for r in rows if r["preset"] == preset and r["setting"] == setting.label()],
                               ["variant", "seconds", "vs_bert", "tokens_per_s", "peak_mb", "params_m",
                                "allreduce_mb", "allreduce_vs_bert"]), flush=True)
            write_json(args.out, {"benchmark": "train_step", "partial": True, "rows": rows})
    return {"rows": rows, "naive_check_max_abs_diff": checks, "rebuild": rebuilds, "profile": profiles, "device": device_description(device),
            "threads": torch.get_num_threads(), "args": vars(args)}


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({(r["preset"], r["setting"]) for r in rows}, key=str)
    variants = sorted({r["variant"] for r in rows})
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels)), 4))
    width = 0.8 / len(variants)
    for v_i, v in enumerate(variants):
        ys = [next((r["vs_bert"] for r in rows if (r["preset"], r["setting"]) == lab and r["variant"] == v), 0)
              for lab in labels]
        ax.bar([i + v_i * width for i in range(len(labels))], ys, width, label=v)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))])
    ax.set_xticklabels([f"{p}\n{s}" for p, s in labels], fontsize=7)
    ax.set_ylabel("time / dense BERT (measured)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--full", action="store_true",
                    help="both presets, k in {1,4,8}, 1024..16384 tokens per micro-batch, AdamW and LAMB")
    ap.add_argument("--presets", nargs="+", choices=sorted(PRESETS))
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--k", type=int, nargs="+", help="micro-batches per optimizer step")
    ap.add_argument("--tokens", type=int, nargs="+", help="tokens per micro-batch (batch x seq)")
    ap.add_argument("--pairs", type=parse_pair, nargs="+",
                    help="explicit KxTOKENS settings (e.g. 4x1024 1x4096) instead of the --k x --tokens grid")
    ap.add_argument("--seq", type=int, default=512, help="sequence length (a micro-batch is tokens/seq sequences)")
    ap.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS)
    ap.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], help="default fp32 (CPU), fp32 and bf16 (CUDA)")
    ap.add_argument("--inference", action="store_true", help="also time one forward under no_grad per token count")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved timed steps per contender (median)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall (perf_counter) or cpu (process_time: use with --threads 1 on a loaded machine)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--profile", action="store_true",
                    help="instead of timing: one profiled step of each variant, its time in categories side by side")
    ap.add_argument("--profile-rows", type=int, default=0, help="with --profile: also each variant's top N operators")
    ap.add_argument("--rebuild", action="store_true",
                    help="instead of steps: rebuilding every W (batched / per layer) vs the dense GEMMs")
    ap.add_argument("--out", default=os.path.join("results", "train_step.json"))
    ap.add_argument("--plot", default=None, help="also save a figure of the ratios (needs matplotlib)")
    args = ap.parse_args(argv)
    if args.plot and importlib.util.find_spec("matplotlib") is None:  # fail before measuring
        ap.error("--plot needs matplotlib, which is not installed (pip install matplotlib); run without --plot")
    cuda = torch.device(args.device).type == "cuda"
    big = args.full or cuda
    args.presets = args.presets or (["mpobert12", "mpobert24"] if big else ["mpobert12"])
    args.k = args.k or ([1, 4, 8] if big else [1, 4])
    args.tokens = args.tokens or ([1024, 4096, 16384] if big else [512])
    args.optimizers = args.optimizers or (list(OPTIMIZERS) if big else ["adamw"])
    args.repeats = args.repeats or (5 if cuda else 2)
    if args.clock == "cpu" and cuda:
        raise SystemExit("--clock cpu is for CPU runs (CUDA steps are timed with CUDA events)")
    if min(args.k) < 1 or min(args.tokens) < 1 or args.repeats < 1:
        raise SystemExit("--k, --tokens and --repeats must be >= 1")
    report = run(args)
    if args.profile:
        write_json(args.out, {"benchmark": "train_step_profile", "profile": report["profile"], "device": report["device"],
                              "threads": report["threads"], "args": report["args"]})
        print(f"\nwrote {args.out}")
    else:
        write_json(args.out, {"benchmark": "train_step", **report})
        print(f"\nwrote {args.out}")
        if args.plot:
            plot(report["rows"], args.plot)
            print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
