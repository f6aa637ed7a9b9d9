"""The draft model's proposer on its own: drafts, shadows and their blocks."""
import pytest
import torch

from loraserve.engine.draft_proposer import DraftModelProposer
from loraserve.engine.sampling_params import SamplingParams
from loraserve.engine.sequence import Sequence
from loraserve.model.loader import LoadedModel

PROMPT = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6]


@pytest.fixture
def proposer(tiny_model: LoadedModel) -> DraftModelProposer:
    return DraftModelProposer(tiny_model, num_blocks=64, block_size=4, max_num_batched_tokens=64)


def greedy_sequence(request_id: str) -> Sequence:
    return Sequence(request_id, list(PROMPT), len(PROMPT), SamplingParams(temperature=0.0), torch.Generator())


def test_a_request_left_out_of_a_step_gets_the_same_drafts_again(proposer: DraftModelProposer) -> None:
    sequence = greedy_sequence("r")
    proposer.propose([sequence], [3])
    first = list(sequence.draft_token_ids)
    sequence.truncate_drafts()
    proposer.propose([sequence], [3])  # the target verified nothing in between (it was not scheduled)
    assert len(first) == 3 and sequence.draft_token_ids == first
    proposer.release("r")
    assert proposer.block_manager.num_free_blocks == 64 and not proposer.shadows


def test_accepted_drafts_keep_their_kv_and_rejected_ones_are_rolled_back(proposer: DraftModelProposer) -> None:
    sequence = greedy_sequence("r")
    proposer.propose([sequence], [4])
    drafts = list(sequence.draft_token_ids)
    sequence.truncate_drafts()
    sequence.token_ids += drafts[:2] + [(drafts[2] + 1) % 320]  # two accepted, the third replaced
    shadow = proposer.shadows["r"]
    assert shadow.num_computed_tokens == len(PROMPT) + 3  # the prompt and three drafts, before verification
    proposer.propose([sequence], [4])
    # Kept: the prompt and the two accepted drafts; computed now: the replacement and the first three new drafts.
    assert shadow.token_ids == sequence.token_ids and shadow.draft_token_ids == sequence.draft_token_ids
    assert shadow.num_computed_tokens == len(sequence.token_ids) + 3
    assert len(shadow.block_table) == -(-shadow.num_computed_tokens // 4)  # no block past the computed tokens


def test_requests_sharing_a_prompt_share_its_draft_blocks(proposer: DraftModelProposer) -> None:
    first, second = greedy_sequence("first"), greedy_sequence("second")
    proposer.propose([first], [2])
    proposer.propose([second], [2])
    assert second.draft_token_ids == first.draft_token_ids
    first_blocks, second_blocks = proposer.shadows["first"].block_table, proposer.shadows["second"].block_table
    assert second_blocks[:2] == first_blocks[:2]  # the prompt's two full blocks, computed once
    assert second_blocks[2:] != first_blocks[2:]  # the last prompt token and the drafts, each its own
    proposer.release("first")
    proposer.release("second")
    assert proposer.block_manager.num_free_blocks == 64
