"""The honest capacity planner: what an MoE model can do per GPU, derived, with its proof.

`plan(model, hardware, options) -> Plan` is a pure function; serving/cli/plan.py loads files and
renders reports around it. Its inputs and outputs (ModelSpec, HardwareSpec, PlanOptions, Plan) are
defined in serving/control/plan_types.py and imported here. Units: FLOP/s, parameters and bytes as
plain numbers, GB = 1e9 bytes, bandwidth in GB/s per GPU per direction, throughput in tokens/ms per
GPU unless named aggregate.

Formulas (reports print this section):
  F1 ceiling = peak / (2 x active params) / 1000. peak = the measured dense GEMM FLOP/s where
     the hardware gives one, else the spec. 2 FLOPs per active parameter per token; attention-score
     FLOPs are left out (optimistic), the embedding lookup counts as a matmul (pessimistic, ~1%).
  F2 efficiency = kernel x (1 - communication) x (1 - load imbalance) x (1 - pipeline bubbles);
     kernel (always given) is the share of that peak the model's kernels reach; losses are given
     or derived (F4-F6).
  F3 realistic = ceiling x efficiency.
  F4 communication: per token per MoE layer, dispatch + combine move 2 x k copies of the hidden
     state (D x b bytes). With ep ranks filling nodes of G GPUs and uniform routing, a fraction
     f_intra = (min(ep, G) - 1) / ep of copies crosses NVLink and f_inter = (ep - min(ep, G)) / ep
     the inter-node network; the hierarchical path sends both hops, so their times add:
       t_comm = L x 2kDb x (f_intra / bw_intra + f_inter / bw_inter)
       t_compute = 2 x active / (peak x kernel)
       exposed = max((1 - overlap) x t_comm, t_comm - t_compute)   (overlap hides at most t_compute)
       communication = exposed / (t_compute + exposed)
  F5 load imbalance = 1 - mean/max with max/mean = 1 + CV x z(n), z(n) the expected largest of n
     standard normals (Blom: z = Phi^-1((n - 0.375) / (n + 0.25))), n = ep shards; step time follows
     the busiest shard.
  F6 pipeline bubbles = (p - 1) / (m + p - 1) for p stages and m micro-batches.
  F7 required efficiency = target / ceiling; required scaling = target / realistic;
     feasible = target <= ceiling; risk = critical above the ceiling, high above realistic, else ok.
  F8 memory per GPU at sequence length S and batch B (b bytes per value):
       weights = (dense params + expert params / ep) x b / pp
       kv cache = 2 x (L / pp) x kv heads x head dim x S x B x b
       a = 4D + 2 x heads x head dim + 2 x kv heads x head dim + E + k x (3F + D) values held per
           token by one layer (norms, q/k/v, attention out, router logits, gate/up/product, outputs)
       activations, S <= 2048: every layer's values kept = B x S x (L / pp) x a x b
       activations, S > 2048 (checkpointing): layer inputs kept, one layer live
                                                = B x S x ((L / pp) x D + a) x b
     An inference engine frees a layer's values after use, so this training-style accounting is an
     upper bound. max batch = floor((HBM x usable - weights) / (kv + activations per sequence)).
  F9 GPUs for an aggregate target = ceil(aggregate / realistic per GPU).
Phase 2 assumes each named optimisation halves the one loss it targets (an assumption, not a
measurement); claimed phases are checked against the ceiling like derived ones.
"""

from __future__ import annotations

import math
from statistics import NormalDist

from serving.control.plan_types import (
    EfficiencyFactors,
    HardwareSpec,
    MemoryRow,
    ModelSpec,
    ParamCount,
    Phase,
    Plan,
    PlanOptions,
)
from serving.errors import UserError

LOSSES = ("communication", "load_imbalance", "pipeline_bubbles")
# Phase 2: one named optimisation per factor; each is assumed to halve that factor's loss.
OPTIMISATIONS = {
    "kernel": "grouped-GEMM expert kernels",
    "communication": "all-to-all overlapped with compute (two micro-batches in flight)",
    "load_imbalance": "EPLB-style replication of hot experts",
    "pipeline_bubbles": "more micro-batches per pipeline flush",
}


def ceiling_tokens_per_ms(peak_flops: float, active_params: float) -> float:
    """F1: tokens/ms one GPU could reach if every FLOP did useful work."""
    return peak_flops / (2.0 * active_params) / 1000.0


def pipeline_bubbles(stages: int, micro_batches: int) -> float:
    """F6: idle fraction of a p-stage pipeline filled by m micro-batches."""
    return (stages - 1) / (micro_batches + stages - 1)


def load_imbalance(cv: float, shards: int) -> float:
    """F5: time lost waiting for the busiest of n shards when load varies with this CV."""
    if shards <= 1:
        return 0.0
    z = NormalDist().inv_cdf((shards - 0.375) / (shards + 0.25))
    return 1.0 - 1.0 / (1.0 + cv * z)


def communication(model: ModelSpec, hw: HardwareSpec, options: PlanOptions, peak: float) -> float:
    """F4: share of step time spent in exposed all-to-all, per token over all MoE layers."""
    if model.hidden_size is None or model.num_hidden_layers is None:
        raise UserError(f"{model.name}: communication: deriving it needs hidden_size and layers")
    ep, in_node = options.ep, min(options.ep, hw.gpus_per_node)
    f_intra, f_inter = (in_node - 1) / ep, (ep - in_node) / ep
    copy_bytes = 2 * model.num_experts_per_tok * model.hidden_size * options.bytes_per_value
    per_layer = copy_bytes * (f_intra / hw.intra_node_gb_s + f_inter / hw.inter_node_gb_s) / 1e9
    t_comm = model.num_hidden_layers * per_layer
    t_compute = 2.0 * model.params().active / (peak * options.kernel)
    exposed = max((1.0 - options.overlap) * t_comm, t_comm - t_compute)
    return exposed / (t_compute + exposed)


def memory_row(model: ModelSpec, hw: HardwareSpec, options: PlanOptions, seq_len: int) -> MemoryRow:
    """F8: per-GPU memory at one sequence length, and the largest batch that fits."""
    p, b, layers = model.params(), options.bytes_per_value, model.num_hidden_layers / options.pp
    d, k, hd = model.hidden_size, model.num_experts_per_tok, model.head_size
    weights = (p.total - p.experts + p.experts / options.ep) * b / options.pp
    kv_per_seq = 2 * layers * model.num_key_value_heads * hd * seq_len * b
    a = 4 * d + 2 * (model.num_attention_heads + model.num_key_value_heads) * hd
    a += model.num_local_experts + k * (3 * model.intermediate_size + d)
    checkpointing = seq_len > options.checkpoint_above
    kept = layers * d + a if checkpointing else layers * a
    act_per_seq = seq_len * kept * b
    usable = hw.hbm_gb * 1e9 * options.usable_hbm_fraction
    max_batch = max(0, math.floor((usable - weights) / (kv_per_seq + act_per_seq)))
    kv, act = kv_per_seq * options.batch, act_per_seq * options.batch
    return MemoryRow(
        seq_len=seq_len,
        weights_gb=weights / 1e9,
        kv_cache_gb=kv / 1e9,
        activations_gb=act / 1e9,
        total_gb=(weights + kv + act) / 1e9,
        checkpointing=checkpointing,
        max_batch=max_batch,
        fits=weights + kv + act <= usable,
    )


def check_phase(name: str, tokens: float, ceiling: float, conditions: list[str]) -> Phase:
    """Every phase, derived or claimed, is held against the per-GPU ceiling."""
    if tokens > ceiling:
        conditions.append(f"exceeds the per-GPU ceiling {ceiling:.1f} ({tokens / ceiling:.2f}x)")
    return Phase(
        name=name, tokens_per_ms=tokens, conditions=tuple(conditions), feasible=tokens <= ceiling
    )


def plan(model: ModelSpec, hardware: HardwareSpec, options: PlanOptions) -> Plan:
    """Ceiling, efficiency, targets, phases, risk and memory, each with a line of proof."""
    if options.ep > model.num_local_experts:
        raise UserError(f"ep: {options.ep} exceeds the model's {model.num_local_experts} experts")
    # 1. Ceiling from the peak and the active parameters.
    peak, peak_source = hardware.peak()
    params = model.params()
    ceiling = ceiling_tokens_per_ms(peak, params.active)
    proof = _ceiling_lines(peak, peak_source, hardware.flops_dtype, params, ceiling)
    # 2. Efficiency factors: given, or derived from the deployment (F4-F6).
    factors, sources, derived = _factors(model, hardware, options, peak)
    efficiency, realistic = factors.product(), ceiling * factors.product()
    at = f"ep={options.ep}, pp={options.pp}, m={options.micro_batches}, CV={options.cv}"
    proof += _efficiency_lines(factors, sources, derived, efficiency, at)
    proof.append(
        f"realistic = {ceiling:.1f} x {efficiency:.3f} = {realistic:.1f} tokens/ms per GPU"
    )
    # 3. The target: per GPU as given, or an aggregate shared by --gpus.
    target, gpus_needed, target_lines = _target(options, realistic)
    proof += target_lines
    verdict = _verdict(target, ceiling, realistic)
    proof += verdict.pop("lines")
    # 4. Phases, each checked against the ceiling; then memory per sequence length.
    agg = options.aggregate_target_tokens_per_ms
    phases = _phases(ceiling, factors, sources, target, agg, gpus_needed, options)
    memory, memory_lines = _memory(model, hardware, options)
    proof += memory_lines
    proof += [
        f"{p.name}: {p.tokens_per_ms:.1f} exceeds the ceiling {ceiling:.1f}: infeasible"
        for p in phases
        if not p.feasible
    ]
    return Plan(
        model=model.name,
        hardware=hardware.name,
        peak_flops_used=peak,
        peak_source=peak_source,
        active_params=params.active,
        active_params_source=params.source,
        total_params=params.total,
        ceiling_tokens_per_ms=ceiling,
        efficiency=efficiency,
        efficiency_factors=factors,
        efficiency_factor_sources=sources,
        derived_estimates=derived,
        realistic_tokens_per_ms=realistic,
        target_tokens_per_ms=target,
        aggregate_target_tokens_per_ms=agg,
        gpus_needed=gpus_needed,
        proof=tuple(proof),
        phases=tuple(phases),
        memory=memory,
        options=options,
        **verdict,
    )


def _ceiling_lines(
    peak: float, peak_source: str, dtype: str, params: ParamCount, ceiling: float
) -> list[str]:
    """F1's proof: the peak used, the FLOPs per token, and their quotient."""
    return [
        f"peak = {peak / 1e12:.4g} TFLOP/s dense {dtype} ({peak_source} figure)",
        f"FLOPs per token = 2 x {params.active:.3g} active params ({params.source})"
        f" = {2 * params.active / 1e9:.1f} GFLOP",
        f"ceiling = {peak:.3g} / {2 * params.active:.3g} = {ceiling:.1f} tokens/ms per GPU",
    ]


def _target(options: PlanOptions, realistic: float) -> tuple[float | None, int | None, list[str]]:
    """The per-GPU target (as given, or an aggregate's share of --gpus) and, for an aggregate,
    F9's GPU count at the realistic figure with its proof line."""
    agg = options.aggregate_target_tokens_per_ms
    if agg is None:
        return options.target_tokens_per_ms, None, []
    gpus_needed = math.ceil(agg / realistic)
    target = agg / options.gpus if options.gpus else None
    line = (
        f"aggregate {agg:.1f} tokens/ms / {realistic:.1f} per GPU = "
        f"{agg / realistic:.2f} -> {gpus_needed} GPUs (communication as at ep={options.ep})"
    )
    return target, gpus_needed, [line]


def _memory(
    model: ModelSpec, hardware: HardwareSpec, options: PlanOptions
) -> tuple[tuple[MemoryRow, ...], list[str]]:
    """F8 at every planned sequence length; without the model's dimensions, none, and a proof
    line that says so."""
    if not model.has_dims:
        return (), ["memory: not computed, the model states no dimensions"]
    return tuple(memory_row(model, hardware, options, s) for s in options.seq_lens), []


def _factors(
    model: ModelSpec, hw: HardwareSpec, options: PlanOptions, peak: float
) -> tuple[EfficiencyFactors, dict, dict]:
    """The factors in use, given or derived, their sources, and every derivable estimate."""
    derived = {
        "load_imbalance": load_imbalance(options.cv, options.ep),
        "pipeline_bubbles": pipeline_bubbles(options.pp, options.micro_batches),
    }
    if model.hidden_size and model.num_hidden_layers or options.communication == "derived":
        derived["communication"] = communication(model, hw, options, peak)  # may raise, one line
    label = "measured" if options.measured_from else "given"
    values, sources = {"kernel": options.kernel}, {"kernel": label}
    for name in LOSSES:
        given = getattr(options, name)
        values[name] = derived[name] if given == "derived" else given
        sources[name] = "derived" if given == "derived" else label
    return EfficiencyFactors(**values), sources, derived


def _efficiency_lines(
    factors: EfficiencyFactors, sources: dict, derived: dict, eff: float, at: str
) -> list[str]:
    lines = [f"kernel = {factors.kernel:.4g} ({sources['kernel']})"]
    for name in LOSSES:
        value, note = getattr(factors, name), sources[name]
        if note != "derived" and name in derived:
            note += f"; derived at {at} it would be {derived[name]:.3f}"
        lines.append(f"{name.replace('_', ' ')} = {value:.3f} ({note})")
    terms = " x ".join(
        [f"{factors.kernel:.3g}"] + [f"(1 - {getattr(factors, n):.3f})" for n in LOSSES]
    )
    return lines + [f"efficiency = {terms} = {eff:.3f}"]


def _verdict(target: float | None, ceiling: float, realistic: float) -> dict:
    """F7: feasibility, required efficiency and scaling, risk, and the lines that prove them."""
    if target is None:
        keys = ("feasible", "required_efficiency", "required_scaling", "risk")
        return dict.fromkeys(keys) | {"lines": []}
    need, scaling = target / ceiling, target / realistic
    lines = [
        f"target = {target:.1f} tokens/ms per GPU",
        f"required efficiency = {target:.1f} / {ceiling:.1f} = {need:.0%}",
        f"required scaling = {target:.1f} / {realistic:.1f} = {scaling:.2f}x the realistic figure",
    ]
    if target > ceiling:
        risk = "critical"
        lines += [
            f"{need:.0%} > 100%: efficiency cannot exceed 100%, so the target is impossible "
            "on this GPU (critical)",
            "adding GPUs cannot raise a per-GPU figure: only a faster device, lower precision "
            "or fewer active parameters can",
        ]
    elif target > realistic:
        risk = "high"
        lines.append(f"needs {need:.0%} efficiency, above the realistic {realistic / ceiling:.0%}")
    else:
        risk = "ok"
        lines.append("within the realistic figure")
    verdict = {"feasible": target <= ceiling, "risk": risk, "lines": lines}
    return verdict | {"required_efficiency": need, "required_scaling": scaling}


def _phases(
    ceiling: float,
    factors: EfficiencyFactors,
    sources: dict,
    target: float | None,
    agg: float | None,
    gpus_needed: int | None,
    options: PlanOptions,
) -> list[Phase]:
    # 1. Phase 1: the realistic figure on this hardware, as configured.
    realistic = ceiling * factors.product()
    p1 = [f"{k.replace('_', ' ')} {v:.3f} ({sources[k]})" for k, v in factors]
    phases = [check_phase("phase 1", realistic, ceiling, p1)]
    # 2. Phase 2: each named optimisation halves the one loss it targets.
    improved, p2 = {}, []
    for name, value in factors:
        loss = 1.0 - value if name == "kernel" else value
        if loss == 0.0:
            continue
        new = value + loss / 2 if name == "kernel" else loss / 2
        improved[name] = new
        p2.append(
            f"{OPTIMISATIONS[name]}: {name.replace('_', ' ')} {value:.3f} -> {new:.3f} "
            "(assumed: halves the loss)"
        )
    better = factors.model_copy(update=improved)
    phase2 = ceiling * better.product()
    phases.append(check_phase("phase 2", phase2, ceiling, p2))
    # 3. Phase 3: the scaling the target needs (per GPU), or the GPU count (aggregate).
    if agg is not None:
        fewer = math.ceil(agg / phase2)
        cond = [f"{gpus_needed} GPUs at phase 1 ({fewer} at phase 2) for {agg:.1f} tokens/ms"]
        per_gpu = target if target is not None else realistic
        phases.append(check_phase("phase 3", per_gpu, ceiling, cond))
    elif target is not None:
        cond = [f"{target / realistic:.2f}x phase 1 and {target / phase2:.2f}x phase 2 per GPU"]
        if target > ceiling:
            cond.append(
                "only a faster device, lower precision or fewer active parameters supply it; "
                "more GPUs cannot"
            )
        phases.append(check_phase("phase 3", target, ceiling, cond))
    # 4. Claims made elsewhere, checked the same way.
    for name, tokens in options.claims:
        phases.append(check_phase(f"claimed: {name}", tokens, ceiling, ["claimed, not derived"]))
    return phases
