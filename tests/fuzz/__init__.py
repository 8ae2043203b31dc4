"""The differential fuzzer: drawn cases on real gloo ranks against float64 single-device references.

Note [differential fuzzer]
~~~~~~~~~~~~~~~~~~~~~~~~~~
The library promises that every path a user can take either computes EXACTLY what the
single-device model computes or raises a clear error on EVERY rank, never a silent wrong result
and never a hang. The fuzzer draws the space where that promise was found broken (issue 23), not
the happy path:

- families (:mod:`.space`): global attention (ring, Ulysses, hybrid, auto), cross-grid attention
  with and without windows, local attention, the three distributed layers, a checkpointed block
  with dropouts inside and outside the attention, ``torch.compile`` (aot_eager, inductor),
  idx-flow models through ``convert_model``, ``sync_gradients``, and layers used across a
  re-initialised process group;
- inputs: layouts and aliasing (Note [fuzz layouts] in :mod:`.data`), shapes (empty shards,
  B = 0, N < P, uneven splits, everything on one rank), masks, biases, dropout, scale, dtypes,
  backends, partial ``requires_grad``, ``no_grad``, hooks, a NaN or an infinity in q, k, v or
  the key bias (Note [non-finite inputs] in ``hpattn_dist/masks.py``); the fused CPU kernel of
  local attention with its backward in pieces of a drawn size (Note [fused local draws] in
  :mod:`.space`);
- one-rank perturbations (:data:`.space.PERTURBATIONS`): one rank's dtype, device, scale,
  strategy, window, mode, weights (perturbed or permuted), training mode, gradients, shapes.

Each case states its expectation (exact, raise, or either) and the parent judges it
(:mod:`.judge`) against :mod:`tests.reference`, :mod:`tests.local_reference` or idx-flow: a raise
must happen on every rank, name the problem and come within the exchange timeout (10 s). Cases of
a defect that is known and still open (:data:`.space.KNOWN_DEFECTS`, issue 23's items) are
reported as strict xfails, one per defect, so a fix must remove its entry.

Cost: all cases of one world size run in ONE ``run_ranks`` group (:mod:`.execute`); a case that
leaves the group unusable (a peer that timed out, ranks that ended differently, a crash or a hang
caught by the watchdog) is judged from the ranks' records and a new group runs the rest
(:mod:`.runner`). Known hangs run with a 2 s exchange timeout instead of 10 s; compiled cases
with 30 s, since a compiled call's first agreement waits for the slowest rank's compile
(:func:`.execute.limits`).

Reproduce: every case is a function of ``(seed, index)``; a failure prints its draws and the
command that reruns it alone (``--fuzz-seed S --fuzz-case I``); ``python -m tests.fuzz --seed S
--case I`` does the same outside pytest. Long runs: ``--fuzz-cases N`` or ``HPATTN_FUZZ_CASES=N``.
"""
