"""Defaults that the options of ``vmoe <command>`` show, kept here without torch so that
``--help`` and a usage error need no heavy import. Each mirrors the one home of its value
(named beside it); ``tests/cli/test_startup.py`` checks that they are equal."""

# vmoe.moe.settings.EVAL_CAPACITY_FACTOR: the capacity factor vmoe fit evaluates with
EVAL_CAPACITY_FACTOR = 4.0
# vmoe.viz.report.DEFAULT_CAPACITY_FACTORS: the inference capacity factors of a sweep
DEFAULT_CAPACITY_FACTORS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0)
