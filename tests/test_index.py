"""TurboQuantIndex: exact search over its codes, recall, persistence, removal, errors."""

import os

import jax
import numpy as np
import pytest

from turboquant_jax.index import TurboQuantIndex

D = 64


def data(rng, n, d=D):
  return rng.standard_normal((n, d)).astype(np.float32)


def brute_force(index, queries, k):
  """Top k by the exact metric over the index's own decoded vectors."""
  ids = np.asarray(sorted(index._where))
  xh = index.reconstruct(ids)
  q = queries
  if index.config.metric == "cosine":
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
  if index.config.metric == "l2":
    score = -np.sum((q[:, None, :] - xh[None]) ** 2, axis=-1)
  else:
    score = q @ xh.T
  order = np.argsort(-score, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(score, order, 1), ids[order]


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
@pytest.mark.parametrize("quantizer,bits", [("mse", 2), ("mse", 4), ("prod", 3)])
def test_search_equals_brute_force_over_the_decoded_vectors(metric, quantizer, bits, rng):
  index = TurboQuantIndex(D, bits, metric, quantizer, block_size=128)
  for n in (100, 1, 200):  # spans blocks, partial blocks and odd add sizes
    index.add(data(rng, n))
  queries = data(rng, 7)
  scores, ids = index.search(queries, 10)
  want_scores, want_ids = brute_force(index, queries, 10)
  np.testing.assert_array_equal(ids, want_ids)
  sign = -1 if metric == "l2" else 1
  np.testing.assert_allclose(scores, sign * want_scores, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits,floor", [(2, 0.9), (4, 0.99)])
def test_recall_of_planted_neighbours(bits, floor, rng):
  """Each query has one database vector at cosine ~0.9 among 3,000 random ones (random
  pairs: cosine ~N(0, 1/64)); the planted one must come first."""
  base = data(rng, 3000)
  queries = data(rng, 100)
  planted = queries + 0.45 * data(rng, 100)
  index = TurboQuantIndex(D, bits, "cosine", block_size=512)
  index.add(base)
  planted_ids = index.add(planted)
  _, ids = index.search(queries, 1)
  assert np.mean(ids[:, 0] == planted_ids) >= floor


def test_kernel_path_equals_jnp_path(rng):
  index = TurboQuantIndex(D, 3, "l2", block_size=256)
  index.add(data(rng, 600))
  index.remove(np.arange(0, 600, 7))
  queries = data(rng, 5)
  s1, i1 = index.search(queries, 12, use_kernel=False)
  s2, i2 = index.search(queries, 12, use_kernel=True)  # interpret mode off the GPU
  np.testing.assert_array_equal(i1, i2)
  np.testing.assert_allclose(s1, s2, rtol=1e-5, atol=1e-5)


def test_rerank_returns_exact_scores_and_finds_the_true_nearest(rng):
  x = data(rng, 2000)
  index = TurboQuantIndex(D, 2, "ip", keep_vectors=True, block_size=512)
  index.add(x)
  queries = data(rng, 50)
  truth = np.argmax(queries @ x.T, axis=1)
  _, ids = index.search(queries, 1)
  scores, reranked = index.search(queries, 1, rerank=64)
  assert np.mean(reranked[:, 0] == truth) >= np.mean(ids[:, 0] == truth)
  assert np.mean(reranked[:, 0] == truth) >= 0.98
  np.testing.assert_allclose(scores[:, 0], np.sum(queries * x[reranked[:, 0]], axis=1),
                             rtol=1e-5)


def test_save_load_round_trips_bit_exactly(tmp_path, rng):
  index = TurboQuantIndex(D, 3, "l2", "prod", block_size=128, keep_vectors=True, seed=5)
  index.add(data(rng, 300), ids=np.arange(1000, 1300))
  index.remove([1005, 1200])
  path = tmp_path / "db.tqi"
  index.save(path)
  loaded = TurboQuantIndex.load(path)
  assert loaded.config == index.config and loaded.ntotal == index.ntotal == 298
  for a, b in zip(index._arrays().items(), loaded._arrays().items()):
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[1], b[1])
  queries = data(rng, 4)
  for got, want in zip(loaded.search(queries, 5), index.search(queries, 5)):
    np.testing.assert_array_equal(got, want)
  # Both go on identically.
  more = data(rng, 3)
  np.testing.assert_array_equal(loaded.add(more), index.add(more))
  assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_damaged_files_are_refused(tmp_path, rng):
  index = TurboQuantIndex(D, 2, block_size=128)
  index.add(data(rng, 50))
  path = tmp_path / "db.tqi"
  index.save(path)
  raw = path.read_bytes()
  cases = {
      "checksum": raw[:-100] + bytes([raw[-100] ^ 1]) + raw[-99:],
      "truncated": raw[:-10],
      "magic": b"NOTANIDX" + raw[8:],
      "version": raw[:8] + (99).to_bytes(4, "little") + raw[12:],
  }
  for match, content in cases.items():
    bad = tmp_path / f"{match}.tqi"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match=match):
      TurboQuantIndex.load(bad)


def test_a_failed_save_keeps_the_old_file(tmp_path, rng, monkeypatch):
  index = TurboQuantIndex(D, 2, block_size=128)
  index.add(data(rng, 20))
  path = tmp_path / "db.tqi"
  index.save(path)
  before = path.read_bytes()
  index.add(data(rng, 20))

  def fail(*args):
    raise OSError("disk full")
  monkeypatch.setattr(os, "replace", fail)
  with pytest.raises(OSError, match="disk full"):
    index.save(path)
  assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


def test_remove(rng):
  x = data(rng, 100)
  index = TurboQuantIndex(D, 4, block_size=64)
  ids = index.add(x)
  assert index.remove(ids[:10]) == 10 and index.ntotal == 90
  _, found = index.search(x[:10], 5)
  assert not np.isin(found, ids[:10]).any()
  with pytest.raises(KeyError):
    index.remove([ids[0]])
  index.add(x[:1], ids=[ids[0]])  # a removed id may come back
  _, found = index.search(x[:1], 1)
  assert found[0, 0] == ids[0]


def test_five_bit_codes_score_alike_in_the_kernel_and_in_jnp(rng):
  """5-bit codes (a cache width too): the scoring kernel (interpret mode on CPU) ranks and
  scores as the jnp scan does."""
  x, q = data(rng, 300), data(rng, 3)
  index = TurboQuantIndex(D, 5, block_size=128)
  index.add(x)
  (s_j, i_j), (s_k, i_k) = (index.search(q, 5, use_kernel=u) for u in (False, True))
  np.testing.assert_array_equal(i_j, i_k)
  np.testing.assert_allclose(s_j, s_k, rtol=1e-5, atol=1e-5)


def test_bad_input(rng):
  index = TurboQuantIndex(D, 2, block_size=64)
  with pytest.raises(ValueError, match="shape"):
    index.add(data(rng, 3, D + 8))
  with pytest.raises(ValueError, match="NaN"):
    index.add(np.full((2, D), np.nan, np.float32))
  with pytest.raises(ValueError, match="floating"):
    index.add(np.ones((2, D), np.int32))
  index.add(data(rng, 5), ids=[1, 2, 3, 4, 5])
  with pytest.raises(ValueError, match="already"):
    index.add(data(rng, 1), ids=[3])
  with pytest.raises(ValueError, match="unique"):
    index.add(data(rng, 2), ids=[7, 7])
  with pytest.raises(ValueError, match="k must"):
    index.search(data(rng, 1), 6)
  with pytest.raises(ValueError, match="k must"):
    index.search(data(rng, 1), 0)
  with pytest.raises(ValueError, match="NaN"):
    index.search(np.full((1, D), np.inf, np.float32), 1)
  with pytest.raises(ValueError, match="keep_vectors"):
    index.search(data(rng, 1), 1, rerank=3)
  with pytest.raises(ValueError, match="metric"):
    TurboQuantIndex(D, 2, "hamming")
  with pytest.raises(ValueError, match="bits"):
    TurboQuantIndex(D, 6)
  with pytest.raises(ValueError, match="prod"):
    TurboQuantIndex(D, 1, quantizer="prod")


@pytest.mark.parametrize("metric, num_devices", [("ip", 4), ("l2", 8)])
def test_rows_split_over_devices_search_as_one(num_devices, metric, tmp_path):
  """Blocks round-robin over 4 or 8 host devices: the same scores, ids, re-ranking and
  reconstructions as on one device; a saved index loads onto other devices."""
  rng = np.random.default_rng(3)
  x = rng.standard_normal((2500, 64)).astype(np.float32)
  q = rng.standard_normal((6, 64)).astype(np.float32)
  devices = jax.devices()[:num_devices]
  one = TurboQuantIndex(64, 3, metric, block_size=256, keep_vectors=True)
  many = TurboQuantIndex(64, 3, metric, block_size=256, keep_vectors=True, devices=devices)
  for index in (one, many):
    index.add(x[:1800])
    index.add(x[1800:])
    index.remove([3, 1700, 2499])
  held = {next(iter(b["codes"].planes[0].devices())) for b in many._blocks}
  assert held == set(devices)  # 10 blocks: every device holds some rows
  for kwargs in ({"k": 10}, {"k": 4, "rerank": 30}):
    s1, i1 = one.search(q, **kwargs)
    s2, i2 = many.search(q, **kwargs)
    np.testing.assert_array_equal(i2, i1)
    np.testing.assert_allclose(s2, s1, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(many.reconstruct([0, 2000]), one.reconstruct([0, 2000]))
  many.save(tmp_path / "db.tqi")
  moved = TurboQuantIndex.load(tmp_path / "db.tqi", devices=jax.devices()[8 - num_devices:])
  np.testing.assert_array_equal(moved.search(q, k=10)[1], one.search(q, k=10)[1])
