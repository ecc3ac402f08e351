import io

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.anytime import AnytimeLoss, static_weights
from pipeline.config import LossConfig
from pipeline.errors import UserError


def make_batch(num_exits, seed, batch=6, classes=5, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    logits = [
        (scale * torch.randn(batch, classes, generator=g)).requires_grad_()
        for _ in range(num_exits)
    ]
    target = torch.randint(0, classes, (batch,), generator=g)
    return logits, target


def ce(logits, target):
    return [F.cross_entropy(y.detach().double(), target).item() for y in logits]


def one_step(loss, logits, target):
    """One training step of one pass, as pipeline/train/step.py makes it: start, forward,
    backward, end with the per-exit losses."""
    loss.start_step()
    total, per_exit = loss(logits, target)
    if total.requires_grad:
        total.backward()
    loss.end_step(per_exit)
    return total, per_exit


def roundtrip(module):
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("scheme", ["const", "linear", "half_end", "opt", "sieve", "sieve_orig"])
def test_total_is_weighted_sum(scheme):
    num_exits = 6
    loss = AnytimeLoss(num_exits, LossConfig(scheme, opt_exit=3 if scheme == "opt" else 0))
    logits, target = make_batch(num_exits, seed=1)
    total, per_exit = loss(logits, target)
    b = static_weights(scheme, num_exits, 3 if scheme == "opt" else 0)
    by_hand = ce(logits, target)
    assert loss.weights == pytest.approx(b)
    assert total.item() == pytest.approx(sum(w * x for w, x in zip(b, by_hand, strict=True)))
    assert per_exit.dtype == torch.float32
    assert per_exit.shape == (num_exits,)
    assert not per_exit.requires_grad
    assert per_exit.tolist() == pytest.approx(by_hand, rel=1e-6)
    assert total.dim() == 0


def test_bf16_logits_use_float32_cross_entropy():
    logits, target = make_batch(3, seed=2, scale=8.0)
    low = [y.detach().bfloat16().requires_grad_() for y in logits]
    total, per_exit = AnytimeLoss(3, LossConfig("const"))(low, target)
    assert total.dtype == torch.float32
    # The reference is the CE of the (rounded) bf16 values computed in float64.
    assert per_exit.tolist() == pytest.approx(ce(low, target), rel=1e-6)


def test_gradients_reach_every_exit_with_opt():
    torch.manual_seed(0)
    heads = torch.nn.ModuleList(torch.nn.Linear(4, 3) for _ in range(4))
    x = torch.randn(8, 4)
    target = torch.randint(0, 3, (8,))
    total, _ = AnytimeLoss(4, LossConfig("opt", opt_exit=2))([h(x) for h in heads], target)
    total.backward()
    for i, head in enumerate(heads):
        assert head.weight.grad is not None, f"exit {i + 1} left out of the graph"
        nonzero = head.weight.grad.abs().sum().item() > 0
        assert nonzero == (i == 1)


class HostReads(TorchDispatchMode):
    """Counts the values read from a tensor into Python (on an accelerator: a sync point)."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.reads += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("rule", ["seed", "authors"])
def test_the_training_forward_reads_only_the_draw_to_the_host(rule):
    # The one read is u from the loss's own CPU generator (in start_step), which no device work
    # waits for; the drawn exit, the first-step check and AdaLoss's update stay tensors on the
    # weights' device.
    loss = AnytimeLoss(5, LossConfig("adaloss", alternating=True, alternating_rule=rule,
                                     adaloss_update_every=1))
    for step in range(3):
        logits, target = make_batch(5, seed=step)
        with HostReads() as mode:
            one_step(loss, logits, target)
        assert mode.reads == 1, f"step {step}: {mode.reads} values read to the host"


def test_eval_mode_neither_draws_nor_adapts():
    loss = AnytimeLoss(3, LossConfig("adaloss", alternating=True, adaloss_update_every=1)).eval()
    logits, target = make_batch(3, seed=3)
    total, per_exit = one_step(loss, logits, target)
    assert total.item() == pytest.approx(per_exit.sum().item())
    assert loss.last_drawn is None
    assert loss.weights == [1.0, 1.0, 1.0]
    assert int(loss.num_steps) == 0


def test_alternating_adds_final_weight_times_drawn_loss():
    loss = AnytimeLoss(5, LossConfig("sieve", alternating=True), seed=3)
    b = static_weights("sieve", 5)
    for step in range(20):
        logits, target = make_batch(5, seed=100 + step)
        total, per_exit = one_step(loss, logits, target)
        base = sum(w * x for w, x in zip(b, ce(logits, target), strict=True))
        j = int(loss.last_drawn)
        assert total.item() == pytest.approx(base + b[-1] * per_exit[j].item(), rel=1e-6)


def authors_total(b, per_exit, drawn, sum_rand_ratio):
    """The authors' code: total += (B_i + [i == drawn] * sum(B) / sum_rand_ratio) * l_i."""
    extra = sum(b) / sum_rand_ratio
    return sum((w + (extra if i == drawn else 0.0)) * x
               for i, (w, x) in enumerate(zip(b, per_exit, strict=True)))


@pytest.mark.parametrize("scheme, sum_rand_ratio", [
    ("const", 2.0), ("linear", 2.0), ("sieve", 2.0), ("adaloss", 2.0), ("const", 4.0)])
def test_authors_rule_adds_sum_over_ratio_and_starts_at_the_final_exit(scheme, sum_rand_ratio):
    loss = AnytimeLoss(6, LossConfig(scheme, alternating=True, alternating_rule="authors",
                                     sum_rand_ratio=sum_rand_ratio, adaloss_update_every=2),
                       seed=3)
    drawn = []
    for step in range(30):
        logits, target = make_batch(6, seed=100 + step, scale=1 + step % 3)
        b = loss.weights  # AdaLoss changes them after some steps: the extra term follows
        total, _ = one_step(loss, logits, target)
        drawn.append(int(loss.last_drawn))
        expected = authors_total(b, ce(logits, target), drawn[-1], sum_rand_ratio)
        assert total.item() == pytest.approx(expected, rel=1e-6)
    assert drawn[0] == 5  # the first step: the final exit, not a draw
    assert len(set(drawn[1:])) > 2  # later steps draw
    if scheme == "adaloss":
        assert len(set(loss.weights)) > 1  # the weights (and so sum(B)) really changed


def test_the_two_rules_differ_by_the_extra_weight_and_the_first_step():
    # For CONST at 6 exits the authors' extra weight is sum(B) / 2 = 3, the seed's B_L = 1. For
    # SIEVE, sum(B) = 2 B_L: the rules agree from the second step on (same draws, same totals).
    for scheme, ratio in (("const", 3.0), ("sieve", 1.0)):
        seed_rule = AnytimeLoss(6, LossConfig(scheme, alternating=True), seed=8)
        authors = AnytimeLoss(6, LossConfig(scheme, alternating=True, alternating_rule="authors"),
                              seed=8)
        base = AnytimeLoss(6, LossConfig(scheme))
        for step in range(20):
            batch = make_batch(6, seed=step)
            plain, per_exit = base(*batch)
            theirs, _ = one_step(authors, *batch)
            ours, _ = one_step(seed_rule, *batch)
            if step == 0:
                assert int(authors.last_drawn) == 5
                continue
            assert int(authors.last_drawn) == int(seed_rule.last_drawn)
            torch.testing.assert_close(theirs - plain, ratio * (ours - plain))


def draws(loss, n, num_exits):
    logits, target = make_batch(num_exits, seed=0, batch=2, classes=3)
    out = []
    for _ in range(n):
        one_step(loss, logits, target)
        out.append(int(loss.last_drawn))
    return out


def test_alternating_follows_weight_distribution():
    num_exits, n = 5, 4000
    b = static_weights("sieve", num_exits)  # [3, 1, 4, 3]/11, then 1: far from uniform
    seq = draws(AnytimeLoss(num_exits, LossConfig("sieve", alternating=True), seed=7), n, num_exits)
    counts = [seq.count(j) for j in range(num_exits)]
    expected = [n * w / sum(b) for w in b]
    chi2 = sum((c - e) ** 2 / e for c, e in zip(counts, expected, strict=True))
    assert chi2 < 18.47, (counts, expected)  # chi-square, 4 dof, p = 0.001


def test_alternating_never_draws_zero_weight_exit():
    # The config refuses alternating with OPT (it would only rescale OPT's one loss); set after
    # the check, it shows that the draw follows the weights, zero ones included.
    config = LossConfig("opt", opt_exit=2)
    config.alternating = True
    loss = AnytimeLoss(4, config)
    assert set(draws(loss, 300, 4)) == {1}
    # The extra term is B_L * l_j, and B_L = 0 here: the total stays l_2 alone.
    total, per_exit = one_step(loss, *make_batch(4, seed=1))
    assert total.item() == pytest.approx(per_exit[1].item())


def test_alternating_is_seeded():
    a = draws(AnytimeLoss(5, LossConfig("const", alternating=True), seed=11), 50, 5)
    b = draws(AnytimeLoss(5, LossConfig("const", alternating=True), seed=11), 50, 5)
    c = draws(AnytimeLoss(5, LossConfig("const", alternating=True), seed=12), 50, 5)
    assert a == b
    assert a != c


@pytest.mark.parametrize("rule", ["seed", "authors"])
def test_alternating_resumes_from_state_dict(rule):
    config = LossConfig("sieve", alternating=True, alternating_rule=rule)
    full = draws(AnytimeLoss(5, config, seed=5), 60, 5)
    first = AnytimeLoss(5, config, seed=5)
    head = draws(first, 25, 5)
    state = roundtrip(first)
    # A different seed proves the sequence comes from the checkpoint, not the constructor (and,
    # for the authors' rule, the restored step count that the resumed run is past its first).
    resumed = AnytimeLoss(5, config, seed=999)
    resumed.load_state_dict(state)
    assert head + draws(resumed, 35, 5) == full


def adaloss_expected(history, momentum=0.9, gamma=0.07, boost=0.0):
    ema = list(history[0])
    for losses in history[1:]:
        ema = [momentum * a + (1 - momentum) * x for a, x in zip(ema, losses, strict=True)]
    w = [1 / a for a in ema]
    w = [x / max(w) for x in w]
    if boost > 0:
        w[-1] += boost
        w = [x / max(w) for x in w]
    return [(1 - gamma) * x + gamma for x in w]


@pytest.mark.parametrize("boost", [0.0, 0.5])
def test_adaloss_updates_by_formula(boost):
    num_exits, every = 4, 3
    loss = AnytimeLoss(num_exits, LossConfig("adaloss", adaloss_update_every=every,
                                             adaloss_final_boost=boost))
    history = []
    for step in range(2 * every):
        # Later exits get sharper logits, so their losses differ and the weights are uneven.
        logits, target = make_batch(num_exits, seed=step)
        logits = [(y * (1 + i)).detach().requires_grad_() for i, y in enumerate(logits)]
        before = loss.weights
        total, per_exit = one_step(loss, logits, target)
        assert total.item() == pytest.approx(
            sum(w * x for w, x in zip(before, ce(logits, target), strict=True)), rel=1e-6
        )
        assert all(y.grad is not None for y in logits)
        history.append(per_exit.double().tolist())
        if step < every - 1:
            assert loss.weights == [1.0] * num_exits
        if (step + 1) % every == 0:
            expected = adaloss_expected(history, boost=boost)
            assert loss.weights == pytest.approx(expected, rel=1e-5)
            assert max(loss.weights) == pytest.approx(1.0)
            assert len(set(round(w, 4) for w in loss.weights)) > 1
            if step + 1 == every:
                after_first = loss.weights
        elif step >= every:
            assert loss.weights == after_first  # unchanged between updates
    assert loss.weights != after_first


def test_adaloss_state_roundtrip_continues_identically():
    config = LossConfig("adaloss", adaloss_update_every=2, alternating=True)
    a = AnytimeLoss(3, config, seed=4)
    for step in range(5):
        one_step(a, *make_batch(3, seed=step, scale=1 + step))
    b = AnytimeLoss(3, config, seed=4)
    b.load_state_dict(roundtrip(a))
    assert b.weights == a.weights
    assert b.weights != [1.0, 1.0, 1.0]
    assert torch.equal(b.loss_ema, a.loss_ema)
    assert int(b.num_steps) == 5
    for step in range(5, 10):
        batch = make_batch(3, seed=step, scale=1 + step)
        ta, _ = one_step(a, *batch)
        tb, _ = one_step(b, *batch)
        assert int(a.last_drawn) == int(b.last_drawn)
        assert ta.item() == tb.item()
    assert b.weights == a.weights


@pytest.mark.parametrize("rule", ["seed", "authors"])
def test_accumulated_passes_draw_once_and_adapt_once_per_step(rule):
    # A step of 2 passes over the halves of a batch: the same alternating draw for both, one
    # AdaLoss update from the passes' mean losses, as one call on the whole batch would.
    config = LossConfig("adaloss", adaloss_update_every=1, alternating=True, alternating_rule=rule)
    whole, passes = AnytimeLoss(3, config, seed=4), AnytimeLoss(3, config, seed=4)
    for step in range(4):
        logits, target = make_batch(3, seed=step, scale=1 + step)
        total, _ = one_step(whole, logits, target)
        passes.start_step()
        halves = [passes([y[i::2] for y in logits], target[i::2]) for i in range(2)]
        passes.end_step((halves[0][1] + halves[1][1]) / 2)
        assert int(passes.last_drawn) == int(whole.last_drawn)
        torch.testing.assert_close((halves[0][0] + halves[1][0]) / 2, total)
        assert int(passes.num_steps) == int(whole.num_steps) == step + 1
        torch.testing.assert_close(passes.loss_ema, whole.loss_ema)
        torch.testing.assert_close(passes.loss_weights, whole.loss_weights)
    assert whole.weights != [1.0, 1.0, 1.0]  # AdaLoss really adapted


def test_state_dict_holds_only_tensors_and_plain_types():
    state = AnytimeLoss(3, LossConfig("adaloss")).state_dict()
    assert set(state) == {"loss_weights", "loss_ema", "num_steps", "_extra_state"}
    assert state["_extra_state"]["generator"].dtype == torch.uint8


def test_loading_another_scheme_is_refused():
    state = roundtrip(AnytimeLoss(3, LossConfig("sieve")))
    with pytest.raises(UserError, match="'sieve'.*'const'"):
        AnytimeLoss(3, LossConfig("const")).load_state_dict(state)


def test_bad_arguments():
    # A bad loss value is refused by its config section (tests/test_config.py); what needs the
    # model or the call is refused here.
    with pytest.raises(UserError, match=r"loss.opt_exit=4 is not an exit of this model's 3"):
        AnytimeLoss(3, LossConfig("opt", opt_exit=4))
    with pytest.raises(ValueError, match="expected 3 exit logits"):
        AnytimeLoss(3, LossConfig("const"))(*make_batch(2, seed=0))
    with pytest.raises(RuntimeError, match="call start_step"):
        AnytimeLoss(3, LossConfig("const", alternating=True))(*make_batch(3, seed=0))


def _distributed_worker(rank, world_size, init_file, results):
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        loss = AnytimeLoss(3, LossConfig("adaloss", adaloss_update_every=2))
        local = []
        for step in range(2):
            # Every rank sees different data, hence different local losses.
            logits, target = make_batch(3, seed=10 * rank + step, scale=1 + rank + step)
            _, per_exit = one_step(loss, logits, target)
            local.append(per_exit.double().tolist())
        results[rank] = (local, loss.weights)
    finally:
        dist.destroy_process_group()


def test_adaloss_averages_losses_across_ranks(tmp_path):
    world_size = 2
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(
            _distributed_worker,
            args=(world_size, str(tmp_path / "store"), results),
            nprocs=world_size,
        )
        results = dict(results)
    mean = [
        [sum(results[r][0][step][i] for r in range(world_size)) / world_size for i in range(3)]
        for step in range(2)
    ]
    assert results[0][1] == results[1][1]
    assert results[0][1] == pytest.approx(adaloss_expected(mean), rel=1e-5)
    assert results[0][1] != pytest.approx(adaloss_expected(results[0][0]), rel=1e-3)


def test_adaloss_survives_a_zero_loss():
    loss = AnytimeLoss(2, LossConfig("adaloss", adaloss_update_every=1))
    target = torch.tensor([0, 1])
    perfect = torch.tensor([[1e4, 0.0], [0.0, 1e4]], requires_grad=True)  # CE is exactly 0
    _, per_exit = one_step(loss, [perfect, perfect * 1e-4], target)
    assert per_exit[0].item() == 0.0
    assert all(w == w for w in loss.weights)  # no NaN
    assert loss.weights[0] == pytest.approx(1.0)
