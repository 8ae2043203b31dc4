"""Tools built on the library: the ``hpattn-dist`` command line (:mod:`.cli`), the oracle check
(:mod:`.verify`, :mod:`.verify_local`, :mod:`.verify_cross`, :mod:`.verify_sampled`, on the
shared :mod:`.verify_cases`), the capacity planner (:mod:`.plan`), the benchmarks (:mod:`.bench`:
one module per mode, :mod:`.bench_scaling`, :mod:`.bench_kernels`, :mod:`.bench_local`,
:mod:`.bench_cross`, :mod:`.bench_masks`, on :mod:`.bench_config` and :mod:`.bench_measure`;
:mod:`.bench_flex`, :mod:`.bench_report`) and their shared pieces (:mod:`.tolerances`,
:mod:`.platform`, :mod:`.config`, :mod:`.allocations` and the default ``configs/``).

``import hpattn_dist`` does not import this package; nothing here is part of the library's API.
"""
