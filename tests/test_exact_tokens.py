"""`exact_tokens`: the exact trailing run of a window ring against a brute-force count on
random rings (stale, empty and missing slots); a decode step's ring write, by select and
by scatter, against a numpy ring."""

import jax
import jax.numpy as jnp
import numpy as np

from turboquant_jax import exact_tokens, kv_cache


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


def test_decode_step_write_is_the_same_by_select_or_scatter(rng, monkeypatch):
  """One token per row into the ring, by the small rings' select and the large rings'
  scatter: both put each written row's token in slot position mod W, and leave rows that
  write nothing (a full cache, num_tokens 0) as they were."""
  b, h, w, d, max_len = 4, 2, 8, 16, 20
  keys = jnp.asarray(rng.standard_normal((b, h, w, d)), jnp.float32)
  values = jnp.asarray(rng.standard_normal((b, h, w, d)), jnp.float32)
  positions = jnp.asarray(rng.integers(-1, 20, (b, w)), jnp.int32)
  kh = jnp.asarray(rng.standard_normal((b, h, 1, d)), jnp.float32)
  vh = jnp.asarray(rng.standard_normal((b, h, 1, d)), jnp.float32)
  lengths = jnp.array([3, 11, 20, 7], jnp.int32)            # row 2 is full
  # Traced, so the full row is planned as dropped rather than refused.
  plan = jax.jit(lambda n: kv_cache.plan_update(n, max_len, 1, None,
                                                 jnp.array([1, 1, 1, 0])))(lengths)
  got = {}
  for name, limit in (("select", 1 << 30), ("scatter", 0)):
    monkeypatch.setattr(exact_tokens, "RING_SELECT_BYTES", limit)
    got[name] = [np.asarray(x) for x in exact_tokens.update_window(keys, values, positions,
                                                                   kh, vh, plan)]
  want = [np.array(keys), np.array(values), np.array(positions)]
  for row in (0, 1):                                         # rows 2, 3 write nothing
    slot = int(lengths[row]) % w
    want[0][row, :, slot] = kh[row, :, 0]
    want[1][row, :, slot] = vh[row, :, 0]
    want[2][row, slot] = lengths[row]
  for name in got:
    for a, e in zip(got[name], want):
      np.testing.assert_array_equal(a, e, err_msg=name)
