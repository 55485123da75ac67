"""tests/test_memory.py's checks — what autograd keeps beyond the caller's tensors, batch-first
against time-first, issue 13's budgets, and the reverse direction keeping what the forward
keeps — for the Triton backend under the interpreter (CPU tensors; that file picks its cases
from TRITON_INTERPRET, which this folder's conftest sets)."""

from helpers import main_suite_module

_suite = main_suite_module("test_memory.py")
test_batch_first_keeps_no_copy_of_x_and_meets_the_budget = (
    _suite.test_batch_first_keeps_no_copy_of_x_and_meets_the_budget)
test_reverse_direction_keeps_what_the_forward_keeps = (
    _suite.test_reverse_direction_keeps_what_the_forward_keeps)
