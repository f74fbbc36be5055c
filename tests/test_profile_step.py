"""benchmarks/gpu/profile_step.py's accounting, on kernel lists shaped as a profiled decode step
gives them (the profiling itself needs a GPU)."""

from __future__ import annotations

import pytest

from benchmarks.gpu.profile_step import exclusive_us, pass_breakdown, step_roles, token_breakdown

LAYERS = 2


def _step(head: str, start: float) -> list[tuple[str, float, float]]:
    """One step's kernels from `start` (µs): embedding, per layer q/k/v, attention, o, gate/up
    and down (each 10 µs, the next starting 2 µs before the last ends, as under PDL), the head
    (`head`: its kernel's name), argmax."""
    names = ["triton_poi_fused_embedding_0"]
    for _ in range(LAYERS):
        names += ["nf4_matvec_kernel", "attention_kernel", "nf4_matvec_kernel", "nf4_matvec_kernel"]
        names += ["nf4_matvec_kernel"]
    names += [head, "triton_red_fused_argmax_1"]
    kernels = []
    for index, name in enumerate(names):
        begin = start + 8 * index
        kernels.append((name, begin, begin + 10))
    return kernels


def test_a_step_s_kernels_take_their_roles_by_order():
    names = [name for name, _, _ in _step("matvec_kernel", 0)]
    roles = step_roles(names, LAYERS)
    assert roles == ["other"] + ["qkv", "attention", "o", "gate_up", "down"] * LAYERS + ["head", "other"]
    cublas = step_roles([name for name, _, _ in _step("sm90_xmma_gemm_bf16bf16_bf16f32", 0)], LAYERS)
    assert cublas[-2] == "head"
    with pytest.raises(ValueError, match="7 Triton matvecs"):
        step_roles(names[:-3], LAYERS)


def test_each_kernel_is_charged_the_time_it_added_and_the_charges_make_the_busy_time():
    intervals = [(0, 10), (8, 18), (30, 35), (31, 33)]
    assert exclusive_us(intervals) == [10, 8, 5, 0]
    assert sum(exclusive_us(intervals)) == 23  # the union's length
    assert exclusive_us([]) == []


def test_a_token_s_time_by_role_busy_and_overlap():
    steps = 3
    kernels = [kernel for step in range(steps) for kernel in _step("matvec_kernel", 1000 * step)]
    position = ("vectorized_elementwise_kernel<FillFunctor>", -5, -4)  # before the replays
    breakdown = token_breakdown([*reversed(kernels), position], steps, LAYERS)  # any order in
    assert breakdown["left_out"] == [position[0]]
    per_step = 1 + 5 * LAYERS + 2
    assert breakdown["kernels_per_token"] == per_step
    roles = breakdown["roles"]
    # each kernel runs 10 µs, but the one before it ends 2 µs into it: it added 8
    assert roles["qkv"] == {
        "us_per_token": 10 * LAYERS,
        "added_us_per_token": 8 * LAYERS,
        "kernels_per_token": LAYERS,
        "us_per_layer": 10,
        "added_us_per_layer": 8,
        "kernel_names": ["nf4_matvec_kernel"],
    }
    # the embedding, first, added all of its 10 µs
    assert roles["other"]["us_per_token"] == 20 and roles["other"]["added_us_per_token"] == 18
    assert roles["other"]["us_per_layer"] is None
    assert roles["head"]["kernel_names"] == ["matvec_kernel"]
    # 13 kernels of 10 µs, each starting 8 µs after the one before: busy 8 * 12 + 10
    assert breakdown["kernel_us_per_token"] == 10 * per_step
    assert breakdown["busy_us_per_token"] == 8 * (per_step - 1) + 10
    assert sum(role["added_us_per_token"] for role in roles.values()) == breakdown["busy_us_per_token"]
    with pytest.raises(ValueError, match="sequences differ"):
        token_breakdown(kernels[:-1], steps, LAYERS)  # a kernel missing: the steps come out wrong


def test_a_pass_s_kernels_by_name_busiest_first_with_its_busy_time():
    passes = 2
    one_pass = [("gemm", 0, 30), ("fill", 30, 31), ("gemm", 31, 61), ("sdpa", 61, 71), ("fill", 70, 71)]
    kernels = [(name, start + 100 * i, end + 100 * i) for i in range(passes) for name, start, end in one_pass]
    breakdown = pass_breakdown(list(reversed(kernels)), passes, top=2)
    assert breakdown["kernels_per_pass"] == 5
    assert breakdown["kernel_us_per_pass"] == 72
    assert breakdown["busy_us_per_pass"] == 71  # the last fill ran inside sdpa's time
    assert breakdown["by_kernel"] == [
        {"name": "gemm", "launches_per_pass": 2, "us_per_pass": 60},
        {"name": "sdpa", "launches_per_pass": 1, "us_per_pass": 10},
    ]
