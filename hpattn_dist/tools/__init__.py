"""Tools built on the library: the ``hpattn-dist`` command line (:mod:`.cli`), the oracle check
(:mod:`.verify`, :mod:`.verify_local`, :mod:`.verify_cross`, on the shared
:mod:`.verify_cases`), the benchmarks (:mod:`.bench`,
:mod:`.bench_report`) and their shared pieces (:mod:`.tolerances`, :mod:`.platform`,
:mod:`.config` and the default ``configs/``).

``import hpattn_dist`` does not import this package; nothing here is part of the library's API.
"""
