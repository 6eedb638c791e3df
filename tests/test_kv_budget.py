import pytest

from kv_resize.budget import BudgetError, KVBudget

MB = 2**20


def test_capacity_grows_by_exactly_the_freed_weight_bytes():
    b = KVBudget.from_fp16_kv(10 * MB, 100 * MB, [4 * MB] * 5, block_bytes=MB)
    assert b.budget_bytes == 110 * MB
    assert [b.total_blocks(k) for k in range(6)] == [10, 14, 18, 22, 26, 30]
    assert b.usable_blocks(0) == 9  # vLLM's null block
    assert b.reserve_bytes() == 30 * MB
    for k in range(6):
        assert b.weight_bytes(k) + b.total_blocks(k) * MB <= b.budget_bytes


def test_rounds_down_to_whole_blocks():
    b = KVBudget(budget_bytes=105 * MB + 1, fp_weight_bytes=100 * MB, layer_savings=(MB // 2,), block_bytes=2 * MB)
    assert b.total_blocks(0) == 2 and b.total_blocks(1) == 2


def test_a_budget_below_the_weights_is_refused_with_a_clear_message():
    with pytest.raises(BudgetError, match="leaves no KV block"):
        KVBudget(budget_bytes=90 * MB, fp_weight_bytes=100 * MB, layer_savings=(MB,), block_bytes=MB)


def test_level_out_of_range():
    b = KVBudget.from_fp16_kv(10 * MB, 100 * MB, [MB], block_bytes=MB)
    with pytest.raises(BudgetError):
        b.total_blocks(2)


def test_an_fp32_engines_budget_counts_its_weights_at_fp32_width(tmp_path):
    """`--memory-budget-gb` covers the weights as the engine holds them: an fp32 engine holds
    a bf16 file at twice its bytes, so at one budget it has that much less KV (counted as the
    file's bytes, it reserved the difference beyond its budget)."""
    from safetensors.torch import save_file
    import torch

    from morphserve.runtime.kv_sizing import model_weight_bytes, plan_budget

    save_file({"w": torch.zeros(1000, 1000, dtype=torch.bfloat16), "q": torch.zeros(10, dtype=torch.int8)},
              str(tmp_path / "model.safetensors"))
    assert model_weight_bytes(tmp_path, "torch.float32") == 4_000_000 + 10
    assert model_weight_bytes(tmp_path, "auto") == model_weight_bytes(tmp_path) > 2_000_010
    block = 100_000
    budget_gb = 6_000_000 / 2**30
    bf16 = plan_budget([block], budget_gb, tmp_path, 0, block, dtype="torch.bfloat16")
    fp32 = plan_budget([block], budget_gb, tmp_path, 0, block, dtype="torch.float32")
    assert bf16.usable_blocks(0) - fp32.usable_blocks(0) == 2_000_000 // block
    assert fp32.usable_blocks(0) == (6_000_000 - 4_000_010) // block - 1  # vLLM's null block
