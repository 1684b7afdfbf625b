"""PPO math against values worked out by hand."""

import math
from types import SimpleNamespace

import pytest
import torch

from alignment import ppo
from alignment.rl import algorithms


def test_response_mask_keeps_tokens_up_to_first_eos():
    eos = 2
    responses = torch.tensor([[5, 6, 2, 2, 0], [5, 2, 7, 2, 0], [5, 6, 7, 8, 9]])
    mask, ended = ppo.response_mask(responses, eos)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert ended.tolist() == [True, True, False]


def test_logprobs_use_temperature_scaled_logits():
    logits = torch.tensor([[[1.0, 2.0, 3.0]]])
    tokens = torch.tensor([[2]])
    # at T=2 the logits are [0.5, 1, 1.5]: log p(2) = 1.5 - log(e^0.5 + e^1 + e^1.5)
    expected = 1.5 - math.log(math.exp(0.5) + math.exp(1.0) + math.exp(1.5))
    assert ppo.logprobs_from_logits(logits, tokens, temperature=2.0).item() == pytest.approx(expected, abs=1e-6)
    assert ppo.logprobs_from_logits(logits, tokens, 1.0).item() == pytest.approx(
        3 - math.log(math.exp(1) + math.exp(2) + math.exp(3)), abs=1e-6
    )


def test_entropy_of_uniform_and_peaked():
    uniform = torch.zeros(1, 1, 4)
    assert ppo.entropy_from_logits(uniform).item() == pytest.approx(math.log(4), abs=1e-6)
    peaked = torch.tensor([[[100.0, 0.0, 0.0]]])
    assert ppo.entropy_from_logits(peaked).item() == pytest.approx(0.0, abs=1e-6)


def test_masked_mean_var_whiten_ignore_padding():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert ppo.masked_mean(x, mask).item() == pytest.approx(2.0)
    assert ppo.masked_var(x, mask).item() == pytest.approx(1.0)  # unbiased: ((1)+(0)+(1))/2
    w = ppo.masked_whiten(x, mask)
    assert w[0, :3].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-4)
    assert w[0, 3].item() == 0.0


def test_token_rewards_put_score_on_last_response_token():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -3.0], [-2.0, -2.0, -2.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    scores = torch.tensor([10.0, 20.0])
    out = ppo.token_rewards(scores, logprobs, ref, mask, kl_coef=0.1)
    # row 0: kl = [0.5, -1.0, (masked)]; rewards = [-0.05, 0.1 + 10, 0]
    assert out.kl[0].tolist() == pytest.approx([0.5, -1.0, 0.0])
    assert out.rewards[0].tolist() == pytest.approx([-0.05, 10.1, 0.0])
    # row 1: kl = [1, 1, 1]; the score lands on the third token
    assert out.rewards[1].tolist() == pytest.approx([-0.1, -0.1, 19.9])


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.2, 0.4]])
    mask = torch.ones(1, 3)
    gamma, lam = 0.9, 0.5
    # deltas: d2 = 1 - 0.4 = 0.6; d1 = 0 + 0.9*0.4 - 0.2 = 0.16; d0 = 0 + 0.9*0.2 - 0.5 = -0.32
    # A2 = 0.6; A1 = 0.16 + 0.45*0.6 = 0.43; A0 = -0.32 + 0.45*0.43 = -0.1265
    out = ppo.gae(rewards, values, mask, gamma, lam)
    assert out.advantages[0].tolist() == pytest.approx([-0.1265, 0.43, 0.6])
    assert out.returns[0].tolist() == pytest.approx([0.3735, 0.63, 1.0])


def test_gae_treats_tokens_after_the_end_as_terminal():
    rewards = torch.tensor([[0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.3, 9.0]])  # 9.0 sits on a padding position and must not leak in
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    out = ppo.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # A1 = 1 - 0.3 = 0.7; A0 = 0 + 0.3 - 0.5 + 0.7 = 0.5
    assert out.advantages[0].tolist() == pytest.approx([0.5, 0.7, 0.0])


def test_policy_loss_clips_the_ratio():
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.5, 0.5]]))  # ratios 1.5 and 0.5
    adv = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2)
    out = ppo.policy_loss(new, old, adv, mask, clip=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(0.5, 0.8) = 0.8 (clipped)
    assert out.loss.item() == pytest.approx((-1.2 + 0.8) / 2)
    assert out.clip_frac.item() == pytest.approx(1.0)
    assert out.approx_kl.item() == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 2)


def test_policy_loss_unclipped_inside_the_trust_region_and_masked():
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.1, 50.0]]))  # the second token is padding
    out = ppo.policy_loss(new, old, torch.tensor([[2.0, 2.0]]), torch.tensor([[1.0, 0.0]]), clip=0.2)
    assert out.loss.item() == pytest.approx(-2.2)
    assert out.clip_frac.item() == 0.0


def test_value_loss_takes_the_larger_of_clipped_and_unclipped_error():
    old = torch.tensor([[1.0, 1.0]])
    new = torch.tensor([[2.0, 1.1]])
    returns = torch.tensor([[3.0, 0.0]])
    out = ppo.value_loss(new, old, returns, torch.ones(1, 2), clip=0.2)
    # token 0: unclipped (2-3)^2 = 1, clipped (1.2-3)^2 = 3.24 -> 3.24; token 1: 1.21 vs (1.1-0)^2 = 1.21 -> 1.21
    assert out.loss.item() == pytest.approx(0.5 * (3.24 + 1.21) / 2)
    assert out.clip_frac.item() == pytest.approx(0.5)


def test_adaptive_kl_controller_moves_towards_target():
    # kl twice the target: error clipped to +0.2, coef * (1 + 0.2 * 100 / 1000)
    assert ppo.adaptive_kl_coef(0.1, kl=2.0, target=1.0, horizon=1000, n_steps=100) == pytest.approx(0.102)
    assert ppo.adaptive_kl_coef(0.1, kl=0.9, target=1.0, horizon=1000, n_steps=100) == pytest.approx(0.099)


def test_running_moments_match_the_whole_stream():
    rm = ppo.RunningMoments()
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0])
    rm.update(a)
    rm.update(b)
    full = torch.cat([a, b])
    assert rm.mean == pytest.approx(full.mean().item())
    assert rm.std == pytest.approx(full.std(unbiased=False).item())
    assert rm.count == 5


@pytest.mark.parametrize("by_length", [True, False])
def test_minibatches_cover_the_batch_once(by_length):
    lengths = torch.tensor([50, 10, 40, 12, 30, 11, 41, 33, 52, 9])
    sets = ppo.minibatches(lengths, 3, torch.Generator().manual_seed(0), by_length)
    assert sorted(torch.cat(sets).tolist()) == list(range(10))
    assert sorted(len(s) for s in sets) == [1, 3, 3, 3]
    if by_length:  # neighbours in length: the sets are the sorted lengths cut in threes
        groups = sorted(sorted(lengths[s].tolist()) for s in sets)
        assert groups == [[9, 10, 11], [12, 30, 33], [40, 41, 50], [52]]


def test_minibatches_by_length_pad_less_and_vary_their_order():
    lengths = torch.randint(10, 300, (64,), generator=torch.Generator().manual_seed(1))
    padded = {}
    for by_length in (True, False):
        sets = ppo.minibatches(lengths, 8, torch.Generator().manual_seed(0), by_length)
        padded[by_length] = sum(len(s) * lengths[s].max().item() for s in sets)
    assert padded[True] < 0.75 * padded[False]
    orders = {tuple(s[0].item() for s in ppo.minibatches(lengths, 8, torch.Generator().manual_seed(k), True))
              for k in range(5)}
    assert len(orders) > 1


# ---- GRPO ----------------------------------------------------------------------------------------------


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 4.0])  # two groups of three
    # group 1: mean 2, unbiased std sqrt((1 + 0 + 1) / 2) = 1 -> [-1, 0, 1]
    # group 2: mean 4/3, deviations [-4/3, -4/3, 8/3], unbiased var (16 + 16 + 64) / 9 / 2 = 16/3, std 4/sqrt(3)
    #          -> [-1/sqrt(3), -1/sqrt(3), 2/sqrt(3)]
    out = ppo.group_advantages(rewards, 3, "group", eps=0.0)
    r3 = math.sqrt(3)
    assert out.advantages.tolist() == pytest.approx([-1, 0, 1, -1 / r3, -1 / r3, 2 / r3])
    assert out.group_std.tolist() == pytest.approx([1, 1, 1, 4 / r3, 4 / r3, 4 / r3])
    # Dr. GRPO: the centred rewards as they are
    assert ppo.group_advantages(rewards, 3, "none").advantages.tolist() == pytest.approx(
        [-1, 0, 1, -4 / 3, -4 / 3, 8 / 3]
    )
    # batch: centred in the group, divided by the whole batch's std: mean 5/3, squared deviations
    # (4 + 1 + 16 + 25 + 25 + 49) / 9 = 120/9, unbiased var 120/9/5 = 8/3
    batch_std = math.sqrt(8 / 3)
    assert ppo.group_advantages(rewards, 3, "batch", eps=0.0).advantages.tolist() == pytest.approx(
        [x / batch_std for x in [-1, 0, 1, -4 / 3, -4 / 3, 8 / 3]])


def test_group_advantages_of_a_group_all_alike_are_zero_not_nan():
    out = ppo.group_advantages(torch.tensor([5.0, 5.0, 1.0, 3.0]), 2)
    # group 1 scored alike: nothing to learn from it; group 2: mean 2, std sqrt(2) -> -+1/sqrt(2) (eps 1e-4 aside)
    assert out.advantages.tolist() == pytest.approx([0, 0, -1 / math.sqrt(2), 1 / math.sqrt(2)], abs=1e-4)
    assert out.group_std[:2].tolist() == [0.0, 0.0]


def test_kl_k3_is_the_unbiased_non_negative_estimate():
    # d = log pi_ref - log pi: k3 = e^d - d - 1; 0 at d = 0, e.g. 2 - ln 2 - 1 at d = ln 2
    logprobs = torch.tensor([[-1.0, -1.0, -1.0]])
    ref = logprobs + torch.tensor([[0.0, math.log(2), -math.log(2)]])
    assert ppo.kl_k3(logprobs, ref)[0].tolist() == pytest.approx([0.0, 1 - math.log(2), math.log(2) - 0.5])
    # its mean under samples of pi is KL(pi || pi_ref) exactly: two tokens, pi = [0.5, 0.5], pi_ref = [0.25, 0.75]
    pi, ref_p = torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.75])
    expected = (pi * (pi / ref_p).log()).sum().item()
    assert (pi * ppo.kl_k3(pi.log(), ref_p.log())).sum().item() == pytest.approx(expected)


def test_grpo_loss_by_hand():
    # row 0: A = +1, ratios [1.5, 1.0]; row 1: A = -1, ratios [0.5, 50] (the 50 on padding must not count)
    old = torch.zeros(2, 2)
    new = torch.log(torch.tensor([[1.5, 1.0], [0.5, 50.0]]))
    ref = new + torch.tensor([[math.log(2), 0.0], [-math.log(2), 5.0]])  # k3 = [1 - ln 2, 0], [ln 2 - 0.5, -]
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    k_a, k_b = 1 - math.log(2), math.log(2) - 0.5  # 0.30685, 0.19315: they add up to 0.5
    # surrogate, clip 0.2: row 0 max(-1.5, -1.2) = -1.2 (clipped), max(-1, -1) = -1; row 1 max(0.5, 0.8) = 0.8 (clipped)
    # per token with kl_coef 0.1: row 0 [-1.2 + 0.1 k_a, -1.0], row 1 [0.8 + 0.1 k_b]
    row0, row1 = [-1.2 + 0.1 * k_a, -1.0], [0.8 + 0.1 * k_b]
    out = ppo.grpo_loss(new, old, ref, adv, mask, clip=0.2, kl_coef=0.1)
    assert out.loss.item() == pytest.approx((sum(row0) / 2 + sum(row1) / 1) / 2)  # sequence means, then their mean
    total = sum(row0) + sum(row1)  # = -2.2 + 0.8 + 0.1 * 0.5 = -1.35
    assert total == pytest.approx(-1.35)
    assert ppo.grpo_loss(new, old, ref, adv, mask, 0.2, 0.1, "token").loss.item() == pytest.approx(-1.35 / 3)
    assert ppo.grpo_loss(new, old, ref, adv, mask, 0.2, 0.1, "constant", max_tokens=4).loss.item() == pytest.approx(
        -1.35 / (2 * 4))
    assert out.kl.item() == pytest.approx(0.5 / 3)
    assert out.clip_frac.item() == pytest.approx(2 / 3)
    assert out.approx_kl.item() == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 3)


def test_grpo_loss_gradient_pushes_up_the_better_response():
    logprobs = torch.zeros(2, 3, requires_grad=True)
    mask = torch.ones(2, 3)
    out = ppo.grpo_loss(logprobs, logprobs.detach(), logprobs.detach(), torch.tensor([1.0, -1.0]), mask, 0.2, 0.04)
    out.loss.backward()
    # at ratio 1 and pi = pi_ref: d loss / d log pi = -A / (tokens * responses) = -+1/6; the KL term's gradient is 0
    assert logprobs.grad.flatten().tolist() == pytest.approx([-1 / 6] * 3 + [1 / 6] * 3)


def test_leave_one_out_by_hand():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert ppo.leave_one_out(rewards, 2).tolist() == [-1.0, 1.0, -3.0, 3.0]  # each less the other of its pair
    # groups of 4: 1 - (2+3+6)/3, 2 - (1+3+6)/3, 3 - (1+2+6)/3, 6 - (1+2+3)/3
    assert ppo.leave_one_out(rewards, 4).tolist() == pytest.approx([1 - 11 / 3, 2 - 10 / 3, 0.0, 4.0])
    # k / (k - 1) times the reward less the group's mean (mean 3): 4/3 * [-2, -1, 0, 3]
    assert ppo.leave_one_out(rewards, 4).tolist() == pytest.approx([4 / 3 * x for x in (-2, -1, 0, 3)])
    with pytest.raises(ValueError, match="at least 2"):
        ppo.leave_one_out(rewards, 1)


def test_discounted_returns_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # the second response ended at its second token
    assert ppo.discounted_returns(rewards, mask).tolist() == [[1.0, 1.0, 1.0], [2.0, 2.0, 0.0]]
    assert ppo.discounted_returns(rewards, mask, gamma=0.5).tolist() == [[0.25, 0.5, 1.0], [1.0, 2.0, 0.0]]


def test_reinforce_pp_normalises_returns_over_the_batch():
    """Token rewards as token_rewards builds them (KL at every token, score at the last); returns whitened over
    every response token of the batch: mean 0, std 1 there, 0 past the ends."""
    scores = torch.tensor([1.0, -1.0])
    logprobs = torch.tensor([[-1.0, -2.0, -1.0], [-1.0, -1.0, -3.0]])
    ref = torch.tensor([[-1.5, -2.0, -1.0], [-1.0, -2.0, -3.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    r = ppo.token_rewards(scores, logprobs, ref, mask, kl_coef=0.1)
    # by hand: rewards [[-0.05, 0, 1], [0, -0.1 - 1, 0]] -> returns [[0.95, 1, 1], [-1.1, -1.1, 0]]
    returns = ppo.discounted_returns(r.rewards, mask)
    assert torch.allclose(returns, torch.tensor([[0.95, 1.0, 1.0], [-1.1, -1.1, 0.0]]))
    adv = ppo.reinforce_pp_advantages(r.rewards, mask)
    on = adv[mask.bool()]
    assert on.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert on.std().item() == pytest.approx(1.0, abs=1e-4)  # unbiased, as masked_var
    assert adv[1, 2].item() == 0.0
    mean, std = sum([0.95, 1, 1, -1.1, -1.1]) / 5, torch.tensor([0.95, 1, 1, -1.1, -1.1]).std().item()
    assert adv[0, 0].item() == pytest.approx((0.95 - mean) / std, rel=1e-4)


def test_reinforce_pp_moments_are_the_whole_batch_over_processes():
    """Two processes, each with half the batch, summing their moments (total): each half's advantages are the
    whole batch's, not its own half's whitening."""
    rewards = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [2.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    whole = ppo.reinforce_pp_advantages(rewards, mask)
    assert torch.allclose(whole, ppo.masked_whiten(ppo.discounted_returns(rewards, mask), mask), atol=1e-6)
    halves = [(rewards[:2], mask[:2]), (rewards[2:], mask[2:])]

    def sums(r, m):
        on = ppo.masked(ppo.discounted_returns(r, m), m)
        return torch.stack([on.sum(), (on * on).sum(), m.sum()]).double()

    total_sums = sums(*halves[0]) + sums(*halves[1])
    split = [ppo.reinforce_pp_advantages(r, m, total=lambda t: total_sums) for r, m in halves]
    assert torch.allclose(torch.cat(split), whole, atol=1e-6)
    alone = ppo.reinforce_pp_advantages(*halves[0])  # its own half's moments: not the batch's
    assert not torch.allclose(alone, whole[:2], atol=1e-3)


def test_clipped_loss_takes_one_advantage_per_token():
    """grpo_loss with [B, T] advantages (REINFORCE++): at ratio 1 the token mean of -A; each token's gradient is
    -A_t / tokens."""
    logprobs = torch.tensor([[-1.0, -2.0], [-1.0, -1.0]], requires_grad=True)
    adv = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    out = ppo.grpo_loss(logprobs, logprobs.detach(), logprobs.detach(), adv, mask, 0.2, 0.0, "token")
    assert out.loss.item() == pytest.approx(-(1.0 - 2.0 + 0.5) / 3)
    out.loss.backward()
    assert logprobs.grad.flatten().tolist() == pytest.approx([-1 / 3, 2 / 3, -0.5 / 3, 0.0])
    per_response = ppo.grpo_loss(logprobs, logprobs.detach(), logprobs.detach(), torch.tensor([1.0, 0.5]), mask,
                                 0.2, 0.0, "token")
    by_token = ppo.grpo_loss(logprobs, logprobs.detach(), logprobs.detach(), torch.tensor([[1.0, 1.0], [0.5, 0.5]]),
                             mask, 0.2, 0.0, "token")
    assert per_response.loss.item() == pytest.approx(by_token.loss.item())


class _OneProcess:
    num_processes, process_index = 1, 0

    def gather(self, t):
        return t

    def reduce(self, t, reduction):
        return t


def test_rloo_puts_the_kl_in_the_reward_before_leaving_one_out():
    """Scores [1, 2, 3, 6] in pairs; the second response's log-ratio sums to 2, at kl_coef 0.5 its reward falls to
    1: penalised [1, 1, 3, 6], each less the other of its pair -> [0, 0, -3, 3]."""
    settings = SimpleNamespace(epochs=1, group_size=2, kl_coef=0.5, normalize_advantages=False)
    logprobs = torch.tensor([[-1.0, -1.0], [-1.0, -1.0], [-2.0, -2.0], [-1.0, -1.0]])
    ref = torch.tensor([[-1.0, -1.0], [-2.0, -2.0], [-2.0, -2.0], [-1.0, -1.0]])
    mask = torch.ones(4, 2)
    r = SimpleNamespace(mask=mask)
    s = SimpleNamespace(logprobs=logprobs, ref_logprobs=ref, rewards=torch.tensor([1.0, 2.0, 3.0, 6.0]))
    adv = algorithms.RLOO(settings).advantages(_OneProcess(), r, s, None)
    assert adv.rewards.tolist() == [1.0, 1.0, 3.0, 6.0]
    assert adv.advantages.tolist() == [0.0, 0.0, -3.0, 3.0]
    s.rewards = torch.tensor([1.0, float("nan"), 3.0, 6.0])
    assert algorithms.RLOO(settings).advantages(_OneProcess(), r, s, None) is None  # a step every process skips


def test_reinforce_pp_algorithm_whitens_ppo_token_rewards():
    settings = SimpleNamespace(epochs=1, group_size=1, kl_coef=0.1, gamma=1.0)
    scores = torch.tensor([1.0, -1.0])
    logprobs = torch.tensor([[-1.0, -2.0, -1.0], [-1.0, -1.0, -3.0]])
    ref = torch.tensor([[-1.5, -2.0, -1.0], [-1.0, -2.0, -3.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv = algorithms.Reinforce(settings).advantages(
        _OneProcess(), SimpleNamespace(mask=mask), SimpleNamespace(logprobs=logprobs, ref_logprobs=ref,
                                                                   rewards=scores), None)
    expected = ppo.reinforce_pp_advantages(ppo.token_rewards(scores, logprobs, ref, mask, 0.1).rewards, mask)
    assert torch.allclose(adv, expected, atol=1e-6) and adv[1, 2].item() == 0.0
