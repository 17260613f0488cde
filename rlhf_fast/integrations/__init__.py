"""One-line integrations: rlhf_fast's fused ops inside the peers' own trainers, where they spend their time.

    import rlhf_fast.integrations.trl as fast; fast.enable()        # before building GRPOTrainer / RLOOTrainer
    import rlhf_fast.integrations.verl as fast; fast.enable()       # then adv_estimator=rlhf_fast_grpo, ...
    import rlhf_fast.integrations.openrlhf as fast; fast.enable()   # in the driver and each Ray actor

Each module has ``enable()`` / ``disable()`` and the context manager ``enabled()``, patches the peer's documented
extension points where it has them (verl's registries) and otherwise the names its code looks up at call time,
checks the installed version against the range it was tested with (``SUPPORTED``; an untested version raises
instead of patching), restores every original exactly on ``disable()``, and counts the calls that ran rlhf_fast
(``call_counts()``). The machinery is :mod:`rlhf_fast.integrations._patch`; the math is :mod:`rlhf_fast.compat`
and :mod:`rlhf_fast.ops`. The peer modules are imported only when an integration is enabled.
"""
