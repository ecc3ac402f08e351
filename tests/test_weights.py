import pytest

from pipeline.anytime.weights import SCHEMES, static_weights
from pipeline.errors import UserError

SIZES = [1, 2, 3, 5, 8, 11, 16, 24]


def test_sieve_spec_vector_l8():
    expected = [x / 11 for x in [1, 2, 1, 3, 1, 2, 1]] + [1.0]
    assert static_weights("sieve", 8) == pytest.approx(expected, abs=1e-12)


def test_sieve_spec_vector_l16():
    units = [1, 2, 1, 3, 1, 2, 1, 4, 1, 2, 1, 3, 1, 2, 1]
    expected = [x / 26 for x in units] + [1.0]
    assert static_weights("sieve", 16) == pytest.approx(expected, abs=1e-12)


def test_sieve_orig_spec_vector_l15():
    expected = [.08, .04, .12, .04, .08, .04, .16, .04, .08, .04, .12, .04, .08, .04, 1]
    assert static_weights("sieve_orig", 15) == pytest.approx(expected, abs=1e-12)


def test_sieve_rounds_half_up():
    # L=5: k*L/d hits 2.5 (d=2, k=1; d=4, k=2; d=8, k=4), which must go to exit 3; round-half-even
    # would pick exit 2 and give [3, 4, 1, 3]/11 instead.
    # d=2: exit 3. d=4: 1.25, 2.5, 3.75 -> 1, 3, 4 (exit 2 still empty).
    # d=8: .625, 1.25, 1.875, 2.5, 3.125, 3.75, 4.375 -> 1, 1, 2, 3, 3, 4, 4.
    expected = [x / 11 for x in [3, 1, 4, 3]] + [1.0]
    assert static_weights("sieve", 5) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("num_exits", SIZES)
def test_every_scheme_has_right_length_and_is_nonnegative(num_exits):
    for scheme in SCHEMES:
        b = static_weights(scheme, num_exits)
        assert len(b) == num_exits
        assert all(x >= 0 for x in b)
        assert b[-1] == pytest.approx(1.0)


@pytest.mark.parametrize("num_exits", SIZES)
def test_const_and_adaloss_start_at_ones(num_exits):
    assert static_weights("const", num_exits) == [1.0] * num_exits
    assert static_weights("adaloss", num_exits) == [1.0] * num_exits


@pytest.mark.parametrize("num_exits", [2, 3, 5, 8, 16])
def test_linear_endpoints_and_constant_step(num_exits):
    b = static_weights("linear", num_exits)
    assert b[0] == pytest.approx(0.25)
    assert b[-1] == pytest.approx(1.0)
    steps = [y - x for x, y in zip(b, b[1:], strict=False)]
    assert steps == pytest.approx([0.75 / (num_exits - 1)] * (num_exits - 1))


@pytest.mark.parametrize("num_exits", [2, 3, 5, 8, 16])
def test_half_end_final_exit_holds_half(num_exits):
    b = static_weights("half_end", num_exits)
    assert b[-1] == pytest.approx(sum(b) / 2)
    assert len(set(b[:-1])) == 1


@pytest.mark.parametrize("num_exits", [1, 2, 5, 8])
def test_opt_is_one_hot(num_exits):
    for k in range(1, num_exits + 1):
        b = static_weights("opt", num_exits, opt_exit=k)
        assert b == [1.0 if i == k - 1 else 0.0 for i in range(num_exits)]
    assert static_weights("opt", num_exits, opt_exit=0) == static_weights(
        "opt", num_exits, opt_exit=num_exits
    )


@pytest.mark.parametrize("bad", [-1, 6])
def test_opt_exit_out_of_range(bad):
    with pytest.raises(UserError, match="opt_exit"):
        static_weights("opt", 5, opt_exit=bad)


@pytest.mark.parametrize("scheme", ["sieve", "sieve_orig"])
@pytest.mark.parametrize("num_exits", [2, 3, 5, 7, 8, 11, 16, 24, 33])
def test_sieve_final_one_and_rest_sum_to_one(scheme, num_exits):
    b = static_weights(scheme, num_exits)
    assert b[-1] == 1.0
    assert sum(b[:-1]) == pytest.approx(1.0)
    assert all(x > 0 for x in b)


def test_small_sizes():
    for scheme in ("const", "linear", "half_end", "opt", "sieve", "sieve_orig"):
        assert static_weights(scheme, 1) == [1.0]
    assert static_weights("sieve", 2) == [1.0, 1.0]
    assert static_weights("sieve_orig", 2) == [1.0, 1.0]
    assert static_weights("half_end", 2) == [1.0, 1.0]
    assert static_weights("linear", 2) == [0.25, 1.0]


def test_unknown_scheme_is_a_programming_error_naming_the_schemes():
    # A user's scheme is checked, with a suggestion, by LossConfig (tests/test_config.py).
    with pytest.raises(ValueError, match="'seive'; schemes: const, linear, half_end"):
        static_weights("seive", 4)


def test_bad_num_exits():
    with pytest.raises(UserError, match="num_exits"):
        static_weights("const", 0)
