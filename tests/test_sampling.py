import pytest
import torch

from triforce.sampling import RowStreams, check_sampling, process_logits, speculative_verify


def test_top_p_keeps_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = process_logits(logits, 1.0, 0.8)
    assert torch.allclose(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    assert torch.allclose(process_logits(logits, 1.0, 0.81), torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95)
    assert torch.equal(process_logits(logits, 0.0, 0.5), torch.tensor([[1.0, 0, 0, 0]]))


def test_greedy_verification_is_longest_prefix_then_argmax():
    v = 6
    target = torch.tensor([3, 1, 4, 1, 5])  # target argmax at each position
    p = torch.nn.functional.one_hot(target, v).float()
    for draft, n_ok in (([3, 1, 4, 1], 4), ([3, 1, 2, 1], 2), ([0, 1, 4, 1], 0)):
        d = torch.tensor(draft)
        q = torch.nn.functional.one_hot(d, v).float()
        n, nxt = speculative_verify(d, q, p, RowStreams([0], 'cpu'))
        assert n == n_ok and int(nxt) == int(target[n])


def test_acceptance_probability_is_min_one_p_over_q():
    p = torch.tensor([[0.2, 0.8], [0.5, 0.5]])
    q = torch.tensor([[0.6, 0.4]])
    gen = RowStreams([0], 'cpu')
    trials = 20000
    acc = sum(speculative_verify(torch.tensor([0]), q, p, gen)[0] for _ in range(trials)) / trials
    # accept token 0 with prob p/q = 1/3; the binomial standard error is ~0.0033
    assert abs(acc - 1 / 3) < 5 * (1 / 3 * 2 / 3 / trials) ** 0.5


@pytest.mark.parametrize("t,top_p,msg", [(-0.1, 0.9, "temperature"), (1.0, 0.0, "top_p"), (1.0, 1.5, "top_p")])
def test_bad_sampling_settings(t, top_p, msg):
    with pytest.raises(ValueError, match=msg):
        check_sampling(t, top_p)
