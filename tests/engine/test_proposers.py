"""Prompt lookup proposes what followed an earlier occurrence of the longest matching suffix: the latest one
followed by enough tokens."""
import torch

from loraserve.engine.proposers import NgramProposer
from loraserve.engine.sampling_params import SamplingParams
from loraserve.engine.sequence import Sequence


def test_the_longest_suffix_match_wins_over_a_later_shorter_one():
    proposer = NgramProposer(min_n=1, max_n=3)
    #           a  b  c  X  Y  ... c  Z  ...  a  b  c
    tokens = [1, 2, 3, 10, 11, 12, 3, 20, 21, 1, 2, 3]
    assert proposer.lookup(tokens, limit=3) == [10, 11, 12]  # "1 2 3" matched, not the later "3"


def test_the_latest_match_followed_by_the_limit_of_tokens_wins():
    proposer = NgramProposer(min_n=2, max_n=2)
    tokens = [4, 5, 6, 7, 4, 5, 8, 9, 4, 5]
    assert proposer.lookup(tokens, limit=1) == [8]
    assert proposer.lookup(tokens, limit=4) == [8, 9, 4, 5]  # runs on into the suffix itself
    assert proposer.lookup(tokens, limit=5) == [6, 7, 4, 5, 8]  # the later match has only 4 tokens after it
    assert proposer.lookup([1, 2, 1, 2, 1, 2], limit=5) == [1, 2]  # none has 5 after it: the latest, nearest


def test_no_match_shorter_than_min_n_proposes_nothing():
    proposer = NgramProposer(min_n=2, max_n=4)
    assert proposer.lookup([1, 2, 3, 9, 3], limit=4) == []  # only a one-token match: "3"
    assert proposer.lookup([7], limit=4) == []
    assert NgramProposer(min_n=1, max_n=4).lookup([1, 2, 3, 9, 3], limit=4) == [9, 3]


def test_a_run_of_one_token_proposes_more_of_it():
    assert NgramProposer(min_n=1, max_n=3).lookup([6] * 9, limit=3) == [6, 6, 6]


def test_a_request_history_follows_its_tokens_and_is_released():
    proposer = NgramProposer(min_n=2, max_n=3)
    sequence = Sequence("r", [1, 2, 3, 4, 9, 1, 2], 5, SamplingParams(), torch.Generator())
    proposer.propose([sequence], [2])
    assert sequence.draft_token_ids == [3, 4]
    sequence.token_ids += [3, 4, 9] * 100 + [7, 8, 1, 2]  # past the history's first allocation
    proposer.propose([sequence], [3])
    assert sequence.draft_token_ids == [3, 4, 9] == proposer.lookup(sequence.token_ids, 3)
    proposer.release("r")
    assert not proposer.histories
