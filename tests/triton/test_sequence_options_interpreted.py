"""tests/test_sequence_options.py's comparisons — bidirectional against forward + flipped runs,
ragged batches against per-sample runs — for the Triton backend under the interpreter (float32,
CPU tensors; that file picks its cases from TRITON_INTERPRET, which this folder's conftest sets).
"""

from helpers import main_suite_module

_suite = main_suite_module("test_sequence_options.py")
test_bidirectional_matches_forward_plus_flipped = _suite.test_bidirectional_matches_forward_plus_flipped
test_lengths_match_per_sample_runs = _suite.test_lengths_match_per_sample_runs
