"""`exact_tokens.window_start`: the exact trailing run of a window ring, against a
brute-force count on random rings (stale, empty and missing slots)."""

import numpy as np

from turboquant_jax import exact_tokens


def test_window_start_is_the_trailing_run(rng):
  b, w = 64, 16
  lengths = rng.integers(0, 60, b)
  positions = np.full((b, w), -1)
  for i, n in enumerate(lengths):
    for p in range(max(0, n - w - 5), n):        # the ring as appends leave it
      positions[i, p % w] = p
    for slot in rng.choice(w, rng.integers(0, 3), replace=False):   # then a few holes
      positions[i, slot] = rng.choice([-1, positions[i, slot] - w])
  got = np.asarray(exact_tokens.window_start(positions.astype(np.int32),
                                             lengths.astype(np.int32), w))
  for i, n in enumerate(lengths):
    run = 0
    while run < w and n - 1 - run >= 0 and positions[i, (n - 1 - run) % w] == n - 1 - run:
      run += 1
    assert got[i] == n - run, (i, n, positions[i])
