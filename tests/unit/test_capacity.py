"""The planner's formulas against hand-computed values, and the seed review's verdict."""

import math

import pytest
from pydantic import ValidationError

from serving.control.capacity import (
    HardwareSpec,
    ModelSpec,
    PlanOptions,
    ceiling_tokens_per_ms,
    communication,
    load_imbalance,
    memory_row,
    pipeline_bubbles,
    plan,
)
from serving.errors import UserError

SEED_MODEL = ModelSpec(name="seed", num_local_experts=8, num_experts_per_tok=2, active_params=4e9,
                       total_params=10e9)  # fmt: skip
SEED_GPU = HardwareSpec(name="seed", peak_flops=240e12, hbm_gb=80, hbm_bandwidth_gb_s=2000,
                        intra_node_gb_s=300, inter_node_gb_s=25, gpus_per_node=8)  # fmt: skip
TINY = ModelSpec(name="tiny", vocab_size=512, hidden_size=128, intermediate_size=256,
                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 num_local_experts=8, num_experts_per_tok=2)  # fmt: skip
MIXTRAL = ModelSpec(name="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                    num_local_experts=8, num_experts_per_tok=2)  # fmt: skip


def test_seed_review_verdict():
    p = plan(SEED_MODEL, SEED_GPU, PlanOptions(target_tokens_per_ms=100))
    assert p.ceiling_tokens_per_ms == pytest.approx(30.0)  # 240e12 / 8e9 / 1000
    assert round(p.efficiency, 3) == 0.377  # 0.90 x 0.58 x 0.88 x 0.82
    assert round(p.realistic_tokens_per_ms, 1) == 11.3
    assert 8.8 <= p.required_scaling <= 8.9
    assert p.required_efficiency == pytest.approx(100 / 30)
    assert p.feasible is False and p.risk == "critical"
    assert any("333%" in line for line in p.proof)
    assert any("(spec figure)" in line for line in p.proof)
    assert set(p.efficiency_factor_sources.values()) == {"given"}


def test_seed_phase_2_claim_of_44_is_infeasible_and_derived_phases_are_checked():
    options = PlanOptions(target_tokens_per_ms=100, claims=(("seed phase 2", 44.0),))
    phases = {p.name: p for p in plan(SEED_MODEL, SEED_GPU, options).phases}
    assert phases["phase 1"].feasible and phases["phase 2"].feasible
    # Phase 2 halves every loss: 0.95 x 0.79 x 0.94 x 0.91.
    assert phases["phase 2"].tokens_per_ms == pytest.approx(30 * 0.95 * 0.79 * 0.94 * 0.91)
    assert not phases["phase 3"].feasible  # 100 > 30: more GPUs cannot help a per-GPU target
    claim = phases["claimed: seed phase 2"]
    assert not claim.feasible and claim.tokens_per_ms == 44.0
    assert any("ceiling 30.0" in c for c in claim.conditions)


@pytest.mark.parametrize(("target", "risk", "feasible"), [(20, "high", True), (5, "ok", True)])
def test_risk_grades(target, risk, feasible):
    p = plan(SEED_MODEL, SEED_GPU, PlanOptions(target_tokens_per_ms=target))
    assert (p.risk, p.feasible) == (risk, feasible)


def test_aggregate_target_gives_a_gpu_count():
    p = plan(SEED_MODEL, SEED_GPU, PlanOptions(aggregate_target_tokens_per_ms=100))
    assert p.gpus_needed == 9  # ceil(100 / 11.30)
    assert p.target_tokens_per_ms is None and p.risk is None
    shared = plan(SEED_MODEL, SEED_GPU, PlanOptions(aggregate_target_tokens_per_ms=100, gpus=10))
    assert shared.target_tokens_per_ms == pytest.approx(10.0) and shared.risk == "ok"


def test_measured_peak_wins_over_spec():
    h200 = SEED_GPU.model_copy(update={"peak_flops": 989e12, "measured_flops": 792e12})
    p = plan(MIXTRAL, h200, PlanOptions())
    assert p.peak_source == "measured" and p.peak_flops_used == 792e12
    assert p.ceiling_tokens_per_ms == pytest.approx(ceiling_tokens_per_ms(792e12, 12_879_925_248))


def test_params_from_dimensions_match_hand_counts():
    # Mixtral-8x7B: attention 2*D*D + 2*D*1024, expert 3*D*F, gate D*E, 2 norms; embed + lm_head.
    mixtral = MIXTRAL.params()
    assert (mixtral.total, mixtral.active) == (46_702_792_704, 12_879_925_248)
    assert mixtral.experts == 32 * 8 * 3 * 4096 * 14336
    tiny = TINY.params()
    assert (tiny.total, tiny.active, tiny.source) == (3_478_656, 1_119_360, "from dimensions")


def test_stated_params_split_dense_and_experts():
    # active = dense + 2e, total = dense + 8e with 4e9 and 10e9 -> e = 1e9, experts 8e9.
    p = SEED_MODEL.params()
    assert (p.active, p.total, p.experts, p.source) == (4e9, 10e9, 8e9, "stated")


def test_pipeline_bubbles():
    assert pipeline_bubbles(4, 8) == pytest.approx(3 / 11)
    assert pipeline_bubbles(1, 1) == 0.0


def test_load_imbalance_from_cv():
    assert load_imbalance(0.15, 1) == 0.0  # one shard waits for nobody
    # z(8) = Phi^-1(7.625 / 8.25) = 1.4342; 1 - 1 / (1 + 0.15 z) = 0.17704
    assert load_imbalance(0.15, 8) == pytest.approx(0.17704, abs=1e-5)


def test_communication_hand_computed():
    # D 4096, L 32, k 2, bf16: 4 copies x 8192 B = 32768 B per token per layer. ep 16 over nodes of
    # 8: 7/16 over NVLink at 450 GB/s, 8/16 over the network at 50 GB/s:
    # t_comm = 32 x (14336 / 450e9 + 16384 / 50e9) = 11.505 us; t_compute = 2e10 / 1e15 = 20 us.
    model = ModelSpec(name="m", hidden_size=4096, num_hidden_layers=32, num_local_experts=16,
                      num_experts_per_tok=2, active_params=1e10, total_params=5e10)  # fmt: skip
    hw = HardwareSpec(name="h", peak_flops=1e15, hbm_gb=80, hbm_bandwidth_gb_s=3000,
                      intra_node_gb_s=450, inter_node_gb_s=50, gpus_per_node=8)  # fmt: skip
    opts = PlanOptions(ep=16, kernel=1.0)
    assert communication(model, hw, opts, 1e15) == pytest.approx(11.505 / 31.505, abs=1e-4)
    half = opts.model_copy(update={"overlap": 0.5})  # exposed 5.753 us
    assert communication(model, hw, half, 1e15) == pytest.approx(5.7526 / 25.7526, abs=1e-4)
    one = opts.model_copy(update={"ep": 1})
    assert communication(model, hw, one, 1e15) == 0.0


def test_derived_factors_are_marked_derived():
    opts = PlanOptions(ep=8, pp=4, micro_batches=8, communication="derived",
                       load_imbalance="derived", pipeline_bubbles="derived")  # fmt: skip
    p = plan(TINY, SEED_GPU, opts)
    assert p.efficiency_factor_sources == {
        "kernel": "given",
        "communication": "derived",
        "load_imbalance": "derived",
        "pipeline_bubbles": "derived",
    }
    assert p.efficiency_factors.pipeline_bubbles == pytest.approx(3 / 11)
    f = p.efficiency_factors
    expected = 0.9 * (1 - f.communication) * (1 - f.load_imbalance) * (1 - 3 / 11)
    assert p.efficiency == pytest.approx(expected)


def test_memory_hand_computed():
    # Tiny, bf16, ep 1, batch 1. Weights 3,478,656 x 2 B. KV = 2 x 4 layers x 2 x 32 x S x 2 B.
    # a = 4*128 + 2*(4+2)*32 + 8 + 2*(3*256 + 128) = 2696 values per token per layer.
    short = memory_row(TINY, SEED_GPU, PlanOptions(), 128)
    assert short.weights_gb == pytest.approx(6_957_312 / 1e9)
    assert short.kv_cache_gb == pytest.approx(131_072 / 1e9)
    assert short.activations_gb == pytest.approx(128 * 4 * 2696 * 2 / 1e9)  # every layer kept
    assert not short.checkpointing
    long = memory_row(TINY, SEED_GPU, PlanOptions(), 4096)
    assert long.checkpointing  # layer inputs (4 x 128) + one live layer (2696)
    assert long.activations_gb == pytest.approx(4096 * (4 * 128 + 2696) * 2 / 1e9)
    assert long.total_gb == pytest.approx(long.weights_gb + long.kv_cache_gb + long.activations_gb)


def test_memory_shards_experts_and_finds_the_largest_batch():
    sharded = memory_row(TINY, SEED_GPU, PlanOptions(ep=2), 128)
    assert sharded.weights_gb == pytest.approx((332_928 + 3_145_728 / 2) * 2 / 1e9)
    # usable 0.1 GB x 0.9 = 90e6 B; (90e6 - 6,957,312) / (131,072 + 2,760,704) = 28.7 -> 28.
    small = SEED_GPU.model_copy(update={"hbm_gb": 0.1})
    row = memory_row(TINY, small, PlanOptions(), 128)
    assert row.max_batch == 28 and row.fits
    assert not memory_row(TINY, small, PlanOptions(batch=29), 128).fits


def test_plan_has_one_memory_row_per_sequence_length():
    p = plan(MIXTRAL, SEED_GPU, PlanOptions(ep=8))
    assert [m.seq_len for m in p.memory] == [128, 512, 2048, 4096, 10240]
    assert [m.checkpointing for m in p.memory] == [False, False, False, True, True]
    assert all(math.isclose(m.weights_gb, p.memory[0].weights_gb) for m in p.memory)


def test_invalid_inputs_are_rejected():
    with pytest.raises(ValidationError, match="active_params"):
        ModelSpec(name="x", num_local_experts=8, num_experts_per_tok=2)
    with pytest.raises(ValidationError, match="num_experts_per_tok"):
        ModelSpec.model_validate(TINY.model_dump() | {"num_experts_per_tok": 9})
    with pytest.raises(ValidationError, match="not both"):
        PlanOptions(target_tokens_per_ms=1, aggregate_target_tokens_per_ms=2)
    with pytest.raises(ValidationError):
        PlanOptions(communication=1.5)
    with pytest.raises(UserError, match="ep"):
        plan(TINY, SEED_GPU, PlanOptions(ep=16))


def test_model_stated_without_dimensions_plans_without_memory():
    p = plan(SEED_MODEL, SEED_GPU, PlanOptions(target_tokens_per_ms=100))
    assert p.memory == () and any("memory: not computed" in line for line in p.proof)
    with pytest.raises(UserError, match="communication"):
        plan(SEED_MODEL, SEED_GPU, PlanOptions(communication="derived"))
