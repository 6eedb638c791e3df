from kv_resize.capacity import LLAMA_2_7B, LLAMA_3_8B, budget_for_shape, capacity_rows, levels, w4_bytes


def test_known_parameter_counts():
    assert abs(LLAMA_2_7B.total_params - 6.74e9) < 0.01e9
    assert abs(LLAMA_3_8B.total_params - 8.03e9) < 0.01e9
    assert LLAMA_2_7B.kv_bytes_per_token() == 512 * 1024  # 0.5 MiB per token in bf16
    assert LLAMA_3_8B.kv_bytes_per_token() == 128 * 1024  # GQA: 8 KV heads


def test_a_w4_llama2_layer_is_about_a_tenth_of_a_gigabyte():
    # The paper: "a W4 layer is 0.1 GB" for Llama-2-7B.
    assert 0.09e9 < w4_bytes(LLAMA_2_7B.layer_linear_params) < 0.11e9


def test_rows_cover_the_five_levels_and_grow_monotonically():
    budget = budget_for_shape(LLAMA_3_8B, 20 * 2**30, block_tokens=16)
    rows = capacity_rows("x", budget, 16)
    assert [r["level"] for r in rows] == levels(32) == [0, 8, 16, 24, 32]
    blocks = [r["kv_blocks"] for r in rows]
    assert blocks == sorted(blocks) and blocks[0] > 0
    for r in rows:
        assert r["weights_gib"] * 2**30 + (r["kv_blocks"] + 1) * 16 * LLAMA_3_8B.kv_bytes_per_token() <= 20 * 2**30
